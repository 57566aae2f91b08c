package ui

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/canvas"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/dialog"
	"fyne.io/fyne/v2/theme"
	"fyne.io/fyne/v2/widget"

	"github.com/kilnworks/kiln/station"
)

// recordsLimit bounds one search.
const recordsLimit = 500

// RecordsScreen searches the records and shows one run's evidence.
type RecordsScreen struct {
	u       *UI
	content fyne.CanvasObject

	// Search fields: exact serial, registration ID (matched on the listed
	// runs), and dates (2006-01-02) from and to (inclusive).
	Serial, RegID, From, To *widget.Entry
	Result                  *widget.Select
	// Export writes the selected run's evidence through Config.Save;
	// SaveAs asks where with a save dialog.
	Export, SaveAs *widget.Button

	status   *widget.Label
	list     *widget.List
	runs     []*station.Run
	selected *station.Run
	unit     *station.Unit
	detail   *widget.RichText
	steps    *fyne.Container
}

func newRecords(u *UI) *RecordsScreen {
	rs := &RecordsScreen{u: u}
	rs.Serial, rs.RegID, rs.From, rs.To = widget.NewEntry(), widget.NewEntry(), widget.NewEntry(), widget.NewEntry()
	rs.Serial.SetPlaceHolder("serial")
	rs.RegID.SetPlaceHolder("registration ID")
	rs.From.SetPlaceHolder("from 2006-01-02")
	rs.To.SetPlaceHolder("to 2006-01-02")
	rs.Result = widget.NewSelect([]string{"any result", "pass", "fail", "running"}, nil)
	rs.Result.SetSelected("any result")
	for _, e := range []*widget.Entry{rs.Serial, rs.RegID, rs.From, rs.To} {
		e.OnSubmitted = func(string) { rs.Search() }
	}
	search := widget.NewButtonWithIcon("Search", theme.SearchIcon(), rs.Search)
	search.Importance = widget.HighImportance
	form := container.NewBorder(nil, nil, nil, container.NewHBox(rs.Result, search),
		container.NewGridWithColumns(4, rs.Serial, rs.RegID, rs.From, rs.To))
	rs.status = widget.NewLabel("")

	rs.list = widget.NewList(
		func() int { return len(rs.runs) },
		func() fyne.CanvasObject {
			return container.NewBorder(nil, nil, sized(bigText("PASS", 15, colorPass, true), 52), widget.NewLabel("0.0 s"), widget.NewLabel("run 0000  2006-01-02 15:04:05  SERIAL"))
		},
		func(i widget.ListItemID, o fyne.CanvasObject) {
			r := rs.runs[i]
			row := o.(*fyne.Container)
			main := row.Objects[0].(*widget.Label)
			main.SetText(fmt.Sprintf("run %d  %s  %s", r.ID, r.Started.Local().Format(time.DateTime), orNone(r.Serial)))
			badge := row.Objects[1].(*fyne.Container).Objects[0].(*canvas.Text)
			setBadge(badge, r.Result)
			row.Objects[2].(*widget.Label).SetText(fmt.Sprintf("%.1f s", r.Duration().Seconds()))
		})
	rs.list.OnSelected = func(i widget.ListItemID) {
		if i >= 0 && i < len(rs.runs) {
			rs.Show(rs.runs[i].ID)
		}
	}

	rs.detail = widget.NewRichText()
	rs.detail.Wrapping = fyne.TextWrapWord
	rs.steps = container.NewVBox()
	rs.Export = widget.NewButtonWithIcon("Export evidence (JSON)", theme.DocumentSaveIcon(), rs.export)
	rs.Export.Disable()
	if u.cfg.Save == nil {
		rs.Export.Hide()
	}
	rs.SaveAs = widget.NewButtonWithIcon("Save as…", theme.FolderOpenIcon(), rs.saveAs)
	rs.SaveAs.Disable()
	detail := container.NewBorder(nil, container.NewHBox(rs.Export, rs.SaveAs), nil, nil,
		container.NewVScroll(container.NewVBox(rs.detail, heading("Steps"), rs.steps)))
	split := container.NewHSplit(container.NewBorder(nil, rs.status, nil, nil, rs.list), detail)
	split.Offset = 0.45
	rs.content = container.NewBorder(container.NewPadded(form), nil, nil, nil, split)
	rs.showDetail()
	return rs
}

func orNone(s string) string {
	if s == "" {
		return "(no serial)"
	}
	return s
}

