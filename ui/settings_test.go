package ui_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// fakeSettings is the cmd's settings hook: Apply refuses what the cmd
// would refuse (here: roots folder "missing") and keeps what it applies.
type fakeSettings struct {
	mu      sync.Mutex
	p       ui.Profile
	applied int
}

func (f *fakeSettings) Profile() ui.Profile {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.p
}

func (f *fakeSettings) Apply(_ context.Context, p ui.Profile) error {
	if p.EKRoots == "missing" {
		return station.Errorf("settings", station.KindInvalid, "no EK roots in %s: put the TPM makers' PEM certificates there", p.EKRoots)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.p = p
	f.applied++
	return nil
}

// policyProvisioner runs the scripted provisioner under the profile the
// settings hook has in force at the start of each run, and notes its policy.
type policyProvisioner struct {
	*scripted
	s    *fakeSettings
	mu   sync.Mutex
	used []station.EKCertPolicy
}

func (p *policyProvisioner) Provision(ctx context.Context, req station.Request) (*station.Run, error) {
	pol := p.s.Profile().EKCertPolicy
	p.mu.Lock()
	p.used = append(p.used, pol)
	p.mu.Unlock()
	return p.scripted.Provision(ctx, req)
}

func (p *policyProvisioner) policies() []station.EKCertPolicy {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.used)
}

func newSettingsStation(t *testing.T, role ui.Role) (*ui.UI, *loop, *fakeSettings, *policyProvisioner) {
	t.Helper()
	fs := &fakeSettings{p: ui.Profile{Method: station.MethodTPM, EKCertPolicy: station.EKCertWarn, RegID: station.RegIDFromEK, EKRoots: "/data/ek-roots", Verify: "embedded"}}
	sp := &scripted{steps: station.TPMSteps, base: base()}
	pp := &policyProvisioner{scripted: sp, s: fs}
	u, _, l := newStation(t, sp, func(c *ui.Config) {
		c.Provisioner = pp
		c.Settings = fs
		c.Role = role
	})
	return u, l, fs, pp
}

// TestSettingsTechnician: a technician cannot open the settings.
func TestSettingsTechnician(t *testing.T) {
	u, l, fs, _ := newSettingsStation(t, ui.RoleTechnician)
	if u.Settings.Open() {
		t.Fatal("the settings form is open to a technician")
	}
	u.Settings.EKCertPolicy.SetSelected(string(station.EKCertOff))
	test.Tap(u.Settings.Save)
	l.settle()
	if fs.applied != 0 {
		t.Errorf("a technician applied the settings %d times", fs.applied)
	}
	u.Role.SetSelected(string(ui.RoleSupervisor))
	if !u.Settings.Open() {
		t.Error("the settings form is closed to a supervisor")
	}
	u.Role.SetSelected(string(ui.RoleTechnician))
	if u.Settings.Open() {
		t.Error("the settings form stays open after the supervisor leaves")
	}
}

// TestSettingsAppliedToNextRun: a supervisor changes the EK certificate
// policy and the serial pattern; the next run uses them.
func TestSettingsAppliedToNextRun(t *testing.T) {
	u, l, fs, pp := newSettingsStation(t, ui.RoleSupervisor)
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-000601")
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })

	u.Tabs.SelectIndex(1)
	u.Settings.EKCertPolicy.SetSelected(string(station.EKCertRequire))
	u.Settings.SerialPattern.SetText(`^SN-[0-9]{6}$`)
	test.Tap(u.Settings.Save)
	l.until(t, 5*time.Second, "saved", func() bool { return strings.HasPrefix(u.Settings.Status(), "Saved") })
	if got := fs.Profile(); got.EKCertPolicy != station.EKCertRequire || got.SerialPattern != `^SN-[0-9]{6}$` {
		t.Errorf("applied profile %+v", got)
	}
	u.Tabs.SelectIndex(0)

	scan(sl.Scan, "XY-1") // refused by the new pattern
	l.settle()
	if !strings.Contains(sl.Note(), "rescan") {
		t.Errorf("note %q: the new serial pattern is not in force", sl.Note())
	}
	scan(sl.Scan, "SN-000602")
	l.until(t, 5*time.Second, "the second PASS", func() bool { _, s := sl.Verdict(); v, _ := sl.Verdict(); return s == "SN-000602" && v == "PASS" })
	if got, want := pp.policies(), []station.EKCertPolicy{station.EKCertWarn, station.EKCertRequire}; !slices.Equal(got, want) {
		t.Errorf("runs used policies %v, want %v", got, want)
	}
}

// TestSettingsRefused: a bad serial pattern is refused in the screen, with
// a message, and what the hook refuses is shown; nothing is applied.
func TestSettingsRefused(t *testing.T) {
	u, l, fs, _ := newSettingsStation(t, ui.RoleSupervisor)
	u.Settings.SerialPattern.SetText(`^SN-[0-9{6}$`)
	test.Tap(u.Settings.Save)
	l.settle()
	if st := u.Settings.Status(); !strings.Contains(st, "Not saved") || !strings.Contains(st, "not a valid regular expression") {
		t.Errorf("status %q, want the invalid pattern refused", st)
	}
	u.Settings.SerialPattern.SetText("")
	u.Settings.ProductionIDScope.SetText("0ne000ABCDE")
	test.Tap(u.Settings.Save)
	l.settle()
	if st := u.Settings.Status(); !strings.Contains(st, "production endpoint") {
		t.Errorf("status %q, want the missing production endpoint refused", st)
	}
	u.Settings.ProductionIDScope.SetText("")
	u.Settings.EKRoots.SetText("missing")
	test.Tap(u.Settings.Save)
	l.until(t, 5*time.Second, "the refusal", func() bool { return strings.Contains(u.Settings.Status(), "no EK roots in missing") })
	if fs.applied != 0 {
		t.Errorf("applied %d times, want 0", fs.applied)
	}
}

// TestSettingsMethod: a supervisor switches the station to the X.509
// method; the profile applied names it.
func TestSettingsMethod(t *testing.T) {
	u, l, fs, _ := newSettingsStation(t, ui.RoleSupervisor)
	u.Settings.Method.SetSelected(string(station.MethodX509))
	test.Tap(u.Settings.Save)
	l.until(t, 5*time.Second, "saved", func() bool { return strings.HasPrefix(u.Settings.Status(), "Saved") })
	if got := fs.Profile(); got.Method != station.MethodX509 {
		t.Errorf("applied method %q, want x509", got.Method)
	}
}
