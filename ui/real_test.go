package ui_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
	"github.com/kilnworks/kiln/ui"
)

// realStation is the GUI around the real provisioner: a simulated DUT (the
// agent and the reference TPM simulator on a pty), the DUT link, hsm and a
// SQLite store.
func realStation(t *testing.T, serial string, faults fixtures.DUTFaults) (*ui.UI, *loop, *sqlite.Store, string) {
	t.Helper()
	return realStationWith(t, serial, faults, nil)
}

// realStationWith is realStation with edit applied to the provisioner and
// the GUI's configuration before the GUI is built.
func realStationWith(t *testing.T, serial string, faults fixtures.DUTFaults, edit func(*station.Provisioner, *ui.Config, *sqlite.Store)) (*ui.UI, *loop, *sqlite.Store, string) {
	t.Helper()
	ctx := t.Context()
	tpm, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	if err := fixtures.Manufacture(ctx, tpm, nil); err != nil {
		t.Fatal(err)
	}
	dut, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{Info: station.DeviceInfo{Serial: serial, Model: "ui-test"}, TPM: tpm, LineRate: -1, Faults: faults})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dut.Close() })
	store, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	p := &station.Provisioner{
		Store: store,
		Dial: func(ctx context.Context, port string) (station.Link, error) {
			return link.Open(ctx, port, link.Config{})
		},
		Endorser: hsm.Endorser{},
		Profile:  station.Profile{Station: "ui-test", Method: station.MethodTPM, RegID: station.RegIDFromEK, EKCertPolicy: station.EKCertOff},
	}

	test.NewTempApp(t)
	l := newLoop()
	cfg := ui.Config{Provisioner: p, Records: store, Station: "ui-test", Ports: []string{dut.Path()}, Operator: "alice", Do: l.Do}
	if edit != nil {
		edit(p, &cfg, store)
	}
	u, err := ui.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.OnStep = u.Step
	w := test.NewTempWindow(t, u.Content())
	w.Resize(fyne.NewSize(1280, 800))
	t.Cleanup(func() {
		done := make(chan struct{})
		go func() { u.Close(); close(done) }()
		for {
			select {
			case <-done:
				return
			case f := <-l.q:
				f()
			}
		}
	})
	l.settle()
	return u, l, store, dut.Path()
}

func TestStationRealProvisionerPass(t *testing.T) {
	u, l, store, _ := realStation(t, "SN-REAL-01", fixtures.DUTFaults{})
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-REAL-01")
	l.until(t, 20*time.Second, "a verdict", func() bool { v, _ := sl.Verdict(); return v == "PASS" || v == "FAIL" })
	if v, serial := sl.Verdict(); v != "PASS" || serial != "SN-REAL-01" {
		_, reason := sl.Reason()
		t.Fatalf("verdict %s %s: %s", v, serial, reason)
	}
	durs := sl.StepDurations()
	for _, s := range station.TPMSteps {
		if s == station.StepValidateEK {
			continue // skipped under policy off
		}
		if durs[s] == "" {
			t.Errorf("step %s shows no duration: %v", s, durs)
		}
	}
	u2, err := store.UnitBySerial(t.Context(), "SN-REAL-01")
	if err != nil {
		t.Fatalf("the unit the GUI passed is not recorded: %v", err)
	}
	if u2.Operator != "alice" {
		t.Errorf("operator on the record %q, want the logged-in alice", u2.Operator)
	}
}

func TestStationRealProvisionerDropOut(t *testing.T) {
	u, l, store, port := realStation(t, "SN-REAL-02", fixtures.DUTFaults{DropAfter: 2})
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-REAL-02")
	l.until(t, 30*time.Second, "a verdict", func() bool { v, _ := sl.Verdict(); return v == "PASS" || v == "FAIL" })
	v, _ := sl.Verdict()
	_, reason := sl.Reason()
	if v != "FAIL" || !strings.Contains(reason, port) {
		t.Fatalf("a DUT that drops out: verdict %s, reason %q (want FAIL naming %s)", v, reason, port)
	}
	runs, err := store.Runs(t.Context(), station.RunFilter{Serial: "SN-REAL-02"})
	if err != nil || len(runs) != 1 || runs[0].Result != station.ResultFail {
		t.Fatalf("the failed run is not recorded as a FAIL: %v %+v", err, runs)
	}
	scan(sl.Scan, "") // acknowledge
	if v, _ := sl.Verdict(); v != "READY" {
		t.Errorf("after acknowledging: %s, want READY", v)
	}
}

// TestRealUnitJoinsBatch: a unit that passes on the real provisioner joins
// the open batch in SQLite, and the Batches screen shows it there; a
// supervisor seals the batch.
func TestRealUnitJoinsBatch(t *testing.T) {
	u, l, store, _ := realStationWith(t, "SN-REAL-03", fixtures.DUTFaults{}, func(p *station.Provisioner, c *ui.Config, s *sqlite.Store) {
		p.Batches = s
		c.Batches = newBatchActions(s)
		c.Role = ui.RoleSupervisor
	})
	sl := u.Station.Slots[0]
	scan(sl.Scan, "SN-REAL-03")
	l.until(t, 20*time.Second, "a verdict", func() bool { v, _ := sl.Verdict(); return v == "PASS" || v == "FAIL" })
	if v, _ := sl.Verdict(); v != "PASS" {
		_, reason := sl.Reason()
		t.Fatalf("verdict %s: %s", v, reason)
	}
	b := u.Batches
	u.Tabs.SelectIndex(2) // Station, Records, Batches
	l.until(t, 5*time.Second, "the open batch", func() bool { return b.Selected() != nil })
	bt := b.Selected()
	if bt.State != station.BatchOpen || bt.Units != 1 {
		t.Fatalf("batch shown %+v, want open with 1 unit", bt)
	}
	units, err := store.BatchUnits(t.Context(), bt.ID)
	if err != nil || len(units) != 1 || units[0].Serial != "SN-REAL-03" {
		t.Fatalf("the batch's units in the store: %v %+v", err, units)
	}
	test.Tap(b.Seal)
	l.until(t, 5*time.Second, "sealed", func() bool { return b.Selected().State == station.BatchSealed })
}
