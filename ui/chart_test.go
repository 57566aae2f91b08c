package ui_test

import (
	"sync/atomic"
	"testing"
	"time"

	"fyne.io/fyne/v2/test"
	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// clock is a settable ui.Config.Now.
type clock struct{ t atomic.Int64 }

func (c *clock) set(t time.Time)   { c.t.Store(t.UnixNano()) }
func (c *clock) now() time.Time    { return time.Unix(0, c.t.Load()).In(time.Local) }
func at(h, m int) time.Time        { return time.Date(2025, 3, 4, h, m, 0, 0, time.Local) }
func hour(h int) time.Time         { return at(h, 0) }
func bars(u *ui.UI) []ui.HourCount { return u.Station.UnitsPerHour() }
func runAt(t *testing.T, u *ui.UI, l *loop, serial string) {
	t.Helper()
	sl := u.Station.Slots[0]
	sl.Ack.OnTapped() // a FAIL before needs acknowledging; a no-op otherwise
	scan(sl.Scan, serial)
	l.until(t, 5*time.Second, serial+"'s verdict", func() bool {
		_, s := sl.Verdict()
		v, _ := sl.Verdict()
		return s == serial && (v == "PASS" || v == "FAIL")
	})
}

// TestStationUnitsPerHour: runs across two hours land in their hour's bar,
// passes and failures apart, and the store's runs of the shift are counted
// at start.
func TestStationUnitsPerHour(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base()}
	var c clock
	c.set(at(8, 10))
	recs := &memRecords{runs: []*station.Run{ // newest first, as the store returns them
		{ID: 91, Serial: "SN-H2", Result: station.ResultFail, Started: at(7, 50), Finished: at(7, 51)},
		{ID: 90, Serial: "SN-H1", Result: station.ResultPass, Started: at(7, 40), Finished: at(7, 41)},
		{ID: 89, Serial: "SN-OLD", Result: station.ResultPass, Started: at(5, 0), Finished: at(5, 1)}, // an earlier shift
	}}
	p.runs = 100 // run IDs of this session follow the store's
	u, _, l := newStation(t, p, func(cfg *ui.Config) {
		cfg.Now = c.now
		cfg.ShiftStart = hour(6)
		cfg.Records = recs
	})
	l.until(t, 5*time.Second, "the shift's history counted", func() bool { pass, fail := u.Station.Counts(); return pass+fail == 2 })

	runAt(t, u, l, "SN-000001")
	p.failAt, p.failErr = station.StepReadEK, errDropped
	runAt(t, u, l, "SN-000002")
	p.failAt = ""
	runAt(t, u, l, "SN-000003")
	c.set(at(9, 20))
	runAt(t, u, l, "SN-000002") // the failed unit again
	p.failAt = station.StepReadEK
	runAt(t, u, l, "SN-000004")

	want := []ui.HourCount{
		{Hour: hour(6)}, // the shift's first hour, empty
		{Hour: hour(7), Pass: 1, Fail: 1},
		{Hour: hour(8), Pass: 2, Fail: 1},
		{Hour: hour(9), Pass: 1, Fail: 1},
	}
	if diff := cmp.Diff(want, bars(u)); diff != "" {
		t.Errorf("units per hour (-want +got):\n%s", diff)
	}
	if pass, fail := u.Station.Counts(); pass != 4 || fail != 3 {
		t.Errorf("counts pass %d fail %d, want 4 3", pass, fail)
	}

	// A reset (supervisor) starts a new shift: an empty chart from now.
	u.Role.SetSelected(string(ui.RoleSupervisor))
	test.Tap(u.Station.Reset)
	if diff := cmp.Diff([]ui.HourCount{{Hour: hour(9)}}, bars(u)); diff != "" {
		t.Errorf("after a reset (-want +got):\n%s", diff)
	}
}