// filter reads the search fields.
func (rs *RecordsScreen) filter() (station.RunFilter, error) {
	f := station.RunFilter{Serial: strings.TrimSpace(rs.Serial.Text), Limit: recordsLimit}
	switch rs.Result.Selected {
	case "pass", "fail", "running":
		f.Result = station.Result(rs.Result.Selected)
	}
	if s := strings.TrimSpace(rs.From.Text); s != "" {
		t, err := time.ParseInLocation(time.DateOnly, s, time.Local)
		if err != nil {
			return f, fmt.Errorf("the from date %q is not a date like 2006-01-02: correct it", s)
		}
		f.Since = t
	}
	if s := strings.TrimSpace(rs.To.Text); s != "" {
		t, err := time.ParseInLocation(time.DateOnly, s, time.Local)
		if err != nil {
			return f, fmt.Errorf("the to date %q is not a date like 2006-01-02: correct it", s)
		}
		f.Until = t.AddDate(0, 0, 1)
	}
	return f, nil
}

// Search runs the search of the fields off the UI goroutine.
func (rs *RecordsScreen) Search() {
	u := rs.u
	f, err := rs.filter()
	if err != nil {
		rs.status.SetText(err.Error())
		return
	}
	regID := strings.ToLower(strings.TrimSpace(rs.RegID.Text))
	rs.status.SetText("Searching…")
	u.goUI(func(ctx context.Context) {
		runs, err := u.cfg.Records.Runs(ctx, f)
		if err == nil && regID != "" {
			kept := runs[:0]
			for _, r := range runs {
				if strings.Contains(strings.ToLower(r.RegistrationID), regID) {
					kept = append(kept, r)
				}
			}
			runs = kept
		}
		u.cfg.Do(func() {
			if err != nil {
				rs.status.SetText("The records could not be read (" + err.Error() + "): check the Records store tile on the Station screen.")
				return
			}
			rs.runs = runs
			rs.list.UnselectAll()
			rs.list.Refresh()
			switch n := len(runs); {
			case n == 0:
				rs.status.SetText("No runs match.")
			case n >= recordsLimit:
				rs.status.SetText(fmt.Sprintf("The newest %d runs: narrow the search to see older ones.", n))
			case n == 1:
				rs.status.SetText("1 run")
			default:
				rs.status.SetText(fmt.Sprintf("%d runs", n))
			}
		})
	})
}

// Runs returns the runs the list shows.
func (rs *RecordsScreen) Runs() []*station.Run { return rs.runs }

// Show reads run id (and its unit) and shows its evidence.
func (rs *RecordsScreen) Show(id int64) {
	u := rs.u
	u.goUI(func(ctx context.Context) {
		r, err := u.cfg.Records.Run(ctx, id)
		var unit *station.Unit
		if err == nil && r.Result == station.ResultPass {
			unit, _ = u.cfg.Records.UnitBySerial(ctx, r.Serial)
			if unit != nil && unit.RunID != r.ID {
				unit = nil
			}
		}
		u.cfg.Do(func() {
			if err != nil {
				rs.status.SetText(fmt.Sprintf("Run %d could not be read (%v).", id, err))
				return
			}
			rs.selected, rs.unit = r, unit
			rs.showDetail()
		})
	})
}

// Selected returns the run whose evidence is shown.
func (rs *RecordsScreen) Selected() *station.Run { return rs.selected }

