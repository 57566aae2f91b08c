package ui

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/widget"

	"github.com/kilnworks/kiln/station"
)

// Profile is the part of the station profile the Settings screen edits.
type Profile struct {
	Method        station.Method       // tpm, x509 or symkey
	EKCertPolicy  station.EKCertPolicy // require, warn or off
	RegID         station.RegIDRule    // ek or serial
	SerialPattern string               // regular expression a serial must match; empty: any
	EKRoots       string               // folder of the TPM makers' roots (PEM)
	Verify        string               // end-to-end check: "embedded" or "off"
	// ProductionIDScope and ProductionEndpoint are the production DPS the
	// DUT is pointed at after the check; both empty: none.
	ProductionIDScope  string
	ProductionEndpoint string
}

// Settings reads and applies the station profile; cmd/kiln applies it to
// the running provisioner and saves it to station.json.
type Settings interface {
	// Profile returns the profile in force. It is called on the UI
	// goroutine and must not block.
	Profile() Profile
	// Apply validates p, applies it to the provisioner for the next run and
	// saves it. It is called off the UI goroutine. Kinds: Invalid (a value
	// that cannot be used; the message says which and why), Internal or
	// Unavailable (it could not be saved).
	Apply(ctx context.Context, p Profile) error
}

// BatchTarget is a DPS target batches are pushed to, as the Settings
// screen lists it. It never carries the connection string.
type BatchTarget struct {
	Name         string
	Host         string // the connection string's HostName
	OpsPerMinute int    // the target's operations quota per minute
	PrivateCA    bool   // its TLS certificate chains to a root of its own (a devserver)
}

// NewBatchTarget is a target a supervisor adds.
type NewBatchTarget struct {
	Name string
	// ConnectionString is the DPS service connection string. It holds a
	// key: the screen never shows it again, logs it or keeps it.
	ConnectionString string
	// TrustPath is a PEM file holding the TLS root of a devserver target;
	// "": the system roots (Azure).
	TrustPath    string
	OpsPerMinute int // 0: the default quota
}

// Targets keeps the DPS targets batches are pushed to, for the Settings
// screen; cmd/kiln stores the connection strings sealed.
type Targets interface {
	// Targets returns the targets, by name.
	Targets(ctx context.Context) ([]BatchTarget, error)
	// AddTarget checks t and adds it, or replaces the target of the same
	// name. Kinds: Invalid (the message says which field and why, never
	// the connection string itself).
	AddTarget(ctx context.Context, t NewBatchTarget) error
	// SealTarget returns the target that batches sealed on the Batches
	// screen are bound to ("": none chosen). It must not block.
	SealTarget() string
	// SetSealTarget chooses the target sealed batches are bound to ("":
	// none) and saves the choice. Kinds: NotFound (no such target).
	SetSealTarget(ctx context.Context, name string) error
}

// SettingsScreen edits the station profile. Only a supervisor sees the
// form; a technician sees a notice instead.
type SettingsScreen struct {
	u       *UI
	content fyne.CanvasObject
	form    fyne.CanvasObject
	locked  *widget.Label

	Method             *widget.Select
	EKCertPolicy       *widget.Select
	RegID              *widget.Select
	SerialPattern      *widget.Entry
	EKRoots            *widget.Entry
	Verify             *widget.Select
	ProductionIDScope  *widget.Entry
	ProductionEndpoint *widget.Entry
	// Save validates, applies and saves the profile.
	Save   *widget.Button
	status *widget.Label

	// The batch targets (when Config.Targets is set): the list, the
	// target batches are sealed with, and the form that adds one.
	SealWith         *widget.Select
	TargetName       *widget.Entry
	TargetConnection *widget.Entry // a password entry: never shown
	TargetTrust      *widget.Entry
	TargetQuota      *widget.Entry
	AddTarget        *widget.Button
	targetList       *widget.Label
	targetStatus     *widget.Label
	targets          []BatchTarget
}

// noSealTarget is the Seal-with choice of no target.
const noSealTarget = "(not chosen: the only target, if there is just one)"

