package ui_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// password is the supervisor check as cmd/kiln answers it (there with a
// scrypt hash): one password, Unauthorized otherwise. It notes who asked.
type password struct {
	want string
	mu   sync.Mutex
	who  []string
}

func (p *password) Supervisor(_ context.Context, name, pw string) error {
	p.mu.Lock()
	p.who = append(p.who, name)
	p.mu.Unlock()
	if pw != p.want {
		return station.Errorf("supervisor login", station.KindUnauthorized, "wrong supervisor password")
	}
	return nil
}

// TestLoginSupervisorPassword: picking the supervisor role asks for the
// password; a wrong one leaves a technician, the right one opens the
// settings; a new operator name logs the supervisor out.
func TestLoginSupervisorPassword(t *testing.T) {
	pw := &password{want: "kiln-supervisor-1"}
	fs := &fakeSettings{p: ui.Profile{Method: station.MethodTPM, EKCertPolicy: station.EKCertOff, RegID: station.RegIDFromEK, Verify: "off"}}
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Auth = pw
		c.Settings = fs
		c.Role = ui.RoleSupervisor // a preset supervisor needs the password too
	})
	if u.CurrentRole() != ui.RoleTechnician || u.Settings.Open() || !u.LoginOpen() {
		t.Fatalf("preset supervisor without a password: role %s, settings open %v, login open %v", u.CurrentRole(), u.Settings.Open(), u.LoginOpen())
	}
	if u.Station.Reset.Disabled() == false {
		t.Error("the shift reset is enabled before the password")
	}

	test.Type(u.Password, "guess")
	within(t, 2*time.Second, "submitting a password", func() { u.Password.TypedKey(enter()) })
	l.until(t, 5*time.Second, "the refusal", func() bool { return strings.Contains(u.LoginNote(), "Wrong supervisor password") })
	if u.CurrentRole() != ui.RoleTechnician || u.Settings.Open() {
		t.Errorf("after a wrong password: role %s, settings open %v", u.CurrentRole(), u.Settings.Open())
	}
	if u.Password.Text != "" {
		t.Error("the refused password stays in the field")
	}

	test.Type(u.Password, "kiln-supervisor-1")
	test.Tap(u.Login)
	l.until(t, 5*time.Second, "the login", func() bool { return u.CurrentRole() == ui.RoleSupervisor })
	if !u.Settings.Open() || u.LoginOpen() || u.Station.Reset.Disabled() {
		t.Errorf("after the right password: settings open %v, login open %v, reset enabled %v", u.Settings.Open(), u.LoginOpen(), !u.Station.Reset.Disabled())
	}
	pw.mu.Lock()
	who := strings.Join(pw.who, ",")
	pw.mu.Unlock()
	if who != "alice,alice" {
		t.Errorf("the check was asked for %q, want the operator alice twice", who)
	}

	// Another person types their name: the supervisor is logged out.
	test.Type(u.Operator, "x")
	if u.CurrentRole() != ui.RoleTechnician || u.Settings.Open() || u.Role.Selected != string(ui.RoleTechnician) {
		t.Errorf("after the operator changed: role %s (picker %s), settings open %v", u.CurrentRole(), u.Role.Selected, u.Settings.Open())
	}

	// Back to supervisor needs the password again.
	u.Role.SetSelected(string(ui.RoleSupervisor))
	if u.CurrentRole() != ui.RoleTechnician || !u.LoginOpen() {
		t.Errorf("picking supervisor again: role %s, login open %v", u.CurrentRole(), u.LoginOpen())
	}
}

// TestOperatorNameOnRecord: the name in the login is on the run's request,
// and no name refuses the scan.
func TestOperatorNameOnRecord(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base(), started: make(chan station.Request, 4)}
	u, _, l := newStation(t, p, func(c *ui.Config) { c.Operator = "" })
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-000901")
	l.settle()
	if !strings.Contains(sl.Note(), "Enter your name") || len(p.started) != 0 {
		t.Fatalf("a scan without an operator: note %q, %d runs", sl.Note(), len(p.started))
	}
	test.Type(u.Operator, "Bea Tran ")
	scan(sl.Scan, "SN-000901")
	req := <-p.started
	if req.Operator != "Bea Tran" {
		t.Errorf("operator on the request %q, want %q", req.Operator, "Bea Tran")
	}
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
}

