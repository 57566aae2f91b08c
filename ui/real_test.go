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
	u, err := ui.New(ui.Config{Provisioner: p, Records: store, Station: "ui-test", Ports: []string{dut.Path()}, Operator: "alice", Do: l.Do})
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
