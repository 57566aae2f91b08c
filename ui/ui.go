package ui

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"sync"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/driver/desktop"
	"fyne.io/fyne/v2/widget"

	"github.com/kilnworks/kiln/station"
)

// Provisioner provisions units for the Station screen;
// *station.Provisioner satisfies it. Progress reaches the screen through
// UI.Step, which the caller wires to station.Provisioner.OnStep.
type Provisioner interface {
	// Provision provisions the unit of req and returns its run, also when
	// the unit fails (the error then has a station Kind). A nil run means
	// nothing could be recorded.
	Provision(ctx context.Context, req station.Request) (*station.Run, error)
	// Steps lists the steps of a run, in order.
	Steps() []string
}

// Records is what the screens read of the system of record: a subset of
// station.Store.
type Records interface {
	// Run returns run id with its steps. Kinds: NotFound.
	Run(ctx context.Context, id int64) (*station.Run, error)
	// Runs returns runs matching f with their steps, newest first.
	Runs(ctx context.Context, f station.RunFilter) ([]*station.Run, error)
	// UnitBySerial returns the provisioned unit of a serial. Kinds: NotFound.
	UnitBySerial(ctx context.Context, serial string) (*station.Unit, error)
}

// Simulator is the simulated DUT of simulation mode (no hardware attached).
type Simulator interface {
	// DUT returns the simulated DUT's port and the serial it reports.
	DUT() (port, serial string)
	// Replace closes the simulated DUT and starts a fresh one (a new serial
	// and a new TPM), returning its port and serial.
	Replace(ctx context.Context) (port, serial string, err error)
}

// HealthCheck is one station health tile. Check returns nil when the part
// is normal, or an error that says what is wrong and what to do. Status,
// when set, is used instead of Check and also returns what the tile shows
// when the part is normal (e.g. "12 units queued"); Status or Check is
// required.
type HealthCheck struct {
	Name   string
	Check  func(ctx context.Context) error
	Status func(ctx context.Context) (string, error)
}

// Auth checks that an operator may act as a supervisor. cmd/kiln keeps the
// supervisor password hashed with a key-derivation function.
type Auth interface {
	// Supervisor checks the supervisor password given by operator name.
	// It may be slow (a KDF): it is called off the UI goroutine. Kinds:
	// Unauthorized (a wrong password); NotFound (no supervisor password is
	// set: the message says how to set one).
	Supervisor(ctx context.Context, name, password string) error
}

// Variant is a product variant, recognised from its serial numbers' prefix.
type Variant struct {
	Prefix string // e.g. "GW2-"
	Model  string // e.g. "Gateway GW-200"
}

// Port is a serial port offered by the port picker.
type Port struct {
	Path        string
	Description string // e.g. "USB 2e8a:000a SN E6614103"
}

// Unplug is a slot's policy for waiting, after a run, until the unit is
// removed, so that the next result never lands on the wrong unit.
type Unplug struct {
	// Present reports whether the slot's port is present, e.g. os.Stat on
	// its path. It is polled off the UI goroutine until it reports false.
	// Nil: the operator confirms the removal with a button (a simulated
	// DUT, or a port that stays when the unit is unplugged).
	Present func(port string) bool
}

// Role is what an operator may do.
type Role string

// The roles.
const (
	RoleTechnician Role = "Technician" // runs units
	RoleSupervisor Role = "Supervisor" // also resets shift counts and edits the settings
)

// Config configures the station GUI. Provisioner is required; the rest is
// optional.
type Config struct {
	Provisioner   Provisioner
	Records       Records   // nil: no Records screen, no history
	Devserver     Devserver // nil: no Devserver screen
	Simulator     Simulator // non-nil: simulation mode on the first slot
	Station       string    // the station's name, shown in the header
	Ports         []string  // one slot per entry, preselected port (empty: one slot, no port)
	ListPorts     func() ([]Port, error)
	SerialPattern *regexp.Regexp // when set, a scanned serial must match it
	// Unplug returns slot i's removal policy; nil (or a nil policy) lets
	// the next scan start directly.
	Unplug func(slot int) *Unplug
	// UnplugEvery is how often Unplug.Present is polled (default 250 ms).
	UnplugEvery time.Duration
	Health      []HealthCheck
	// HealthEvery is how often the health tiles are refreshed; 0 refreshes
	// them at start and after each run only.
	HealthEvery time.Duration
	// Alert is called when a unit fails, for an audible alert. It runs on
	// its own goroutine.
	Alert func()
	// Save stores an export (a unit's evidence) under a suggested file name
	// and returns where it went.
	Save func(name string, data []byte) (string, error)
	// Settings, when set, adds the Settings screen (supervisor only).
	Settings Settings
	// Batches, when set, adds the Batches screen.
	Batches BatchActions
	// Targets, when set with Settings, adds the batch targets to the
	// Settings screen.
	Targets Targets
	// ExportDir is where the Batches screen suggests export files.
	ExportDir string
	// Auth, when set, guards the supervisor role with a password. Without
	// it, picking the role is enough (tests, single-user benches).
	Auth Auth
	// Variants, when set, name the product variant of a scanned serial by
	// its prefix, and a scan that matches none is refused.
	Variants []Variant
	Operator string // preset operator name
	// Role is the preset role (default technician). A preset supervisor
	// needs the password too when Auth is set.
	Role Role
	Now  func() time.Time
	// ShiftStart is when the current shift began; zero: when the GUI
	// started. When set, the shift's runs already in Records are counted
	// (and charted) at start.
	ShiftStart time.Time
	// Do runs f on the UI goroutine; nil means fyne.Do. Tests pass a loop
	// they drive themselves.
	Do func(f func())
}