// TestVariantFromPrefix: the variant of a scanned serial is shown while it
// runs and on the PASS; a serial of no known variant is refused.
func TestVariantFromPrefix(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base(), started: make(chan station.Request, 4)}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Variants = []ui.Variant{{Prefix: "GW", Model: "Gateway"}, {Prefix: "GW2-", Model: "Gateway GW-200"}, {Prefix: "SN-", Model: "Sensor S1"}}
	})
	sl := u.Station.Slots[0]
	scan(sl.Scan, "XX-1")
	l.settle()
	if !strings.Contains(sl.Note(), "no known variant") || len(p.started) != 0 {
		t.Fatalf("an unknown prefix: note %q, %d runs", sl.Note(), len(p.started))
	}
	scan(sl.Scan, "GW2-0001")
	<-p.started
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
	if sl.Variant() != "Gateway GW-200" {
		t.Errorf("variant %q, want the longest prefix's Gateway GW-200", sl.Variant())
	}
	if _, reason := sl.Reason(); !strings.HasPrefix(reason, "Gateway GW-200 · ") {
		t.Errorf("PASS detail %q does not name the variant", reason)
	}
}

// TestHealthStatusTiles: a tile with a Status shows its text while normal
// (grey), and turns abnormal when it returns an error.
func TestHealthStatusTiles(t *testing.T) {
	var mu sync.Mutex
	queued, cloudErr := 12, error(nil)
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Health = append(c.Health,
			ui.HealthCheck{Name: "Cloud target", Status: func(context.Context) (string, error) {
				mu.Lock()
				defer mu.Unlock()
				return "reachable", cloudErr
			}},
			ui.HealthCheck{Name: "Outbox", Status: func(context.Context) (string, error) {
				mu.Lock()
				defer mu.Unlock()
				return itoa(int64(queued)) + " units to push", nil
			}})
	})
	l.until(t, 5*time.Second, "the tiles", func() bool { s, _ := u.Station.HealthText("Outbox"); return s == "12 units to push" })
	if s, _ := u.Station.HealthText("Cloud target"); s != "reachable" {
		t.Errorf("cloud tile %q", s)
	}
	if got := u.Station.HealthAbnormal(); len(got) != 0 {
		t.Errorf("abnormal %v", got)
	}
	mu.Lock()
	queued, cloudErr = 0, station.Errorf("cloud target", station.KindUnavailable, "contoso-dps.azure-devices-provisioning.net:443 does not answer: check the network")
	mu.Unlock()
	// A finished run refreshes the tiles.
	scan(u.Station.Slots[0].Scan, "SN-000950")
	l.until(t, 5*time.Second, "the cloud problem", func() bool { return len(u.Station.HealthAbnormal()) == 1 })
	if s, _ := u.Station.HealthText("Cloud target"); s != "PROBLEM" {
		t.Errorf("cloud tile %q, want PROBLEM", s)
	}
	if s, _ := u.Station.HealthText("Outbox"); s != "0 units to push" {
		t.Errorf("outbox tile %q", s)
	}
}

// slowPassword is a supervisor check that takes until release is closed,
// as a KDF on a busy station PC does.
type slowPassword struct{ release chan struct{} }

func (p slowPassword) Supervisor(ctx context.Context, _, _ string) error {
	select {
	case <-p.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestLoginDoesNotBlock: the password check runs off the UI goroutine: while
// it is in progress the operator can still scan and switch screens.
func TestLoginDoesNotBlock(t *testing.T) {
	pw := slowPassword{release: make(chan struct{})}
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) { c.Auth = pw })
	u.Role.SetSelected(string(ui.RoleSupervisor))
	test.Type(u.Password, "kiln-supervisor-1")
	within(t, 2*time.Second, "submitting the password", func() { u.Password.TypedKey(enter()) })
	if u.LoginNote() != "Checking…" || !u.Login.Disabled() {
		t.Errorf("during the check: note %q, Log in enabled %v", u.LoginNote(), !u.Login.Disabled())
	}
	sl := u.Station.Slots[0]
	within(t, 2*time.Second, "a scan during the check", func() { scan(sl.Scan, "SN-000960") })
	l.until(t, 5*time.Second, "PASS during the check", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
	close(pw.release)
	l.until(t, 5*time.Second, "the login", func() bool { return u.CurrentRole() == ui.RoleSupervisor })
}