func newSettings(u *UI) *SettingsScreen {
	s := &SettingsScreen{u: u}
	s.Method = widget.NewSelect([]string{string(station.MethodTPM), string(station.MethodX509), string(station.MethodSymKey)}, nil)
	s.EKCertPolicy = widget.NewSelect([]string{string(station.EKCertRequire), string(station.EKCertWarn), string(station.EKCertOff)}, nil)
	s.RegID = widget.NewSelect([]string{string(station.RegIDFromEK), string(station.RegIDFromSerial)}, nil)
	s.SerialPattern = widget.NewEntry()
	s.SerialPattern.SetPlaceHolder(`e.g. ^SN-[0-9]{6}$ (empty: any serial)`)
	s.EKRoots = widget.NewEntry()
	s.Verify = widget.NewSelect([]string{"embedded", "off"}, nil)
	s.ProductionIDScope = widget.NewEntry()
	s.ProductionIDScope.SetPlaceHolder("empty: the DUT keeps the verification configuration")
	s.ProductionEndpoint = widget.NewEntry()
	s.ProductionEndpoint.SetPlaceHolder("e.g. global.azure-devices-provisioning.net")
	s.Save = widget.NewButton("Save and apply to the next run", s.save)
	s.Save.Importance = widget.HighImportance
	s.status = widget.NewLabel("")
	s.status.Wrapping = fyne.TextWrapWord

	f := widget.NewForm(
		widget.NewFormItem("Method", s.Method),
		widget.NewFormItem("EK certificate", s.EKCertPolicy),
		widget.NewFormItem("Registration ID", s.RegID),
		widget.NewFormItem("Serial pattern", s.SerialPattern),
		widget.NewFormItem("EK roots folder", s.EKRoots),
		widget.NewFormItem("Verification", s.Verify),
		widget.NewFormItem("Production ID scope", s.ProductionIDScope),
		widget.NewFormItem("Production endpoint", s.ProductionEndpoint),
	)
	body := container.NewVBox(heading("Station profile"), f, container.NewHBox(s.Save), s.status)
	if u.cfg.Targets != nil {
		body.Add(widget.NewSeparator())
		body.Add(s.newTargets())
	}
	s.form = container.NewVScroll(body)
	s.locked = widget.NewLabel("Settings are for supervisors: ask a supervisor to log in.")
	s.content = container.NewPadded(container.NewStack(s.form, container.NewVBox(s.locked)))
	s.load(u.cfg.Settings.Profile())
	s.roleChanged()
	s.RefreshTargets()
	return s
}

// newTargets builds the batch targets section.
func (s *SettingsScreen) newTargets() fyne.CanvasObject {
	s.targetList = widget.NewLabel("")
	s.targetList.Wrapping = fyne.TextWrapWord
	s.SealWith = widget.NewSelect([]string{noSealTarget}, nil)
	s.SealWith.SetSelected(noSealTarget)
	s.SealWith.OnChanged = s.chooseSealTarget
	s.TargetName = widget.NewEntry()
	s.TargetName.SetPlaceHolder("e.g. customer-eu (letters, digits, . _ -)")
	s.TargetConnection = widget.NewPasswordEntry()
	s.TargetConnection.SetPlaceHolder("HostName=…;SharedAccessKeyName=…;SharedAccessKey=…")
	s.TargetTrust = widget.NewEntry()
	s.TargetTrust.SetPlaceHolder("devserver only: its CA certificate (PEM file); empty for Azure")
	s.TargetQuota = widget.NewEntry()
	s.TargetQuota.SetPlaceHolder("operations per minute; empty: 1000 (Azure's per unit)")
	s.AddTarget = widget.NewButton("Add target", s.addTarget)
	s.targetStatus = widget.NewLabel("")
	s.targetStatus.Wrapping = fyne.TextWrapWord
	f := widget.NewForm(
		widget.NewFormItem("Name", s.TargetName),
		widget.NewFormItem("Service connection string", s.TargetConnection),
		widget.NewFormItem("TLS root (PEM)", s.TargetTrust),
		widget.NewFormItem("Quota", s.TargetQuota),
	)
	seal := widget.NewForm(widget.NewFormItem("Seal batches with", s.SealWith))
	return container.NewVBox(heading("Batch targets"), s.targetList, seal,
		widget.NewLabel("Add a target (the connection string is stored sealed and never shown again):"), f,
		container.NewHBox(s.AddTarget), s.targetStatus)
}

