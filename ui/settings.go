package ui

import (
	"context"
	"fmt"
	"regexp"
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
}

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
	s.form = container.NewVBox(heading("Station profile"), f, container.NewHBox(s.Save), s.status)
	s.locked = widget.NewLabel("Settings are for supervisors: ask a supervisor to log in.")
	s.content = container.NewPadded(container.NewStack(s.form, container.NewVBox(s.locked)))
	s.load(u.cfg.Settings.Profile())
	s.roleChanged()
	return s
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
	} else {
		s.form.Hide()
		s.Save.Disable()
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