// UI is the station GUI: the screens in tabs, the operator login above them.
type UI struct {
	cfg     Config
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	content fyne.CanvasObject

	// Station is the station screen; Records and Devserver the others
	// (nil when not configured).
	Station   *Station
	Records   *RecordsScreen
	Devserver *DevserverScreen
	Settings  *SettingsScreen
	Batches   *BatchesScreen

	// serialPattern is the serial format scans are checked against; the
	// Settings screen changes it. On the UI goroutine.
	serialPattern *regexp.Regexp

	Tabs     *container.AppTabs
	Operator *widget.Entry
	Role     *widget.Select
	// Password takes the supervisor password when the supervisor role is
	// picked (Auth set); Enter or Login checks it.
	Password *widget.Entry
	Login    *widget.Button

	loginNote *widget.Label
	loginBox  *fyne.Container
	// super is set once the supervisor password was accepted, until the
	// role or the operator changes. On the UI goroutine.
	super    bool
	checking bool // a password check is in progress
}

// New builds the GUI. Call Close when the window closes.
func New(cfg Config) (*UI, error) {
	if cfg.Provisioner == nil {
		return nil, errors.New("ui: a Provisioner is required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Do == nil {
		cfg.Do = fyne.Do
	}
	if cfg.UnplugEvery <= 0 {
		cfg.UnplugEvery = 250 * time.Millisecond
	}
	if cfg.Role == "" {
		cfg.Role = RoleTechnician
	}
	if cfg.Station == "" {
		cfg.Station = "kiln"
	}
	u := &UI{cfg: cfg, serialPattern: cfg.SerialPattern}
	u.ctx, u.cancel = context.WithCancel(context.Background())

	u.Operator = widget.NewEntry()
	u.Operator.SetPlaceHolder("your name")
	u.Operator.SetText(cfg.Operator)
	u.Role = widget.NewSelect([]string{string(RoleTechnician), string(RoleSupervisor)}, nil)
	u.Role.SetSelected(string(cfg.Role))
	u.Password = widget.NewPasswordEntry()
	u.Password.SetPlaceHolder("supervisor password")
	u.Password.OnSubmitted = func(string) { u.login() }
	u.Login = widget.NewButton("Log in", u.login)
	u.loginNote = widget.NewLabel("")
	u.loginBox = container.NewHBox(container.NewGridWrap(fyne.NewSize(220, u.Password.MinSize().Height), u.Password), u.Login, u.loginNote)
	u.loginBox.Hide()

	u.Station = newStation(u)
	u.Tabs = container.NewAppTabs(container.NewTabItem("Station", u.Station.content))
	if cfg.Records != nil {
		u.Records = newRecords(u)
		u.Tabs.Append(container.NewTabItem("Records", u.Records.content))
	}
	if cfg.Batches != nil {
		u.Batches = newBatches(u)
		u.Tabs.Append(container.NewTabItem("Batches", u.Batches.content))
	}
	if cfg.Devserver != nil {
		u.Devserver = newDevserver(u)
		u.Tabs.Append(container.NewTabItem("Devserver", u.Devserver.content))
	}
	if cfg.Settings != nil {
		u.Settings = newSettings(u)
		u.Tabs.Append(container.NewTabItem("Settings", u.Settings.content))
	}
	u.Tabs.OnSelected = func(t *container.TabItem) {
		switch {
		case t.Text == "Station":
			u.Station.focusScan()
		case t.Text == "Records" && u.Records != nil:
			u.Records.Search()
		case t.Text == "Devserver" && u.Devserver != nil:
			u.Devserver.Refresh()
		case t.Text == "Batches" && u.Batches != nil:
			u.Batches.Refresh()
		case t.Text == "Settings" && u.Settings != nil:
			u.Settings.RefreshTargets()
		}
	}
	u.Role.OnChanged = func(string) { u.pickRole() }
	u.Operator.OnChanged = func(string) {
		if u.super {
			// Someone else is at the station now: the supervisor is logged out.
			u.super = false
			u.Role.SetSelected(string(RoleTechnician))
		}
	}
	if cfg.Role == RoleSupervisor && cfg.Auth != nil {
		u.pickRole()
	}

	title := bigText("Kiln", 24, colorInk, true)
	name := widget.NewLabel("station " + cfg.Station)
	login := container.NewHBox(widget.NewLabel("Operator"), container.NewGridWrap(fyne.NewSize(220, u.Operator.MinSize().Height), u.Operator), u.Role, u.loginBox)
	header := container.NewBorder(nil, nil, container.NewHBox(title, name), login)
	u.content = container.NewBorder(container.NewPadded(header), nil, nil, nil, u.Tabs)
	u.Station.start()
	return u, nil
}

// Content returns the GUI's root object, for a window.
func (u *UI) Content() fyne.CanvasObject { return u.content }

// Step hands a provisioning step event to the Station screen. It is safe to
// call from any goroutine: wire it to station.Provisioner.OnStep.
func (u *UI) Step(ev station.StepEvent) { u.Station.step(ev) }

// OperatorName returns the operator's name as entered.
func (u *UI) OperatorName() string { return u.Operator.Text }

// MainMenu returns the window's menu: the screens, with keyboard shortcuts
// Alt+1, Alt+2 and Alt+3 that work whatever has the focus (scanner wedges
// keep the scan field focused).
func (u *UI) MainMenu() *fyne.MainMenu {
	var items []*fyne.MenuItem
	for i, t := range u.Tabs.Items {
		item := fyne.NewMenuItem(t.Text, func() { u.Tabs.SelectIndex(i) })
		item.Shortcut = &desktop.CustomShortcut{KeyName: fyne.KeyName(rune('1' + i)), Modifier: fyne.KeyModifierAlt}
		items = append(items, item)
	}
	return fyne.NewMainMenu(fyne.NewMenu("Screens", items...))
}

// Close stops the runs in progress and the GUI's goroutines, and waits for
// them.
func (u *UI) Close() {
	u.cancel()
	u.wg.Wait()
}

// goUI runs f on its own goroutine, tracked by Close.
func (u *UI) goUI(f func(ctx context.Context)) {
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		f(u.ctx)
	}()
}

