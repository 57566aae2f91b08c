package ui_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// assertMarkup compares the window's markup with testdata/name, or
// rewrites the master with -update.
func assertMarkup(t *testing.T, name string, w fyne.Window) {
	t.Helper()
	if *update {
		path := filepath.Join("testdata", name)
		if err := os.WriteFile(path, []byte(test.RenderToMarkup(w.Canvas())), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	test.AssertRendersToMarkup(t, name, w.Canvas())
}

func TestStationIdle(t *testing.T) {
	p := &scripted{steps: station.EndToEndSteps, base: base()}
	u, w, _ := newStation(t, p, nil)
	sl := u.Station.Slots[0]
	if v, _ := sl.Verdict(); v != "READY" {
		t.Errorf("verdict %q, want READY", v)
	}
	if got := u.Station.HealthAbnormal(); len(got) != 0 {
		t.Errorf("abnormal health tiles %v, want none", got)
	}
	if got, want := len(sl.StepDurations()), len(station.EndToEndSteps); got != want {
		t.Errorf("%d step rows, want %d (Provisioner.Steps)", got, want)
	}
	assertMarkup(t, "station_idle.xml", w)
}

// TestStationScanPass: a scan (the serial and Enter, as a barcode wedge
// types them) starts a run whose steps show with their durations, and the
// PASS is shown with the serial; the next scan is accepted directly.
func TestStationScanPass(t *testing.T) {
	p := &scripted{steps: station.EndToEndSteps, base: base()}
	u, w, l := newStation(t, p, nil)
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-000101")
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
	if _, serial := sl.Verdict(); serial != "SN-000101" {
		t.Errorf("serial shown %q, want SN-000101", serial)
	}
	durs := sl.StepDurations()
	for i, s := range station.EndToEndSteps {
		if want := itoa(int64(12*(i+1))) + " ms"; durs[s] != want {
			t.Errorf("step %s shows %q, want %q", s, durs[s], want)
		}
	}
	if pass, fail := u.Station.Counts(); pass != 1 || fail != 0 {
		t.Errorf("shift counts pass %d fail %d, want 1 0", pass, fail)
	}
	if got := u.Station.LastResults(); !slices.Equal(got, []string{"SN-000101 pass"}) {
		t.Errorf("last results %v", got)
	}
	l.settle()
	assertMarkup(t, "station_pass.xml", w)

	// A PASS needs no acknowledgement: the next scan runs.
	scan(sl.Scan, "SN-000102")
	l.until(t, 5*time.Second, "the second PASS", func() bool {
		_, s := sl.Verdict()
		return s == "SN-000102" && sl.CurrentStep() != "Starting…" && u.Station.LastResults()[0] == "SN-000102 pass"
	})
	if fpy, n := u.Station.FirstPassYield(); fpy != 1 || n != 2 {
		t.Errorf("first-pass yield %v of %d units, want 1 of 2", fpy, n)
	}
}

// TestStationFailAcknowledged: a FAIL turns the result red with the reason,
// sounds the alert, and refuses the next scan until it is acknowledged.
func TestStationFailAcknowledged(t *testing.T) {
	p := &scripted{steps: station.EndToEndSteps, base: base(), failAt: station.StepReadEK, failErr: errDropped}
	var alerts atomic.Int32
	u, w, l := newStation(t, p, func(c *ui.Config) { c.Alert = func() { alerts.Add(1) } })
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-000201")
	l.until(t, 5*time.Second, "FAIL", func() bool { v, _ := sl.Verdict(); return v == "FAIL" })
	headline, reason := sl.Reason()
	if !strings.Contains(headline, "check the cable") || reason != errDropped.Error() {
		t.Errorf("headline %q reason %q", headline, reason)
	}
	l.settle()
	assertMarkup(t, "station_fail.xml", w)
	for i := 0; alerts.Load() == 0 && i < 100; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if alerts.Load() != 1 {
		t.Errorf("%d alerts, want 1", alerts.Load())
	}

	// A scan does not acknowledge: it is refused and the FAIL stays.
	scan(sl.Scan, "SN-000202")
	l.settle()
	if v, _ := sl.Verdict(); v != "FAIL" || !strings.Contains(sl.Note(), "Acknowledge the failure first") {
		t.Errorf("after a scan on a FAIL: verdict %q, note %q", v, sl.Note())
	}
	if p.runs != 1 {
		t.Errorf("%d runs, want 1: a FAIL must be acknowledged before the next scan", p.runs)
	}
	// Enter on the empty field acknowledges; then the scan runs.
	scan(sl.Scan, "")
	if v, _ := sl.Verdict(); v != "READY" {
		t.Fatalf("after Enter: verdict %q, want READY", v)
	}
	p.failAt = ""
	scan(sl.Scan, "SN-000202")
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })

	// The button acknowledges too.
	p.failAt = station.StepReadEK
	scan(sl.Scan, "SN-000203")
	l.until(t, 5*time.Second, "FAIL", func() bool { v, _ := sl.Verdict(); return v == "FAIL" })
	test.Tap(sl.Ack)
	if v, _ := sl.Verdict(); v != "READY" {
		t.Errorf("after the button: verdict %q, want READY", v)
	}
	if pass, fail := u.Station.Counts(); pass != 1 || fail != 2 {
		t.Errorf("counts pass %d fail %d, want 1 2", pass, fail)
	}
}

