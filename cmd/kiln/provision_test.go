package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// testDUT is a simulated DUT on a real pty with a real (simulated) TPM.
type testDUT struct {
	path   string
	serial string
	ek     *hsm.Key
	roots  string // folder holding the root of the CA that signed its EK certificate
}

type dutOpts struct {
	serial   string
	seed     int64 // non-zero: a seeded simulator (same seed, same EK)
	noCert   bool
	faults   fixtures.DUTFaults
	lineRate int
}

// startDUT starts a simulated DUT and stops it when the test ends. Only one
// simulator exists per process: stop the previous DUT first (closeDUT).
func startDUT(t *testing.T, o dutOpts) (*testDUT, func()) {
	t.Helper()
	ctx := t.Context()
	var tpm transport.TPMCloser
	var err error
	if o.seed != 0 {
		tpm, err = tpmsim.OpenSeeded(o.seed)
	} else {
		tpm, err = tpmsim.Open()
	}
	if err != nil {
		t.Fatal(err)
	}
	d := &testDUT{serial: o.serial}
	var ca *fixtures.CA
	if !o.noCert {
		if ca, err = fixtures.NewCA("test TPM maker " + t.Name()); err != nil {
			t.Fatal(err)
		}
		d.roots = t.TempDir()
		if _, err := ca.WritePEM(d.roots); err != nil {
			t.Fatal(err)
		}
	}
	if err := fixtures.Manufacture(ctx, tpm, ca); err != nil {
		t.Fatal(err)
	}
	if d.ek, err = hsm.New(tpm).EK(ctx); err != nil {
		t.Fatal(err)
	}
	rate := o.lineRate
	if rate == 0 {
		rate = -1
	}
	dut, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{
		Info:     station.DeviceInfo{Serial: o.serial, Model: "test-model", Firmware: "1.2.3"},
		TPM:      tpm,
		LineRate: rate,
		Faults:   o.faults,
	})
	if err != nil {
		tpm.Close()
		t.Fatal(err)
	}
	d.path = dut.Path()
	var closed bool
	stop := func() {
		if !closed {
			closed = true
			dut.Close()
			tpm.Close()
		}
	}
	t.Cleanup(stop)
	return d, stop
}

// kiln runs one kiln command line in-process against the data dir home.
func kiln(t *testing.T, home string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	e := &env{stdout: &out, stderr: &errb, getenv: func(k string) string {
		switch k {
		case "KILN_HOME":
			return home
		case "USER":
			return "tester"
		}
		return ""
	}}
	code = run(t.Context(), args, e)
	return code, out.String(), errb.String()
}

// provisionJSON runs kiln provision --json; without the end-to-end check
// unless args ask for it (--verify embedded).
func provisionJSON(t *testing.T, home string, args ...string) (int, runRecord, string) {
	t.Helper()
	if !slices.Contains(args, "--verify") {
		args = append(args, "--verify", "off")
	}
	code, out, errOut := kiln(t, home, append([]string{"provision", "--json"}, args...)...)
	var rr runRecord
	if err := json.Unmarshal([]byte(out), &rr); err != nil {
		t.Fatalf("provision --json printed no JSON (exit %d): %v\nstdout: %s\nstderr: %s", code, err, out, errOut)
	}
	return code, rr, errOut
}

