package ui

import (
	"context"
	"fmt"
	"regexp"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/theme"
	"fyne.io/fyne/v2/widget"
)

// Devserver is the embedded DPS, as the Devserver screen shows it.
type Devserver interface {
	// Status describes the embedded DPS now. Kinds: Unavailable.
	Status(ctx context.Context) (DevserverStatus, error)
}

// DevserverStatus describes the embedded DPS and its hub.
type DevserverStatus struct {
	GlobalEndpoint   string // DPS device API, host:port (HTTPS)
	ServiceEndpoint  string // DPS service API
	IDScope          string
	ConnectionString string // the service connection string: it holds a key
	Hub              string // the embedded IoT hub's address (MQTT over TLS)
	TrustBundle      string // where the TLS root devices trust is
	Telemetry        int    // telemetry messages the hub kept from recent units
	LastTelemetry    time.Time
}

// DevserverScreen shows the embedded DPS.
type DevserverScreen struct {
	u       *UI
	content fyne.CanvasObject

	// Reveal shows or masks the connection string; Copy copies it.
	Reveal, Copy *widget.Button

	fields   map[string]*widget.Label
	conn     *widget.Label
	status   *widget.Label
	last     DevserverStatus
	revealed bool
}

var devserverFields = []string{"Global endpoint", "Service endpoint", "ID scope", "Hub", "Trust bundle", "Telemetry"}

func newDevserver(u *UI) *DevserverScreen {
	d := &DevserverScreen{u: u, fields: map[string]*widget.Label{}}
	form := widget.NewForm()
	for _, f := range devserverFields {
		l := widget.NewLabel("")
		l.Wrapping = fyne.TextWrapBreak
		d.fields[f] = l
		form.Append(f, l)
	}
	d.conn = widget.NewLabel("")
	d.conn.Wrapping = fyne.TextWrapBreak
	d.Reveal = widget.NewButtonWithIcon("Reveal", theme.VisibilityIcon(), d.toggle)
	d.Copy = widget.NewButtonWithIcon("Copy", theme.ContentCopyIcon(), d.copy)
	form.Append("Service connection string", container.NewBorder(nil, nil, nil, container.NewHBox(d.Reveal, d.Copy), d.conn))
	d.status = widget.NewLabel("")
	refresh := widget.NewButtonWithIcon("Refresh", theme.ViewRefreshIcon(), d.Refresh)
	intro := widget.NewLabel("The station's embedded Device Provisioning Service and IoT hub: every unit registers here and sends telemetry before it passes. SDK clients and `kiln serve` users connect with these values.")
	intro.Wrapping = fyne.TextWrapWord
	d.content = container.NewBorder(
		container.NewVBox(heading("Embedded DPS"), intro),
		container.NewBorder(nil, nil, nil, refresh, d.status), nil, nil,
		container.NewVScroll(form))
	return d
}

// Refresh reads the devserver's status off the UI goroutine.
func (d *DevserverScreen) Refresh() {
	u := d.u
	u.goUI(func(ctx context.Context) {
		st, err := u.cfg.Devserver.Status(ctx)
		u.cfg.Do(func() {
			if err != nil {
				d.status.SetText("The embedded DPS did not answer (" + err.Error() + "): restart kiln gui.")
				return
			}
			d.last = st
			d.show()
			d.status.SetText("Updated " + u.cfg.Now().Format("15:04:05"))
		})
	})
}

func (d *DevserverScreen) show() {
	st := d.last
	d.fields["Global endpoint"].SetText(st.GlobalEndpoint)
	d.fields["Service endpoint"].SetText(st.ServiceEndpoint)
	d.fields["ID scope"].SetText(st.IDScope)
	d.fields["Hub"].SetText(st.Hub)
	d.fields["Trust bundle"].SetText(st.TrustBundle)
	tel := fmt.Sprintf("%d messages from recent units", st.Telemetry)
	if !st.LastTelemetry.IsZero() {
		tel += ", the last at " + st.LastTelemetry.Local().Format("15:04:05")
	}
	d.fields["Telemetry"].SetText(tel)
	if d.revealed {
		d.conn.SetText(st.ConnectionString)
		d.Reveal.SetText("Hide")
	} else {
		d.conn.SetText(MaskSecret(st.ConnectionString))
		d.Reveal.SetText("Reveal")
	}
}

func (d *DevserverScreen) toggle() {
	d.revealed = !d.revealed
	d.show()
}

func (d *DevserverScreen) copy() {
	if d.last.ConnectionString == "" {
		return
	}
	fyne.CurrentApp().Clipboard().SetContent(d.last.ConnectionString)
	d.status.SetText("Service connection string copied: it holds a key, paste it only where it belongs.")
}

// ConnectionString returns the connection string as shown (masked unless
// revealed).
func (d *DevserverScreen) ConnectionString() string { return d.conn.Text }

var secretPart = regexp.MustCompile(`(?i)(SharedAccessKey=)[^;]*`)

// MaskSecret hides the key of a connection string.
func MaskSecret(s string) string {
	return secretPart.ReplaceAllString(s, "${1}••••••••")
}
