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

// fakeTargets keeps targets in memory as cmd/kiln keeps them in the store:
// it refuses what the cmd would refuse (a connection string without a
// key) and keeps only whether a connection string was given.
type fakeTargets struct {
	mu    sync.Mutex
	ts    []ui.BatchTarget
	conns map[string]string
	seal  string
}

func (f *fakeTargets) Targets(context.Context) ([]ui.BatchTarget, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.ts), nil
}

func (f *fakeTargets) AddTarget(_ context.Context, t ui.NewBatchTarget) error {
	if !strings.Contains(t.ConnectionString, "SharedAccessKey=") {
		return station.Errorf("add target", station.KindInvalid, "the connection string has no SharedAccessKey: copy it again from the portal")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	host, _, _ := strings.Cut(strings.TrimPrefix(t.ConnectionString, "HostName="), ";")
	ops := t.OpsPerMinute
	if ops == 0 {
		ops = station.DefaultOpsPerMinute
	}
	f.ts = append(f.ts, ui.BatchTarget{Name: t.Name, Host: host, OpsPerMinute: ops, PrivateCA: t.TrustPath != ""})
	f.conns[t.Name] = t.ConnectionString
	return nil
}

func (f *fakeTargets) SealTarget() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seal
}

func (f *fakeTargets) SetSealTarget(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if name != "" && f.conns[name] == "" {
		return station.Errorf("choose target", station.KindNotFound, "no target %s", name)
	}
	f.seal = name
	return nil
}

// TestSettingsTargets: a supervisor adds a batch target and chooses it for
// sealing; the connection string leaves the form at once and is never
// shown; a refused one says why; a technician cannot add one.
func TestSettingsTargets(t *testing.T) {
	ft := &fakeTargets{conns: map[string]string{}}
	fs := &fakeSettings{p: ui.Profile{Method: station.MethodTPM, EKCertPolicy: station.EKCertOff, RegID: station.RegIDFromEK, Verify: "off"}}
	sp := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, sp, func(c *ui.Config) {
		c.Settings = fs
		c.Targets = ft
		c.Role = ui.RoleTechnician
	})
	s := u.Settings
	l.settle()
	if !s.AddTarget.Disabled() || !s.SealWith.Disabled() {
		t.Error("a technician may add or choose targets")
	}
	u.Role.SetSelected(string(ui.RoleSupervisor))
	u.Tabs.SelectIndex(1)
	l.settle()

	const conn = "HostName=lab.example.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=c2VjcmV0LWtleS0xMjM0NTY="
	s.TargetName.SetText("lab")
	s.TargetConnection.SetText("HostName=lab.example.net;SharedAccessKeyName=x")
	test.Tap(s.AddTarget)
	l.until(t, 5*time.Second, "the refusal", func() bool { return strings.HasPrefix(s.TargetStatus(), "Not added") })
	if st := s.TargetStatus(); !strings.Contains(st, "no SharedAccessKey") {
		t.Errorf("status %q", st)
	}
	if s.TargetConnection.Text != "" {
		t.Error("the connection string stays in the form after Add")
	}

	s.TargetName.SetText("lab")
	s.TargetConnection.SetText(conn)
	s.TargetTrust.SetText("/data/devserver/ca.pem")
	s.TargetQuota.SetText("6000")
	test.Tap(s.AddTarget)
	l.until(t, 5*time.Second, "added", func() bool { return len(s.Targets()) == 1 })
	if got, want := s.Targets()[0], (ui.BatchTarget{Name: "lab", Host: "lab.example.net", OpsPerMinute: 6000, PrivateCA: true}); got != want {
		t.Errorf("listed %+v, want %+v", got, want)
	}
	if ft.conns["lab"] != conn {
		t.Error("the connection string did not reach the targets hook")
	}
	if strings.Contains(s.TargetStatus(), "SharedAccessKey=") || s.TargetConnection.Text != "" {
		t.Errorf("the connection string is shown: status %q, field %q", s.TargetStatus(), s.TargetConnection.Text)
	}
	if !slices.Contains(s.SealWith.Options, "lab") {
		t.Errorf("Seal with offers %v", s.SealWith.Options)
	}
	s.SealWith.SetSelected("lab")
	l.until(t, 5*time.Second, "chosen", func() bool { return ft.SealTarget() == "lab" })
	l.until(t, 5*time.Second, "the note", func() bool { return strings.Contains(s.TargetStatus(), "go to lab") })

	s.TargetQuota.SetText("fast")
	s.TargetName.SetText("other")
	s.TargetConnection.SetText(conn)
	test.Tap(s.AddTarget)
	l.settle()
	if st := s.TargetStatus(); !strings.Contains(st, `quota "fast"`) || len(ft.ts) != 1 {
		t.Errorf("a bad quota: status %q, %d targets", st, len(ft.ts))
	}
}