func openStore(t *testing.T, home string) *sqlite.Store {
	t.Helper()
	s, err := sqlite.Open(context.Background(), filepath.Join(home, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func stepStatuses(r *station.Run) map[string]station.StepStatus {
	m := map[string]station.StepStatus{}
	for _, s := range r.Steps {
		m[s.Name] = s.Status
	}
	return m
}

func TestProvisionTPMEndToEnd(t *testing.T) {
	home := t.TempDir()
	d, _ := startDUT(t, dutOpts{serial: "SN-000101", lineRate: 115200})

	code, rr, stderr := provisionJSON(t, home, "--port", d.path, "--ek-cert-policy", "require", "--roots", d.roots, "--operator", "alice")
	if code != exitPass || rr.Result != station.ResultPass {
		t.Fatalf("exit %d, result %s, error %q\nstderr: %s", code, rr.Result, rr.Error, stderr)
	}
	var names []string
	for _, s := range rr.Steps {
		names = append(names, s.Name)
		if s.Status != station.StepOK {
			t.Errorf("step %s: %s %s", s.Name, s.Status, s.Error)
		}
		if s.Duration <= 0 {
			t.Errorf("step %s has no duration", s.Name)
		}
	}
	if got, want := strings.Join(names, ","), strings.Join(station.TPMSteps, ","); got != want {
		t.Errorf("steps %s, want %s", got, want)
	}
	if rr.Serial != d.serial || rr.Operator != "alice" || rr.Model != "test-model" {
		t.Errorf("run identity: serial %q operator %q model %q", rr.Serial, rr.Operator, rr.Model)
	}
	if rr.BytesOut == 0 || rr.BytesIn <= rr.BytesOut {
		t.Errorf("link byte counts out %d in %d: the EK and its certificate must come in", rr.BytesOut, rr.BytesIn)
	}

	s := openStore(t, home)
	u, err := s.UnitBySerial(t.Context(), d.serial)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(u.EKPublic, d.ek.Public) {
		t.Errorf("recorded EK differs from the simulator's EK")
	}
	if want := station.RegistrationIDFromEK(d.ek.Public); u.RegistrationID != want || rr.RegistrationID != want {
		t.Errorf("registration ID %q (record) %q (run), want %q", u.RegistrationID, rr.RegistrationID, want)
	}
	if len(u.EKCert) == 0 || u.RunID != rr.ID || u.Operator != "alice" {
		t.Errorf("unit record: cert %d bytes, run %d (want %d), operator %q", len(u.EKCert), u.RunID, rr.ID, u.Operator)
	}
	stored, err := s.Run(t.Context(), rr.ID)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Result != station.ResultPass || len(stored.Steps) != len(station.TPMSteps) {
		t.Errorf("stored run: %s with %d steps", stored.Result, len(stored.Steps))
	}

	// The text forms.
	code, out, _ := kiln(t, home, "records", "list")
	if code != exitPass || !strings.Contains(out, d.serial) || !strings.Contains(out, "pass") {
		t.Errorf("records list (exit %d):\n%s", code, out)
	}
	code, out, _ = kiln(t, home, "records", "show", d.serial)
	if code != exitPass || !strings.Contains(out, station.EKHash(d.ek.Public)) {
		t.Errorf("records show (exit %d) lacks the EK hash:\n%s", code, out)
	}
}

func TestProvisionTextOutput(t *testing.T) {
	home := t.TempDir()
	d, _ := startDUT(t, dutOpts{serial: "SN-000102"})
	code, out, _ := kiln(t, home, "provision", "--port", d.path, "--roots", d.roots, "--verify", "off")
	if code != exitPass {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	for _, step := range station.TPMSteps {
		if !strings.Contains(out, "  "+step+" ") {
			t.Errorf("output lacks step %s:\n%s", step, out)
		}
	}
	if !strings.Contains(out, "PASS  SN-000102") {
		t.Errorf("output lacks the PASS line:\n%s", out)
	}
}

func TestProvisionDUTDropsOut(t *testing.T) {
	home := t.TempDir()
	// The DUT answers HELLO and one TPM command, then drops off the line.
	d, stop := startDUT(t, dutOpts{serial: "SN-000201", faults: fixtures.DUTFaults{DropAfter: 2}})
	code, rr, _ := provisionJSON(t, home, "--port", d.path, "--roots", d.roots)
	stop()
	if code != exitFail || rr.Result != station.ResultFail {
		t.Fatalf("exit %d result %s, want a FAIL", code, rr.Result)
	}
	if rr.ErrorKind != "unavailable" {
		t.Errorf("error kind %q, want unavailable: %s", rr.ErrorKind, rr.Error)
	}
	if !strings.Contains(rr.Error, d.path) {
		t.Errorf("the reason should name the port: %q", rr.Error)
	}
	s := openStore(t, home)
	stored, err := s.Run(t.Context(), rr.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := stepStatuses(stored)
	if got[station.StepConnect] != station.StepOK || got[station.StepIdentify] != station.StepOK || got[station.StepReadEK] != station.StepFail {
		t.Errorf("the record should show how far the run got: %v", got)
	}
	if _, ok := got[station.StepRecord]; ok || stored.Result != station.ResultFail || stored.Finished.IsZero() {
		t.Errorf("stored run: result %s, finished %v, steps %v", stored.Result, stored.Finished, got)
	}
	if _, err := s.UnitBySerial(t.Context(), d.serial); station.KindOf(err) != station.KindNotFound {
		t.Errorf("a failed unit must not be recorded as provisioned: %v", err)
	}

	// The station keeps working: the next unit passes.
	d2, _ := startDUT(t, dutOpts{serial: "SN-000202"})
	code, rr, _ = provisionJSON(t, home, "--port", d2.path, "--roots", d2.roots)
	if code != exitPass {
		t.Fatalf("the next unit after a drop-out: exit %d, %s", code, rr.Error)
	}
}

func TestProvisionGarbageOnTheLine(t *testing.T) {
	home := t.TempDir()
	d, _ := startDUT(t, dutOpts{serial: "SN-000301", faults: fixtures.DUTFaults{Garbage: true}})
	code, rr, stderr := provisionJSON(t, home, "--port", d.path, "--roots", d.roots, "--ek-cert-policy", "require")
	if code != exitPass {
		t.Fatalf("garbage on the line: exit %d, %s\n%s", code, rr.Error, stderr)
	}
	if !bytes.Equal(mustUnit(t, home, d.serial).EKPublic, d.ek.Public) {
		t.Error("EK recorded through a noisy line differs from the simulator's EK")
	}
}

func mustUnit(t *testing.T, home, serial string) *station.Unit {
	t.Helper()
	u, err := openStore(t, home).UnitBySerial(t.Context(), serial)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestProvisionDuplicates(t *testing.T) {
	home := t.TempDir()
	a, stop := startDUT(t, dutOpts{serial: "SN-000401", seed: 7})
	if code, rr, _ := provisionJSON(t, home, "--port", a.path, "--roots", a.roots); code != exitPass {
		t.Fatalf("first unit: %s", rr.Error)
	}
	// The same unit again.
	code, rr, _ := provisionJSON(t, home, "--port", a.path, "--roots", a.roots)
	if code != exitFail || rr.ErrorKind != "conflict" || !strings.Contains(rr.Error, "SN-000401") {
		t.Errorf("same unit twice: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
	stop()

	// A clone: another serial, the same TPM seed, so the same EK.
	b, _ := startDUT(t, dutOpts{serial: "SN-000402", seed: 7})
	if !bytes.Equal(a.ek.Public, b.ek.Public) {
		t.Fatal("seeded simulators should share their EK")
	}
	code, rr, _ = provisionJSON(t, home, "--port", b.path, "--roots", b.roots)
	if code != exitFail || rr.ErrorKind != "conflict" {
		t.Fatalf("clone: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
	if !strings.Contains(rr.Error, "SN-000401") || !strings.Contains(rr.Error, "SN-000402") {
		t.Errorf("the duplicate-EK failure must name both units: %s", rr.Error)
	}
	if got := stepStatuses(rr.Run)[station.StepDuplicates]; got != station.StepFail {
		t.Errorf("check-duplicates step: %s", got)
	}
}

func TestProvisionEKCertPolicy(t *testing.T) {
	other, err := fixtures.NewCA("another TPM maker")
	if err != nil {
		t.Fatal(err)
	}
	wrongRoots := t.TempDir()
	if _, err := other.WritePEM(wrongRoots); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		noCert   bool
		policy   string
		wantCode int
		wantStep station.StepStatus
		wantKind string
	}{
		{"wrong root under require", false, "require", exitFail, station.StepFail, "unauthorized"},
		{"wrong root under warn", false, "warn", exitPass, station.StepWarn, ""},
		{"wrong root under off", false, "off", exitPass, station.StepSkip, ""},
		{"no certificate under require", true, "require", exitFail, station.StepFail, "not_found"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			home := t.TempDir()
			d, _ := startDUT(t, dutOpts{serial: "SN-00050" + string(rune('1'+i)), noCert: tt.noCert})
			code, rr, _ := provisionJSON(t, home, "--port", d.path, "--roots", wrongRoots, "--ek-cert-policy", tt.policy)
			if code != tt.wantCode || rr.ErrorKind != tt.wantKind {
				t.Fatalf("exit %d kind %q (%s), want %d %q", code, rr.ErrorKind, rr.Error, tt.wantCode, tt.wantKind)
			}
			if got := stepStatuses(rr.Run)[station.StepValidateEK]; got != tt.wantStep {
				t.Errorf("validate step %s, want %s", got, tt.wantStep)
			}
		})
	}
}

func TestProvisionSerialChecks(t *testing.T) {
	home := t.TempDir()
	d, _ := startDUT(t, dutOpts{serial: "SN-000601"})
	code, rr, _ := provisionJSON(t, home, "--port", d.path, "--serial", "SN-999999", "--roots", d.roots)
	if code != exitFail || rr.ErrorKind != "conflict" || !strings.Contains(rr.Error, "SN-999999") || !strings.Contains(rr.Error, "SN-000601") {
		t.Errorf("scanned serial differs from the DUT's: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
	code, rr, _ = provisionJSON(t, home, "--port", d.path, "--serial-pattern", `^XX-\d+$`, "--roots", d.roots)
	if code != exitFail || rr.ErrorKind != "invalid" {
		t.Errorf("serial format: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
	code, rr, _ = provisionJSON(t, home, "--port", d.path, "--serial", "sn-000601", "--regid", "serial", "--roots", d.roots)
	if code != exitPass || rr.RegistrationID != "sn-000601" {
		t.Errorf("registration ID from the serial: exit %d regid %q: %s", code, rr.RegistrationID, rr.Error)
	}
}

func TestUsageErrors(t *testing.T) {
	home := t.TempDir()
	for _, args := range [][]string{
		{"provision"},
		{"provision", "--port", "/dev/null", "--ek-cert-policy", "maybe"},
		{"records"},
		{"records", "show"},
		{"nonsense"},
	} {
		if code, _, _ := kiln(t, home, args...); code != exitUsage {
			t.Errorf("kiln %v: exit %d, want %d", args, code, exitUsage)
		}
	}
	if err := os.WriteFile(filepath.Join(home, configFile), []byte(`{"ek_cert_polcy":"require"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := kiln(t, home, "records", "list")
	if code != exitUsage || !strings.Contains(stderr, "ek_cert_polcy") {
		t.Errorf("a misspelt configuration key must be refused, naming it: exit %d %s", code, stderr)
	}
}

func TestProvisionNoSuchPort(t *testing.T) {
	home := t.TempDir()
	code, rr, _ := provisionJSON(t, home, "--port", filepath.Join(t.TempDir(), "ttyNONE"))
	if code != exitFail || rr.Result != station.ResultFail || stepStatuses(rr.Run)[station.StepConnect] != station.StepFail {
		t.Errorf("missing port: exit %d, %+v", code, rr.Run)
	}
}

func TestProvisionEndToEndCheck(t *testing.T) {
	home := t.TempDir()
	prod := station.DeviceConfig{IDScope: "0ne00PROD01", GlobalEndpoint: "global.azure-devices-provisioning.net"}
	cfg, err := json.Marshal(map[string]any{"production": prod})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, configFile), cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	d, _ := startDUT(t, dutOpts{serial: "SN-000701"})
	code, rr, stderr := provisionJSON(t, home, "--port", d.path, "--roots", d.roots, "--ek-cert-policy", "require", "--verify", "embedded")
	if code != exitPass {
		t.Fatalf("exit %d: %s\nsteps: %+v\n%s", code, rr.Error, rr.Steps, stderr)
	}
	var names []string
	for _, s := range rr.Steps {
		names = append(names, s.Name)
		if s.Status != station.StepOK {
			t.Errorf("step %s: %s %s", s.Name, s.Status, s.Error)
		}
	}
	if got, want := strings.Join(names, ","), strings.Join(station.EndToEndSteps, ","); got != want {
		t.Errorf("steps %s, want %s", got, want)
	}
	if rr.DPSStatus != "assigned" || rr.AssignedHub == "" || rr.DeviceID != rr.RegistrationID || rr.TelemetryAt.IsZero() {
		t.Errorf("end-to-end findings: status %q hub %q device %q telemetry %v", rr.DPSStatus, rr.AssignedHub, rr.DeviceID, rr.TelemetryAt)
	}
	if rr.TelemetryAt.Before(rr.Started) || rr.TelemetryAt.After(rr.Finished) {
		t.Errorf("telemetry at %v is outside the run %v–%v", rr.TelemetryAt, rr.Started, rr.Finished)
	}

	// The record holds the DPS result and the time the hub saw telemetry.
	stored, err := openStore(t, home).Run(t.Context(), rr.ID)
	if err != nil {
		t.Fatal(err)
	}
	if stored.DPSStatus != "assigned" || stored.AssignedHub != rr.AssignedHub || !stored.TelemetryAt.Equal(rr.TelemetryAt) {
		t.Errorf("stored run: %q %q %v", stored.DPSStatus, stored.AssignedHub, stored.TelemetryAt)
	}

	// The DUT ships pointing at production.
	l, err := link.Open(t.Context(), d.path, link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got, err := l.ReadConfig(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := prod
	want.RegistrationID = rr.RegistrationID
	if got != want {
		t.Errorf("DUT config after the run:\n got %+v\nwant %+v", got, want)
	}
}

func TestProvisionEndToEndDisabledTPM(t *testing.T) {
	// A DUT whose agent has no TPM cannot pass: it is refused at identify.
	home := t.TempDir()
	dut, err := fixtures.StartDUT(t.Context(), fixtures.DUTConfig{Info: station.DeviceInfo{Serial: "SN-000702"}, LineRate: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer dut.Close()
	code, rr, _ := provisionJSON(t, home, "--port", dut.Path(), "--verify", "embedded")
	if code != exitFail || rr.ErrorKind != "invalid" || !strings.Contains(rr.Error, "no TPM") {
		t.Errorf("DUT without TPM: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
}
