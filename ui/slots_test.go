package ui_test

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// TestStationTwoSlotsInParallel: two slots side by side run two units at
// once (the provisioner takes parallel calls for different ports); each
// slot shows its own steps and verdict, and a FAIL on one does not touch
// the other.
func TestStationTwoSlotsInParallel(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base(), gate: make(chan struct{}), started: make(chan station.Request, 2)}
	u, w, l := newStation(t, p, func(c *ui.Config) { c.Ports = []string{"/dev/ttyACM0", "/dev/ttyACM1"} })
	if len(u.Station.Slots) != 2 {
		t.Fatalf("%d slots, want 2", len(u.Station.Slots))
	}
	a, b := u.Station.Slots[0], u.Station.Slots[1]
	within(t, 2*time.Second, "scanning on slot 1", func() { scan(a.Scan, "SN-000501") })
	within(t, 2*time.Second, "scanning on slot 2 while slot 1 runs", func() { scan(b.Scan, "SN-000502") })
	ports := map[string]string{}
	for range 2 {
		select {
		case r := <-p.started:
			ports[r.Port] = r.Serial
		case <-time.After(5 * time.Second):
			t.Fatal("both runs did not start: the slots do not run in parallel")
		}
	}
	if ports["/dev/ttyACM0"] != "SN-000501" || ports["/dev/ttyACM1"] != "SN-000502" {
		t.Errorf("runs by port %v", ports)
	}
	l.until(t, 5*time.Second, "both running", func() bool {
		va, _ := a.Verdict()
		vb, _ := b.Verdict()
		return va == "RUNNING" && vb == "RUNNING" && a.CurrentStep() == "Connect" && b.CurrentStep() == "Connect"
	})
	l.settle()
	assertMarkup(t, "station_two_slots.xml", w)
	close(p.gate)
	l.until(t, 5*time.Second, "both PASS", func() bool {
		va, sa := a.Verdict()
		vb, sb := b.Verdict()
		return va == "PASS" && vb == "PASS" && sa == "SN-000501" && sb == "SN-000502"
	})
	for _, sl := range []*ui.Slot{a, b} {
		for _, s := range station.TPMSteps {
			if sl.StepDurations()[s] == "" {
				t.Errorf("a slot shows no duration for %s: %v", s, sl.StepDurations())
			}
		}
	}
	if pass, fail := u.Station.Counts(); pass != 2 || fail != 0 {
		t.Errorf("counts %d %d, want 2 0", pass, fail)
	}

	// A FAIL on slot 2 leaves slot 1's PASS alone and slot 1 takes the next unit.
	p.gate = nil
	p.failAt, p.failErr = station.StepReadEK, errDropped
	scan(b.Scan, "SN-000503")
	l.until(t, 5*time.Second, "slot 2 FAIL", func() bool { v, _ := b.Verdict(); return v == "FAIL" })
	if v, s := a.Verdict(); v != "PASS" || s != "SN-000501" {
		t.Errorf("slot 1 shows %s %s after slot 2 failed", v, s)
	}
	p.failAt = ""
	scan(a.Scan, "SN-000504")
	l.until(t, 5*time.Second, "slot 1 PASS", func() bool { v, s := a.Verdict(); return v == "PASS" && s == "SN-000504" })
	if v, _ := b.Verdict(); v != "FAIL" {
		t.Errorf("slot 2 shows %s, want its FAIL until acknowledged", v)
	}
}

// TestPortPicker: the slot lists the USB serial ports cmd/kiln found,
// with their VID, PID and serial number; picking one runs the unit on its
// path, and a typed path works as well. A listing that fails says so.
func TestPortPicker(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base(), started: make(chan station.Request, 2)}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Ports = []string{""}
		c.ListPorts = func() ([]ui.Port, error) {
			return []ui.Port{{Path: "/dev/ttyACM0", Description: "USB 2e8a:000a SN E6614103"}, {Path: "/dev/ttyUSB3"}}, nil
		}
	})
	sl := u.Station.Slots[0]
	l.until(t, 5*time.Second, "the ports listed", func() bool { return len(sl.PortOptions()) == 2 })
	if want := []string{"/dev/ttyACM0  (USB 2e8a:000a SN E6614103)", "/dev/ttyUSB3"}; !slices.Equal(sl.PortOptions(), want) {
		t.Errorf("options %q, want %q", sl.PortOptions(), want)
	}
	scan(sl.Scan, "SN-000701")
	l.settle()
	if !strings.Contains(sl.Note(), "Pick the slot's serial port") || len(p.started) != 0 {
		t.Fatalf("a scan with no port: note %q", sl.Note())
	}
	sl.Port.SetText(sl.PortOptions()[0]) // what picking the option does
	scan(sl.Scan, "SN-000701")
	if req := <-p.started; req.Port != "/dev/ttyACM0" {
		t.Errorf("run on port %q, want /dev/ttyACM0 (without the description)", req.Port)
	}
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })

	sl.Port.SetText("/tmp/pty-custom ")
	scan(sl.Scan, "SN-000702")
	if req := <-p.started; req.Port != "/tmp/pty-custom" {
		t.Errorf("run on port %q, want the typed /tmp/pty-custom", req.Port)
	}
	l.until(t, 5*time.Second, "PASS", func() bool { _, s := sl.Verdict(); return s == "SN-000702" })
}

func TestPortPickerListingFails(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.ListPorts = func() ([]ui.Port, error) { return nil, errors.New("permission denied on /dev") }
	})
	sl := u.Station.Slots[0]
	l.until(t, 5*time.Second, "the note", func() bool { return strings.Contains(sl.Note(), "permission denied") })
	if !strings.Contains(sl.Note(), "type the port's path") {
		t.Errorf("note %q does not say what to do", sl.Note())
	}
}