// role is the operator's role in force: a supervisor only once the
// password was accepted (when Auth is set).
func (u *UI) role() Role {
	r := Role(u.Role.Selected)
	if r == RoleSupervisor && u.cfg.Auth != nil && !u.super {
		return RoleTechnician
	}
	return r
}

// CurrentRole returns the operator's role in force.
func (u *UI) CurrentRole() Role { return u.role() }

// LoginNote returns the message beside the login, e.g. why a password was
// refused.
func (u *UI) LoginNote() string {
	if !u.loginBox.Visible() {
		return ""
	}
	return u.loginNote.Text
}

// LoginOpen reports whether the password field is shown.
func (u *UI) LoginOpen() bool { return u.loginBox.Visible() }

// pickRole follows the role picker: the supervisor role asks for the
// password first (when Auth is set). On the UI goroutine.
func (u *UI) pickRole() {
	if Role(u.Role.Selected) == RoleSupervisor && u.cfg.Auth != nil && !u.super {
		u.Password.SetText("")
		u.loginBox.Show()
		u.note("Enter the supervisor password.")
		// The password field was hidden until now: find the canvas through
		// the role picker, which is shown.
		if c := fyne.CurrentApp().Driver().CanvasForObject(u.Role); c != nil {
			c.Focus(u.Password)
		}
	} else {
		if Role(u.Role.Selected) != RoleSupervisor {
			u.super = false
		}
		u.Password.SetText("")
		u.loginBox.Hide()
		u.note("")
	}
	u.roleChanged()
}

func (u *UI) note(s string) { u.loginNote.SetText(s) }

// roleChanged tells the screens that the role in force may have changed.
func (u *UI) roleChanged() {
	u.Station.roleChanged()
	if u.Settings != nil {
		u.Settings.roleChanged()
	}
	if u.Batches != nil {
		u.Batches.roleChanged()
	}
}

// login checks the supervisor password off the UI goroutine.
func (u *UI) login() {
	if u.cfg.Auth == nil || u.checking || Role(u.Role.Selected) != RoleSupervisor {
		return
	}
	name := strings.TrimSpace(u.OperatorName())
	pw := u.Password.Text
	if name == "" {
		u.note("Enter your name under Operator first.")
		return
	}
	if pw == "" {
		u.note("Enter the supervisor password.")
		return
	}
	u.checking = true
	u.Login.Disable()
	u.note("Checking…")
	u.goUI(func(ctx context.Context) {
		err := u.cfg.Auth.Supervisor(ctx, name, pw)
		u.cfg.Do(func() {
			u.checking = false
			u.Login.Enable()
			u.Password.SetText("")
			if Role(u.Role.Selected) != RoleSupervisor || strings.TrimSpace(u.OperatorName()) != name {
				return // the operator changed their mind meanwhile
			}
			if err != nil {
				msg := "Not logged in: " + err.Error()
				if station.KindOf(err) == station.KindUnauthorized {
					msg = "Wrong supervisor password: try again, or work as a technician."
				}
				u.note(msg)
				return
			}
			u.super = true
			u.loginBox.Hide()
			u.note("")
			u.roleChanged()
			u.Station.focusScan() // the scanner types into the scan field again
		})
	})
}

// FocusScan puts the keyboard focus (the barcode wedge) on the first idle
// slot's scan field. Call it once the content is in a window.
func (u *UI) FocusScan() { u.Station.focusScan() }