// RefreshTargets reads the batch targets off the UI goroutine and shows
// them.
func (s *SettingsScreen) RefreshTargets() {
	u := s.u
	if u.cfg.Targets == nil {
		return
	}
	u.goUI(func(ctx context.Context) {
		ts, err := u.cfg.Targets.Targets(ctx)
		u.cfg.Do(func() {
			if err != nil {
				s.targetList.SetText("The targets could not be read (" + err.Error() + ").")
				return
			}
			s.showTargets(ts)
		})
	})
}

// showTargets shows ts and the target batches are sealed with. On the UI
// goroutine.
func (s *SettingsScreen) showTargets(ts []BatchTarget) {
	s.targets = ts
	var lines []string
	options := []string{noSealTarget}
	for _, t := range ts {
		l := fmt.Sprintf("%s · %s · %d operations/min", t.Name, t.Host, t.OpsPerMinute)
		if t.PrivateCA {
			l += " · own TLS root"
		}
		lines = append(lines, l)
		options = append(options, t.Name)
	}
	if len(lines) == 0 {
		lines = append(lines, "No targets yet: add the DPS your batches go to below.")
	}
	s.targetList.SetText(strings.Join(lines, "\n"))
	cur := s.u.cfg.Targets.SealTarget()
	if cur == "" {
		cur = noSealTarget
	}
	s.SealWith.Options = options
	s.SealWith.Selected = cur // not SetSelected: it is not the supervisor's choice
	s.SealWith.Refresh()
}

// Targets returns the batch targets the screen lists.
func (s *SettingsScreen) Targets() []BatchTarget { return s.targets }

// TargetStatus returns the message under the targets: what was added or
// chosen, or why not.
func (s *SettingsScreen) TargetStatus() string {
	if s.targetStatus == nil {
		return ""
	}
	return s.targetStatus.Text
}

func (s *SettingsScreen) chooseSealTarget(name string) {
	u := s.u
	if u.role() != RoleSupervisor || u.cfg.Targets == nil {
		return
	}
	if name == noSealTarget {
		name = ""
	}
	if name == u.cfg.Targets.SealTarget() {
		return
	}
	u.goUI(func(ctx context.Context) {
		err := u.cfg.Targets.SetSealTarget(ctx, name)
		u.cfg.Do(func() {
			switch {
			case err != nil:
				s.targetStatus.SetText("Not chosen: " + err.Error())
			case name == "":
				s.targetStatus.SetText("Batches are sealed without a target now.")
			default:
				s.targetStatus.SetText("Batches sealed from now on go to " + name + ".")
			}
			s.RefreshTargets()
		})
	})
}

// addTarget checks the form and adds the target off the UI goroutine. The
// connection string leaves the form as soon as it is read.
func (s *SettingsScreen) addTarget() {
	u := s.u
	if u.role() != RoleSupervisor || u.cfg.Targets == nil {
		return
	}
	t := NewBatchTarget{
		Name:             strings.TrimSpace(s.TargetName.Text),
		ConnectionString: strings.TrimSpace(s.TargetConnection.Text),
		TrustPath:        strings.TrimSpace(s.TargetTrust.Text),
	}
	if q := strings.TrimSpace(s.TargetQuota.Text); q != "" {
		n, err := strconv.Atoi(q)
		if err != nil || n <= 0 {
			s.targetStatus.SetText(fmt.Sprintf("Not added: the quota %q is not a positive number of operations per minute.", q))
			return
		}
		t.OpsPerMinute = n
	}
	switch {
	case t.Name == "":
		s.targetStatus.SetText("Not added: give the target a name.")
		return
	case t.ConnectionString == "":
		s.targetStatus.SetText("Not added: paste the DPS's service connection string (the portal's Shared access policies page shows it).")
		return
	}
	s.TargetConnection.SetText("")
	s.AddTarget.Disable()
	s.targetStatus.SetText("Adding " + t.Name + "…")
	u.goUI(func(ctx context.Context) {
		err := u.cfg.Targets.AddTarget(ctx, t)
		u.cfg.Do(func() {
			if u.role() == RoleSupervisor {
				s.AddTarget.Enable()
			}
			if err != nil {
				s.targetStatus.SetText("Not added: " + err.Error() + " (paste the connection string again)")
				return
			}
			s.TargetName.SetText("")
			s.TargetTrust.SetText("")
			s.TargetQuota.SetText("")
			s.targetStatus.SetText("Target " + t.Name + " added; its connection string is stored sealed.")
			s.RefreshTargets()
		})
	})
}