func (rs *RecordsScreen) showDetail() {
	r := rs.selected
	if r == nil {
		rs.detail.ParseMarkdown("Pick a run to see its evidence.")
		rs.steps.Objects = nil
		rs.steps.Refresh()
		rs.Export.Disable()
		rs.SaveAs.Disable()
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Run %d · %s · %s\n\n", r.ID, orNone(r.Serial), strings.ToUpper(string(r.Result)))
	line := func(k, v string) {
		if v != "" {
			fmt.Fprintf(&b, "**%s** %s\n\n", k, md(v))
		}
	}
	line("Started", r.Started.Local().Format(time.RFC3339)+fmt.Sprintf(" (%.2f s)", r.Duration().Seconds()))
	line("Station", fmt.Sprintf("%s, port %s, operator %s, method %s", r.Station, r.Port, r.Operator, r.Method))
	if r.Model != "" || r.Firmware != "" {
		line("Device", "model "+r.Model+", firmware "+r.Firmware)
	}
	line("Registration ID", r.RegistrationID)
	line("EK SHA-256", r.EKHash)
	if r.DPSStatus != "" {
		line("DPS", fmt.Sprintf("%s, hub %s, device %s", r.DPSStatus, r.AssignedHub, r.DeviceID))
	}
	if !r.TelemetryAt.IsZero() {
		line("Telemetry", "seen by the hub "+r.TelemetryAt.Local().Format(time.RFC3339Nano))
	}
	line("Link", fmt.Sprintf("%d bytes out, %d bytes in", r.BytesOut, r.BytesIn))
	line("Reason", r.Error)
	if rs.unit != nil {
		cert := "none"
		if len(rs.unit.EKCert) > 0 {
			cert = fmt.Sprintf("%d bytes DER", len(rs.unit.EKCert))
		}
		line("Unit", "recorded "+rs.unit.Created.Local().Format(time.RFC3339)+", EK certificate "+cert)
	}
	rs.detail.ParseMarkdown(b.String())
	var rows []fyne.CanvasObject
	for _, s := range r.Steps {
		text := fmt.Sprintf("%s — %s, %s", StepTitle(s.Name), s.Status, duration(s.Duration))
		if s.Detail != "" {
			text += ": " + s.Detail
		}
		if s.Error != "" {
			text += "\n" + s.Error
		}
		l := widget.NewLabel(text)
		l.Wrapping = fyne.TextWrapWord
		rows = append(rows, l)
	}
	rs.steps.Objects = rows
	rs.steps.Refresh()
	rs.Export.Enable()
	rs.SaveAs.Enable()
}

// md escapes the characters Markdown would interpret.
func md(s string) string {
	r := strings.NewReplacer(`*`, `\*`, `_`, `\_`, "`", "\\`", `#`, `\#`, `[`, `\[`)
	return r.Replace(s)
}

// Evidence is everything recorded about one run, as exported.
type Evidence struct {
	Run        *station.Run  `json:"run"`
	ErrorKind  string        `json:"error_kind,omitempty"`
	Unit       *station.Unit `json:"unit,omitempty"`
	ExportedAt time.Time     `json:"exported_at"`
}

// EvidenceJSON returns the evidence of run r (and its unit, when it passed)
// as indented JSON.
func EvidenceJSON(r *station.Run, unit *station.Unit, now time.Time) ([]byte, error) {
	ev := Evidence{Run: r, Unit: unit, ExportedAt: now.UTC()}
	if r.Result == station.ResultFail {
		ev.ErrorKind = strings.ReplaceAll(r.ErrorKind.String(), " ", "_")
	}
	return json.MarshalIndent(ev, "", "  ")
}

func (rs *RecordsScreen) export() {
	u := rs.u
	r, unit := rs.selected, rs.unit
	if r == nil || u.cfg.Save == nil {
		return
	}
	data, err := EvidenceJSON(r, unit, u.cfg.Now())
	if err != nil {
		rs.status.SetText("The evidence could not be encoded: " + err.Error())
		return
	}
	name := evidenceName(r)
	u.goUI(func(ctx context.Context) {
		where, err := u.cfg.Save(name, data)
		u.cfg.Do(func() {
			if err != nil {
				rs.status.SetText("The evidence was not saved (" + err.Error() + "): check the disk and try again.")
				return
			}
			rs.status.SetText("Evidence of run " + fmt.Sprint(r.ID) + " saved to " + where)
		})
	})
}

// Status returns the status line under the list.
func (rs *RecordsScreen) Status() string { return rs.status.Text }

func fileSafe(s string) string {
	if s == "" {
		return "no-serial"
	}
	return strings.Map(func(c rune) rune {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
			return c
		}
		return '_'
	}, s)
}

func setBadge(t *canvas.Text, r station.Result) {
	switch r {
	case station.ResultPass:
		t.Text, t.Color = "PASS", colorPass
	case station.ResultFail:
		t.Text, t.Color = "FAIL", colorFail
	default:
		t.Text, t.Color = "…", colorMuted
	}
	t.Refresh()
}

// evidenceName is the suggested file name of run r's evidence.
func evidenceName(r *station.Run) string {
	return fmt.Sprintf("kiln-run-%d-%s.json", r.ID, fileSafe(r.Serial))
}

// saveAs asks where to save the selected run's evidence with a save dialog.
func (rs *RecordsScreen) saveAs() {
	r := rs.selected
	w := windowOf(rs.content)
	if r == nil || w == nil {
		return
	}
	d := dialog.NewFileSave(func(wc fyne.URIWriteCloser, err error) {
		if err != nil {
			rs.status.SetText("The save dialog failed (" + err.Error() + "): use Export evidence instead.")
			return
		}
		if wc == nil {
			return // cancelled
		}
		rs.SaveTo(wc)
	}, w)
	d.SetFileName(evidenceName(r))
	d.Show()
}

// SaveTo writes the selected run's evidence to wc off the UI goroutine and
// closes it.
func (rs *RecordsScreen) SaveTo(wc fyne.URIWriteCloser) {
	u := rs.u
	r, unit := rs.selected, rs.unit
	if r == nil {
		wc.Close()
		return
	}
	data, err := EvidenceJSON(r, unit, u.cfg.Now())
	if err != nil {
		wc.Close()
		rs.status.SetText("The evidence could not be encoded: " + err.Error())
		return
	}
	u.goUI(func(context.Context) {
		_, err := wc.Write(data)
		if cerr := wc.Close(); err == nil {
			err = cerr
		}
		where := wc.URI().Path()
		u.cfg.Do(func() {
			if err != nil {
				rs.status.SetText("The evidence was not saved to " + where + " (" + err.Error() + "): check the disk and try again.")
				return
			}
			rs.status.SetText("Evidence of run " + fmt.Sprint(r.ID) + " saved to " + where)
		})
	})
}