// TestStationDuplicate: a Conflict from the duplicate check is shown as
// DUPLICATE, not as a plain FAIL.
func TestStationDuplicate(t *testing.T) {
	dup := station.Errorf("check duplicates", station.KindConflict, "serial SN-1 was already provisioned in run 3: a unit is provisioned once; check the label")
	p := &scripted{steps: station.TPMSteps, base: base(), failAt: station.StepDuplicates, failErr: dup}
	u, _, l := newStation(t, p, nil)
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-1")
	l.until(t, 5*time.Second, "a verdict", func() bool { v, _ := sl.Verdict(); return v != "RUNNING" && v != "READY" })
	if v, _ := sl.Verdict(); v != "DUPLICATE" {
		t.Errorf("verdict %q, want DUPLICATE", v)
	}
}

// TestStationSerialPattern: a scan that does not match the product's
// serial format starts nothing.
func TestStationSerialPattern(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) { c.SerialPattern = regexpMust(`^SN-[0-9]{6}$`) })
	sl := u.Station.Slots[0]
	scan(sl.Scan, "XY-12")
	l.settle()
	if p.runs != 0 || !strings.Contains(sl.Note(), "rescan") {
		t.Errorf("runs %d, note %q: a malformed serial must be refused", p.runs, sl.Note())
	}
	scan(sl.Scan, "SN-123456")
	l.until(t, 5*time.Second, "PASS", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
}

// TestStationDoesNotBlock: while a provisioning run is blocked (a TPM or a
// link that takes its time), the UI goroutine keeps serving the operator:
// typing, tapping, switching screens. The test fails if the run blocks it.
func TestStationDoesNotBlock(t *testing.T) {
	p := &scripted{steps: station.EndToEndSteps, base: base(), gate: make(chan struct{}), started: make(chan station.Request, 1)}
	recs := &memRecords{}
	u, _, l := newStation(t, p, func(c *ui.Config) { c.Records = recs })
	sl := u.Station.Slots[0]

	within(t, 2*time.Second, "typing a scan", func() { scan(sl.Scan, "SN-000301") })
	select {
	case <-p.started:
	case <-time.After(5 * time.Second):
		t.Fatal("the run did not start")
	}
	l.until(t, 5*time.Second, "the first step shown", func() bool { return sl.CurrentStep() == "Connect" })
	if v, _ := sl.Verdict(); v != "RUNNING" {
		t.Errorf("verdict %q while running, want RUNNING", v)
	}

	// The run is blocked in its first step. The UI answers.
	within(t, 2*time.Second, "typing the operator's name", func() {
		u.Operator.SetText("")
		test.Type(u.Operator, "bob")
	})
	if got := u.OperatorName(); got != "bob" {
		t.Errorf("operator %q, want bob", got)
	}
	within(t, 2*time.Second, "switching to Records", func() { u.Tabs.SelectIndex(1) })
	within(t, 2*time.Second, "typing a search", func() { test.Type(u.Records.Serial, "SN-0") })
	if u.Records.Serial.Text != "SN-0" {
		t.Errorf("search field %q", u.Records.Serial.Text)
	}
	within(t, 2*time.Second, "a scan on the running slot", func() { scan(sl.Scan, "SN-000302") })
	if p.runs != 1 {
		t.Errorf("%d runs started, want 1", p.runs)
	}
	within(t, 2*time.Second, "switching back", func() { u.Tabs.SelectIndex(0) })

	close(p.gate)
	l.until(t, 5*time.Second, "PASS after the release", func() bool { v, _ := sl.Verdict(); return v == "PASS" })
	if _, serial := sl.Verdict(); serial != "SN-000301" {
		t.Errorf("serial %q", serial)
	}
}

// TestStationOperatorRequired: no run without an operator name.
func TestStationOperatorRequired(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) { c.Operator = "" })
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-1")
	l.settle()
	if p.runs != 0 || !strings.Contains(sl.Note(), "Operator") {
		t.Errorf("runs %d, note %q", p.runs, sl.Note())
	}
}

// TestStationHealthAbnormal: a failing health check colours its tile.
func TestStationHealthAbnormal(t *testing.T) {
	p := &scripted{steps: station.TPMSteps, base: base()}
	down := station.Errorf("records store", station.KindUnavailable, "the database is locked: close other kiln programs")
	u, _, _ := newStation(t, p, func(c *ui.Config) {
		c.Health[3].Check = func(ctx contextT) error { return down }
	})
	if got := u.Station.HealthAbnormal(); !slices.Equal(got, []string{"Records store"}) {
		t.Errorf("abnormal tiles %v, want [Records store]", got)
	}
}