func (s *SettingsScreen) load(p Profile) {
	s.Method.SetSelected(string(p.Method))
	s.EKCertPolicy.SetSelected(string(p.EKCertPolicy))
	s.RegID.SetSelected(string(p.RegID))
	s.SerialPattern.SetText(p.SerialPattern)
	s.EKRoots.SetText(p.EKRoots)
	s.Verify.SetSelected(p.Verify)
	s.ProductionIDScope.SetText(p.ProductionIDScope)
	s.ProductionEndpoint.SetText(p.ProductionEndpoint)
}

func (s *SettingsScreen) roleChanged() {
	if s.u.role() == RoleSupervisor {
		s.locked.Hide()
		s.form.Show()
		s.Save.Enable()
		if s.AddTarget != nil {
			s.AddTarget.Enable()
			s.SealWith.Enable()
		}
	} else {
		s.form.Hide()
		s.Save.Disable()
		if s.AddTarget != nil {
			s.AddTarget.Disable()
			s.SealWith.Disable()
		}
		s.locked.Show()
	}
}

// Open reports whether the form is open to the current operator.
func (s *SettingsScreen) Open() bool { return s.form.Visible() && !s.Save.Disabled() }

// Status returns the message under the form: what was saved, or why not.
func (s *SettingsScreen) Status() string { return s.status.Text }

// profile reads the form, or says what is wrong with it.
func (s *SettingsScreen) profile() (Profile, *regexp.Regexp, error) {
	p := Profile{
		Method:             station.Method(s.Method.Selected),
		EKCertPolicy:       station.EKCertPolicy(s.EKCertPolicy.Selected),
		RegID:              station.RegIDRule(s.RegID.Selected),
		SerialPattern:      strings.TrimSpace(s.SerialPattern.Text),
		EKRoots:            strings.TrimSpace(s.EKRoots.Text),
		Verify:             s.Verify.Selected,
		ProductionIDScope:  strings.TrimSpace(s.ProductionIDScope.Text),
		ProductionEndpoint: strings.TrimSpace(s.ProductionEndpoint.Text),
	}
	var re *regexp.Regexp
	if p.SerialPattern != "" {
		var err error
		if re, err = regexp.Compile(p.SerialPattern); err != nil {
			return p, nil, fmt.Errorf("the serial pattern %q is not a valid regular expression (%v): fix it, e.g. ^SN-[0-9]{6}$", p.SerialPattern, err)
		}
	}
	switch {
	case p.Method == "" || p.EKCertPolicy == "" || p.RegID == "" || p.Verify == "":
		return p, nil, fmt.Errorf("pick the method, the EK certificate policy, the registration ID rule and the verification")
	case p.Method == station.MethodTPM && p.EKCertPolicy != station.EKCertOff && p.EKRoots == "":
		return p, nil, fmt.Errorf("the EK certificate policy %s needs the EK roots folder", p.EKCertPolicy)
	case (p.ProductionIDScope == "") != (p.ProductionEndpoint == ""):
		return p, nil, fmt.Errorf("give both the production ID scope and the production endpoint, or neither")
	}
	return p, re, nil
}

// save validates the form and applies it off the UI goroutine.
func (s *SettingsScreen) save() {
	u := s.u
	if u.role() != RoleSupervisor {
		return
	}
	p, re, err := s.profile()
	if err != nil {
		s.status.SetText("Not saved: " + err.Error())
		return
	}
	s.Save.Disable()
	s.status.SetText("Saving…")
	u.goUI(func(ctx context.Context) {
		err := u.cfg.Settings.Apply(ctx, p)
		u.cfg.Do(func() {
			if u.role() == RoleSupervisor {
				s.Save.Enable()
			}
			if err != nil {
				s.status.SetText("Not saved: " + err.Error())
				return
			}
			u.serialPattern = re
			s.status.SetText("Saved: the next run uses this profile.")
		})
	})
}
