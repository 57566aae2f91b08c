package ui_test

import (
	"strings"
	"sync"
	"testing"
	"time"

	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// ports is a fake port presence: the ports plugged in.
type ports struct {
	mu      sync.Mutex
	present map[string]bool
	polled  chan string
}

func (p *ports) set(port string, in bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.present[port] = in
}

func (p *ports) Present(port string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case p.polled <- port:
	default:
	}
	return p.present[port]
}

// TestStationWaitsForUnplug: after a PASS the slot asks for the unit to be
// removed and refuses the next scan until its port disappears.
func TestStationWaitsForUnplug(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base()}
	pp := &ports{present: map[string]bool{"/dev/ttyACM0": true}, polled: make(chan string, 1)}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Unplug = func(int) *ui.Unplug { return &ui.Unplug{Present: pp.Present} }
		c.UnplugEvery = 5 * time.Millisecond
	})
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-000401")
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
	if !sl.AwaitingRemoval() || sl.CurrentStep() != "Remove the unit" || sl.Removed.Visible() {
		t.Errorf("after PASS: awaiting %v, step %q, button shown %v; want awaiting, Remove the unit, no button", sl.AwaitingRemoval(), sl.CurrentStep(), sl.Removed.Visible())
	}
	<-pp.polled // polled while the unit is in
	scan(sl.Scan, "SN-000402")
	l.settle()
	if p.runs != 1 || !strings.Contains(sl.Note(), "Remove the unit") {
		t.Errorf("runs %d, note %q: the next scan must wait for the removal", p.runs, sl.Note())
	}
	if v, serial := sl.Verdict(); v != "PASS" || serial != "SN-000401" {
		t.Errorf("verdict %q %q, want the PASS of SN-000401 kept", v, serial)
	}

	pp.set("/dev/ttyACM0", false)
	l.until(t, 5*time.Second, "the removal", func() bool { return !sl.AwaitingRemoval() })
	if sl.CurrentStep() != "Scan the next unit" {
		t.Errorf("step %q after removal", sl.CurrentStep())
	}
	pp.set("/dev/ttyACM0", true)
	scan(sl.Scan, "SN-000402")
	l.until(t, 5*time.Second, "the second PASS", func() bool { _, s := sl.Verdict(); v, _ := sl.Verdict(); return s == "SN-000402" && v == "PASS" })
	if p.runs != 2 {
		t.Errorf("%d runs, want 2", p.runs)
	}
}

// TestStationUnplugConfirmed: with no presence to watch, a FAIL is
// acknowledged and the removal confirmed with the button before the next
// scan runs.
func TestStationUnplugConfirmed(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base(), failAt: station.StepReadEK, failErr: errDropped}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Unplug = func(int) *ui.Unplug { return &ui.Unplug{} }
	})
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-000501")
	l.until(t, 5*time.Second, "FAIL", func() bool { v, _ := sl.Verdict(); return v == "FAIL" })
	if !sl.Removed.Visible() {
		t.Fatal("no Unit removed button")
	}
	scan(sl.Scan, "") // acknowledges the FAIL
	if v, _ := sl.Verdict(); v != "READY" || sl.CurrentStep() != "Remove the unit" {
		t.Errorf("after the acknowledgement: verdict %q step %q, want READY and Remove the unit", v, sl.CurrentStep())
	}
	p.failAt = ""
	scan(sl.Scan, "SN-000502")
	l.settle()
	if p.runs != 1 {
		t.Fatalf("%d runs: a scan before the removal is confirmed must be refused", p.runs)
	}
	test.Tap(sl.Removed)
	if sl.AwaitingRemoval() || sl.Removed.Visible() {
		t.Error("still waiting after Unit removed")
	}
	scan(sl.Scan, "SN-000502")
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
}
