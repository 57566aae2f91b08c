package main

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnworks/kiln/qa"
	"github.com/kilnworks/kiln/station"
)

// TestMain lets the test binary be kiln: `kiln qa run` starts its
// simulated DUTs as `kiln simulate` child processes of os.Executable(),
// which is this binary under go test.
// (Fuzzing workers are children of the test binary too: they stay tests.)
func TestMain(m *testing.M) {
	if os.Getenv("KILN_TEST_AS_KILN") == "1" && !slices.ContainsFunc(os.Args[1:], func(a string) bool { return strings.HasPrefix(a, "-test.fuzzworker") }) {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := run(ctx, os.Args[1:], &env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv})
		stop()
		os.Exit(code)
	}
	os.Setenv("KILN_TEST_AS_KILN", "1")
	os.Exit(m.Run())
}

// junitReport is JUnit XML as a CI system reads it.
type junitReport struct {
	Tests    int `xml:"tests,attr"`
	Failures int `xml:"failures,attr"`
	Skipped  int `xml:"skipped,attr"`
	Suites   []struct {
		Name       string `xml:"name,attr"`
		Failures   int    `xml:"failures,attr"`
		Properties []struct {
			Name  string `xml:"name,attr"`
			Value string `xml:"value,attr"`
		} `xml:"properties>property"`
		Cases []struct {
			Name      string `xml:"name,attr"`
			ClassName string `xml:"classname,attr"`
			Failure   *struct {
				Message string `xml:"message,attr"`
			} `xml:"failure"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

func readJUnit(t *testing.T, path string) junitReport {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r junitReport
	if err := xml.Unmarshal(b, &r); err != nil {
		t.Fatalf("JUnit XML %s: %v", path, err)
	}
	return r
}

func property(r junitReport, suite, name string) string {
	for _, s := range r.Suites {
		if s.Name != suite {
			continue
		}
		for _, p := range s.Properties {
			if p.Name == name {
				return p.Value
			}
		}
	}
	return ""
}

// TestQARunScenarioLibrary runs every built-in scenario of docs/qa on
// simulated DUTs (their own processes, paced to 115200 baud) against a DPS
// per scenario: every one, of every method, meets its expectation.
func TestQARunScenarioLibrary(t *testing.T) {
	if testing.Short() {
		t.Skip("runs every built-in scenario (about 100 s, a minute of it symkey-dps-quota waiting out the DPS's quota)")
	}
	home, out := t.TempDir(), t.TempDir()
	code, stdout, stderr := kiln(t, home, "qa", "run", "--out", out, "../../docs/qa")
	if code != exitPass {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	scs, err := qa.Load("../../docs/qa")
	if err != nil {
		t.Fatal(err)
	}
	rep := readJUnit(t, filepath.Join(out, "junit.xml"))
	if len(rep.Suites) != len(scs) {
		t.Fatalf("%d testsuites for %d scenarios", len(rep.Suites), len(scs))
	}
	ran := 0
	for _, sc := range scs {
		if got := property(rep, sc.Name, "outcome"); got != string(qa.Met) {
			t.Errorf("%s: %q", sc.Name, got)
		}
		ran += sc.UnitsPerRepeat() * sc.Repeat
	}
	if rep.Failures != 0 {
		t.Errorf("%d JUnit failures", rep.Failures)
	}
	// Every unit that ran is recorded, with its steps, in the one store.
	runs, err := openStoreAt(t, filepath.Join(out, "kiln.db")).Runs(t.Context(), station.RunFilter{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != ran {
		t.Errorf("%d runs recorded, want %d", len(runs), ran)
	}
	for _, r := range runs {
		if r.Result == station.ResultRunning || len(r.Steps) == 0 {
			t.Errorf("run %d (%s): %s with %d steps", r.ID, r.Serial, r.Result, len(r.Steps))
		}
	}
	html, err := os.ReadFile(filepath.Join(out, "report.html"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"enrollments were written with another TPM", "enrollments were written disabled",
		"answered 429 (retry-after 1) to", "the DPS clock ran 2h0m0s ahead", "kiln_dps_registrations_total",
		"token expired at", "The enrollment is disabled", "assignment done",
		"was disabled through the DPS service API after the station ensured it", "so every leaf expired 552h0m0s before it was issued",
		"the DPS says: attest X.509 device: the client certificate of", "the DPS held a quota of 2 device registrations per minute"} {
		if !strings.Contains(string(html), want) {
			t.Errorf("the HTML report's evidence lacks %q", want)
		}
	}
	if !regexp.MustCompile(`kiln_dps_throttled_total [1-9]`).Match(html) {
		t.Error("no DPS counted a throttled request: the quota scenario's DPS did not throttle")
	}
}

// TestQAExitCodeWhenNotMet: a scenario whose expectation fails makes kiln
// qa run exit 1, and the JUnit XML carries the reason.
func TestQAExitCodeWhenNotMet(t *testing.T) {
	home, out := t.TempDir(), t.TempDir()
	sc := filepath.Join(t.TempDir(), "wrong.scenario")
	src := "# expects a pass that a wrong ID scope cannot give\nname: hopeful\nmethod: tpm\nsimulated: 1\nline-rate: unthrottled\nfault: wrong-id-scope\nexpect: pass\n"
	if err := os.WriteFile(sc, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := kiln(t, home, "qa", "run", "--out", out, sc)
	if code != exitFail {
		t.Fatalf("exit %d, want %d\n%s\n%s", code, exitFail, stdout, stderr)
	}
	if !strings.Contains(stdout, "NOT MET") || !strings.Contains(stdout, "expected pass, got fail at verify-dps") {
		t.Errorf("stdout:\n%s", stdout)
	}
	rep := readJUnit(t, filepath.Join(out, "junit.xml"))
	var msg string
	for _, c := range rep.Suites[0].Cases {
		if c.Name == "expectation" && c.Failure != nil {
			msg = c.Failure.Message
		}
	}
	if rep.Failures < 1 || !strings.Contains(msg, "expected pass, got fail at verify-dps") {
		t.Errorf("JUnit failures %d, expectation failure %q", rep.Failures, msg)
	}

	// A fault the method cannot have is refused before anything runs.
	x := filepath.Join(t.TempDir(), "x.scenario")
	if err := os.WriteFile(x, []byte("name: x\nmethod: tpm\nsimulated: 1\nfault: disabled-group\nexpect: pass\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := kiln(t, home, "qa", "run", "--out", t.TempDir(), x); code != exitUsage || !strings.Contains(stderr, "disabled-group needs method x509 or symkey") {
		t.Errorf("disabled-group on tpm: exit %d: %s", code, stderr)
	}
	if code, _, stderr := kiln(t, home, "qa", "run", filepath.Join(t.TempDir(), "missing.scenario")); code != exitUsage || !strings.Contains(stderr, "give a scenario file") {
		t.Errorf("missing scenario: exit %d: %s", code, stderr)
	}
}

func TestQACheck(t *testing.T) {
	code, stdout, stderr := kiln(t, t.TempDir(), "qa", "check", "../../docs/qa")
	if code != exitPass || !strings.Contains(stdout, "tpm-dut-drops-out") || !strings.Contains(stdout, "dut-drop after=3 units=2") {
		t.Errorf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	bad := filepath.Join(t.TempDir(), "bad.scenario")
	if err := os.WriteFile(bad, []byte("name: b\nmethod: tpm\nsimulated: 1\nexpect: pass\nfault: gremlins\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := kiln(t, t.TempDir(), "qa", "check", bad); code != exitUsage || !strings.Contains(stderr, "bad.scenario:5: unknown fault \"gremlins\"") {
		t.Errorf("bad scenario: exit %d: %s", code, stderr)
	}
}

// TestSlotsDuplicatesAcrossSlots provisions six DUTs on six slots at once
// against one store and one DPS; three of them report the same serial. The
// store lets exactly one of those three through (whichever slot gets there
// first), refuses the others as conflicts, and records every run with every
// step.
func TestSlotsDuplicatesAcrossSlots(t *testing.T) {
	home, out := t.TempDir(), t.TempDir()
	c, err := loadConfig(&env{getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	e := &env{stdout: &logs, stderr: &logs, getenv: func(string) string { return "" }, logLevel: slog.LevelWarn}
	b, err := newQABench(t.Context(), e, c, out)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	sc, err := qa.Parse("dup", []byte("name: dup\nmethod: tpm\nsimulated: 6\nslots: 6\nfault: duplicate-serial units=2,3\nexpect: pass\n"))
	if err != nil {
		t.Fatal(err)
	}
	rep := (&qa.Runner{Bench: b, Logger: slog.New(slog.DiscardHandler)}).Run(t.Context(), []*qa.Scenario{sc})
	res := rep.Scenarios[0]
	passed := 0
	for _, u := range res.Units {
		if u.Run == nil {
			t.Fatalf("%s: no run: %s", u.Name(), u.Error)
		}
		switch {
		case u.Unit > 3 && !u.Passed():
			t.Errorf("%s failed: %s", u.Name(), u.Error)
		case u.Unit <= 3 && u.Passed():
			passed++
		case u.Unit <= 3 && (u.Kind != "conflict" || (u.Step != station.StepDuplicates && u.Step != station.StepRecord)):
			t.Errorf("%s: %s at %s: %s; want a conflict at check-duplicates or record", u.Name(), u.Kind, u.Step, u.Error)
		}
	}
	if passed != 1 {
		t.Errorf("%d of the three units with one serial passed, want exactly 1", passed)
	}
	store := b.store
	for _, u := range res.Units {
		got, err := store.Run(t.Context(), u.Run.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Result != u.Run.Result || len(got.Steps) != len(u.Run.Steps) {
			t.Errorf("run %d stored %s with %d steps; the runner saw %s with %d", got.ID, got.Result, len(got.Steps), u.Run.Result, len(u.Run.Steps))
		}
	}
	serials := map[string]bool{}
	for _, u := range res.Units {
		serials[u.Serial] = true
	}
	for s := range serials {
		if _, err := store.UnitBySerial(t.Context(), s); err != nil {
			t.Errorf("unit %s: %v", s, err)
		}
	}
	if len(serials) != 4 {
		t.Errorf("%d distinct serials, want 4", len(serials))
	}
	if t.Failed() {
		t.Log(logs.String())
	}
}

func openStoreAt(t *testing.T, path string) interface {
	Runs(context.Context, station.RunFilter) ([]*station.Run, error)
} {
	t.Helper()
	return openStore(t, filepath.Dir(path))
}

// TestQARealPorts runs a scenario on ports, as a bench with real DUTs
// does: here a DUT the test started on a pty, whose maker's root is in the
// station's configured EK roots.
func TestQARealPorts(t *testing.T) {
	home, out := t.TempDir(), t.TempDir()
	d, _ := startDUT(t, dutOpts{serial: "BENCH-PORT-1", lineRate: -1})
	cfg := fmt.Sprintf(`{"ek_roots": %q}`, d.roots)
	if err := os.WriteFile(filepath.Join(home, configFile), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	sc := filepath.Join(t.TempDir(), "ports.scenario")
	src := "name: on-ports\nmethod: tpm\nport: " + d.path + "\nek-cert-policy: require\nexpect: pass\n"
	if err := os.WriteFile(sc, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := kiln(t, home, "qa", "run", "--out", out, sc)
	if code != exitPass || !strings.Contains(stdout, "BENCH-PORT-1") {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	runs, err := openStoreAt(t, filepath.Join(out, "kiln.db")).Runs(t.Context(), station.RunFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 1 || runs[0].Port != d.path || runs[0].Serial != "BENCH-PORT-1" || stepStatuses(runs[0])[station.StepValidateEK] != station.StepOK {
		t.Errorf("runs %+v", runs)
	}
	// The same DUT again is a duplicate in the same store.
	src = strings.Replace(src, "expect: pass", "expect: fail step=check-duplicates kind=conflict", 1)
	if err := os.WriteFile(sc, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, stdout, _ := kiln(t, home, "qa", "run", "--out", out, sc); code != exitPass {
		t.Errorf("the same DUT again: exit %d\n%s", code, stdout)
	}
}

// TestQAVerifyOff: a scenario without the end-to-end check runs the
// station's own steps only.
func TestQAVerifyOff(t *testing.T) {
	home, out := t.TempDir(), t.TempDir()
	sc := filepath.Join(t.TempDir(), "off.scenario")
	if err := os.WriteFile(sc, []byte("name: off\nmethod: tpm\nsimulated: 2\nslots: 2\nline-rate: unthrottled\nverify: off\nexpect: pass\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, stdout, stderr := kiln(t, home, "qa", "run", "--out", out, sc); code != exitPass {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	runs, err := openStoreAt(t, filepath.Join(out, "kiln.db")).Runs(t.Context(), station.RunFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 2 {
		t.Fatalf("%d runs, want 2", len(runs))
	}
	for _, r := range runs {
		var names []string
		for _, s := range r.Steps {
			names = append(names, s.Name)
		}
		if got, want := strings.Join(names, ","), strings.Join(station.TPMSteps, ","); got != want || r.DPSStatus != "" {
			t.Errorf("run %d: steps %s (DPS %q), want %s and no DPS", r.ID, got, r.DPSStatus, want)
		}
	}
}

// TestProvisionSlots: kiln provision with three ports provisions the three
// DUTs (each its own process and TPM) at once, end to end against one
// DPS, into one store.
func TestProvisionSlots(t *testing.T) {
	home := t.TempDir()
	c, err := loadConfig(&env{getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := newQABench(t.Context(), &env{stdout: io.Discard, stderr: io.Discard, getenv: func(string) string { return "" }}, c, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var ports []string
	for i := range 3 {
		d, err := b.startDUT(t.Context(), qa.DUTSpec{Serial: fmt.Sprintf("SLOT-%d", i+1), LineRate: 115200})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		ports = append(ports, d.Port())
	}
	roots := filepath.Join(b.simHome, "simulator", "ek-roots")
	code, stdout, stderr := kiln(t, home, "provision", "--json", "--port", ports[0], "--port", ports[1]+","+ports[2],
		"--roots", roots, "--ek-cert-policy", "require", "--verify", "embedded")
	if code != exitPass {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d JSON lines, want 3:\n%s", len(lines), stdout)
	}
	var spans [][2]time.Time
	for i, l := range lines {
		var rr runRecord
		if err := json.Unmarshal([]byte(l), &rr); err != nil {
			t.Fatal(err)
		}
		if rr.Port != ports[i] || rr.Serial != fmt.Sprintf("SLOT-%d", i+1) || rr.Result != station.ResultPass || rr.DPSStatus != "assigned" {
			t.Errorf("line %d: %s on %s: %s %s", i, rr.Serial, rr.Port, rr.Result, rr.Error)
		}
		spans = append(spans, [2]time.Time{rr.Started, rr.Finished})
	}
	// In parallel: every run started before any finished.
	for _, a := range spans {
		for _, b := range spans {
			if !a[0].Before(b[1]) {
				t.Errorf("runs did not overlap: %v", spans)
			}
		}
	}
	if code, _, stderr := kiln(t, home, "provision", "--port", ports[0], "--port", ports[1], "--serial", "X"); code != exitUsage || !strings.Contains(stderr, "--serial names one unit") {
		t.Errorf("--serial with two ports: exit %d: %s", code, stderr)
	}
	if code, _, stderr := kiln(t, home, "provision", "--port", ports[0], "--port", ports[0]); code != exitUsage || !strings.Contains(stderr, "given twice") {
		t.Errorf("a port twice: exit %d: %s", code, stderr)
	}
}
