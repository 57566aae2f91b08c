package qa_test

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/qa"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// testBench is a station on real parts without a DPS: the Provisioner, a
// SQLite store, the DUT link over ptys and simulated DUTs. With tpm set the
// DUTs get the in-process reference TPM simulator, of which there is one
// per process: such scenarios run on one slot.
type testBench struct {
	t       *testing.T
	store   *sqlite.Store
	tpm     bool
	roots   string
	ca      *fixtures.CA
	openErr error

	mu     sync.Mutex
	starts int
}

func newTestBench(t *testing.T, withTPM bool) *testBench {
	t.Helper()
	store, err := sqlite.Open(t.Context(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	b := &testBench{t: t, store: store, tpm: withTPM}
	if withTPM {
		if b.ca, err = fixtures.NewCA("qa test TPM maker"); err != nil {
			t.Fatal(err)
		}
		b.roots = t.TempDir()
		if _, err := b.ca.WritePEM(b.roots); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func (b *testBench) Open(ctx context.Context, sc *qa.Scenario) (qa.Station, error) {
	if b.openErr != nil {
		return nil, b.openErr
	}
	var verifier station.Verifier
	if b.roots != "" {
		r, err := hsm.LoadRoots(b.roots)
		if err != nil {
			return nil, err
		}
		verifier = r
	}
	p := &station.Provisioner{
		Store: b.store,
		Dial: func(ctx context.Context, port string) (station.Link, error) {
			return link.Open(ctx, port, link.Config{})
		},
		Endorser: hsm.Endorser{},
		Verifier: verifier,
		Profile:  station.Profile{Station: "qa-test", Method: sc.Method, RegID: station.RegIDFromEK, EKCertPolicy: sc.EKCertPolicy},
		Logger:   slog.New(slog.DiscardHandler),
	}
	return &testStation{b: b, p: p}, nil
}

type testStation struct {
	b *testBench
	p *station.Provisioner
}

func (s *testStation) Provision(ctx context.Context, req station.Request) (*station.Run, error) {
	return s.p.Provision(ctx, req)
}

func (s *testStation) StartDUT(ctx context.Context, spec qa.DUTSpec) (qa.DUT, error) {
	s.b.mu.Lock()
	s.b.starts++
	s.b.mu.Unlock()
	var tpm transport.TPMCloser
	if s.b.tpm {
		var err error
		if tpm, err = tpmsim.Open(); err != nil {
			return nil, err
		}
		if err := fixtures.Manufacture(ctx, tpm, s.b.ca); err != nil {
			tpm.Close()
			return nil, err
		}
	}
	cfg := fixtures.DUTConfig{Info: station.DeviceInfo{Serial: spec.Serial, Model: "qa-test"}, LineRate: spec.LineRate, Faults: spec.Faults}
	if tpm != nil {
		cfg.TPM = tpm
	}
	d, err := fixtures.StartDUT(ctx, cfg)
	if err != nil {
		if tpm != nil {
			tpm.Close()
		}
		return nil, err
	}
	return &testDUT{d: d, tpm: tpm}, nil
}

func (s *testStation) Evidence(context.Context) []qa.Evidence {
	return []qa.Evidence{{Name: "bench", Text: fmt.Sprintf("%d DUTs started <b>", s.b.starts)}}
}

func (s *testStation) Close() error { return nil }

type testDUT struct {
	d   *fixtures.DUT
	tpm transport.TPMCloser
}

func (d *testDUT) Port() string { return d.d.Path() }
func (d *testDUT) Close() error {
	err := d.d.Close()
	if d.tpm != nil {
		d.tpm.Close()
	}
	return err
}

var quiet = slog.New(slog.DiscardHandler)

func parse(t *testing.T, src string) *qa.Scenario {
	t.Helper()
	s, err := qa.Parse(t.Name()+".scenario", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSlotsRecordEveryRun provisions 8 DUTs on 4 slots at once (DUTs without
// a TPM, so that no simulator is shared): every unit fails at identify as
// expected, the slots overlap in time, and the one store holds every run
// with its steps.
func TestSlotsRecordEveryRun(t *testing.T) {
	b := newTestBench(t, false)
	sc := parse(t, `name: no-tpm
method: tpm
simulated: 8
slots: 4
line-rate: 115200
expect: fail step=identify kind=invalid text="reports no TPM"
`)
	rep := (&qa.Runner{Bench: b, Logger: quiet}).Run(t.Context(), []*qa.Scenario{sc})
	s := rep.Scenarios[0]
	if s.Outcome != qa.Met || !rep.OK(false) {
		t.Fatalf("outcome %s: %s", s.Outcome, s.Reason)
	}
	if len(s.Units) != 8 {
		t.Fatalf("%d units, want 8", len(s.Units))
	}
	slots := map[int]bool{}
	overlap := false
	for i, u := range s.Units {
		slots[u.Slot] = true
		for _, v := range s.Units[i+1:] {
			if u.Started.Before(v.Started.Add(v.Duration)) && v.Started.Before(u.Started.Add(u.Duration)) {
				overlap = true
			}
		}
	}
	if len(slots) != 4 || !overlap {
		t.Errorf("slots used %v, overlap %v: want 4 slots running at once", slots, overlap)
	}
	runs, err := b.store.Runs(t.Context(), station.RunFilter{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 8 {
		t.Fatalf("%d runs recorded, want 8", len(runs))
	}
	serials := map[string]bool{}
	for _, r := range runs {
		serials[r.Serial] = true
		if r.Result != station.ResultFail || len(r.Steps) != 2 || r.Steps[1].Name != station.StepIdentify || r.Steps[1].Status != station.StepFail {
			t.Errorf("run %d: %s with steps %+v", r.ID, r.Result, r.Steps)
		}
	}
	if len(serials) != 8 {
		t.Errorf("%d distinct serials recorded, want 8", len(serials))
	}
}

// TestRunnerTPMFaultsAndReports runs TPM units on the reference simulator:
// unit 1 passes, unit 2 drops off the line during the EK read. The JUnit
// XML of that run is parsed back and the HTML report checked.
func TestRunnerTPMFaultsAndReports(t *testing.T) {
	b := newTestBench(t, true)
	sc := parse(t, `name: tpm-drop
method: tpm
simulated: 2
line-rate: unthrottled
fault: dut-drop after=3 units=2
expect: pass units=1
expect: fail step=read-ek kind=unavailable units=2
`)
	miss := parse(t, `name: tpm-miss
method: tpm
simulated: 1
line-rate: unthrottled
fault: garbage
expect: fail step=check-duplicates
`)
	rep := (&qa.Runner{Bench: b, Station: "qa-test", Logger: quiet}).Run(t.Context(), []*qa.Scenario{sc, miss})
	if got := rep.Scenarios[0]; got.Outcome != qa.Met {
		t.Fatalf("%s: %s: %s", got.Name, got.Outcome, got.Reason)
	}
	u1, u2 := rep.Scenarios[0].Units[0], rep.Scenarios[0].Units[1]
	if !u1.Passed() || u1.Run.RegistrationID == "" || u2.Passed() || u2.Step != station.StepReadEK || u2.Kind != "unavailable" {
		t.Errorf("u1 %+v\nu2 %+v", u1, u2)
	}
	m := rep.Scenarios[1]
	if m.Outcome != qa.NotMet || !strings.Contains(m.Reason, `expected fail step=check-duplicates, got pass`) {
		t.Errorf("a unit that passes against expect fail: %s: %s", m.Outcome, m.Reason)
	}
	if rep.OK(true) {
		t.Error("Report.OK with an expectation not met")
	}

	var buf bytes.Buffer
	if err := qa.WriteJUnit(&buf, rep); err != nil {
		t.Fatal(err)
	}
	doc := parseJUnit(t, buf.Bytes())
	if len(doc.Suites) != 2 {
		t.Fatalf("%d testsuites, want 2", len(doc.Suites))
	}
	s0 := doc.Suites[0]
	// u1: six TPM steps + expectation; u2: connect, identify, read-ek + expectation.
	if s0.Name != "tpm-drop" || s0.Tests != 11 || len(s0.Cases) != 11 || s0.Failures != 0 {
		t.Errorf("suite %s: tests %d (%d cases), failures %d; want 11, 0", s0.Name, s0.Tests, len(s0.Cases), s0.Failures)
	}
	var readEK *junitCase
	for i, c := range s0.Cases {
		if c.ClassName == "tpm-drop.u2" && c.Name == station.StepReadEK {
			readEK = &s0.Cases[i]
		}
	}
	if readEK == nil || readEK.Failure != nil || !strings.Contains(readEK.SystemOut, "failed as expected") {
		t.Errorf("u2 read-ek case: %+v", readEK)
	}
	s1 := doc.Suites[1]
	if s1.Failures != 1 || doc.Failures != 1 {
		t.Errorf("failures: suite %d, document %d; want 1", s1.Failures, doc.Failures)
	}
	for _, c := range s1.Cases {
		if c.Name == "expectation" && (c.Failure == nil || !strings.Contains(c.Failure.Message, "got pass")) {
			t.Errorf("expectation case of the missed scenario: %+v", c)
		}
	}
	if !hasProperty(s0, "yield", "1/2") || !hasProperty(s0, "fault", "dut-drop after=3 units=2") {
		t.Errorf("suite properties %+v", s0.Properties)
	}

	buf.Reset()
	if err := qa.WriteHTML(&buf, rep); err != nil {
		t.Fatal(err)
	}
	html := buf.String()
	for _, want := range []string{"EXPECTATIONS NOT MET", `<svg class="chart"`, "yield 1/2 (50.0 %)", "tpm-miss", "Raw evidence",
		u1.Serial, "2 DUTs started &lt;b&gt;", `registration_id&#34;: &#34;` + u1.Run.RegistrationID} {
		if !strings.Contains(html, want) {
			t.Errorf("HTML report lacks %q", want)
		}
	}
	// One bar per step run (skipped steps drawn none), one row per unit.
	if got, want := strings.Count(html, "<rect x="), 6+3+6+legendRects(html); got != want {
		t.Errorf("%d rects in the charts, want %d", got, want)
	}
}

// legendRects counts the legend swatches (10×10) in the charts.
func legendRects(html string) int { return strings.Count(html, `width="10" height="10"`) }

func TestRunnerNotAvailable(t *testing.T) {
	b := newTestBench(t, false)
	b.openErr = fmt.Errorf("method x509 is %w", qa.ErrNotAvailable)
	sc := parse(t, "name: x\nmethod: x509\nsimulated: 2\nexpect: pass\n")
	rep := (&qa.Runner{Bench: b, Logger: quiet}).Run(t.Context(), []*qa.Scenario{sc})
	s := rep.Scenarios[0]
	if s.Outcome != qa.NotAvailable || len(s.Units) != 2 || s.Units[1].Outcome != qa.NotAvailable {
		t.Fatalf("%s %+v", s.Outcome, s.Units)
	}
	if rep.OK(false) || !rep.OK(true) {
		t.Errorf("OK(false) %v OK(true) %v: want false, true", rep.OK(false), rep.OK(true))
	}
	var buf bytes.Buffer
	if err := qa.WriteJUnit(&buf, rep); err != nil {
		t.Fatal(err)
	}
	doc := parseJUnit(t, buf.Bytes())
	if doc.Skipped != 2 || doc.Failures != 0 || doc.Suites[0].Cases[0].Skipped == nil || !strings.Contains(doc.Suites[0].Cases[0].Skipped.Message, "not available") {
		t.Errorf("JUnit of a scenario not available: %+v", doc)
	}
	if b.starts != 0 {
		t.Errorf("%d DUTs started for a scenario that cannot run", b.starts)
	}

	// Any other error opening the station fails the scenario.
	b.openErr = errors.New("disk full")
	if rep := (&qa.Runner{Bench: b, Logger: quiet}).Run(t.Context(), []*qa.Scenario{sc}); rep.Scenarios[0].Outcome != qa.NotMet {
		t.Errorf("open error: %s", rep.Scenarios[0].Outcome)
	}
}

// TestRunnerStops checks that a cancelled run stops starting units and
// reports those not run as not met.
func TestRunnerStops(t *testing.T) {
	b := newTestBench(t, false)
	sc := parse(t, "name: x\nmethod: tpm\nsimulated: 1\nrepeat: 50\nfault: delay d=200ms\nexpect: fail step=identify\n")
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	rep := (&qa.Runner{Bench: b, Logger: quiet}).Run(ctx, []*qa.Scenario{sc})
	s := rep.Scenarios[0]
	if s.Outcome != qa.NotMet || len(s.Units) != 50 {
		t.Fatalf("%s with %d units", s.Outcome, len(s.Units))
	}
	if b.starts >= 50 || s.Units[49].Why != "not run: the scenario was stopped" {
		t.Errorf("%d DUTs started; last unit: %s", b.starts, s.Units[49].Why)
	}
}

// The JUnit schema as a CI system reads it, written independently of the
// package's types.
type junitDoc struct {
	XMLName  xml.Name     `xml:"testsuites"`
	Tests    int          `xml:"tests,attr"`
	Failures int          `xml:"failures,attr"`
	Skipped  int          `xml:"skipped,attr"`
	Suites   []junitSuite `xml:"testsuite"`
}

type junitSuite struct {
	Name       string `xml:"name,attr"`
	Tests      int    `xml:"tests,attr"`
	Failures   int    `xml:"failures,attr"`
	Properties []struct {
		Name  string `xml:"name,attr"`
		Value string `xml:"value,attr"`
	} `xml:"properties>property"`
	Cases []junitCase `xml:"testcase"`
}

type junitCase struct {
	Name      string  `xml:"name,attr"`
	ClassName string  `xml:"classname,attr"`
	Time      float64 `xml:"time,attr"`
	Failure   *struct {
		Message string `xml:"message,attr"`
		Type    string `xml:"type,attr"`
		Text    string `xml:",chardata"`
	} `xml:"failure"`
	Skipped *struct {
		Message string `xml:"message,attr"`
	} `xml:"skipped"`
	SystemOut string `xml:"system-out"`
}

func parseJUnit(t *testing.T, b []byte) junitDoc {
	t.Helper()
	if !bytes.HasPrefix(b, []byte(`<?xml version="1.0" encoding="UTF-8"?>`)) {
		t.Errorf("no XML declaration: %.60s", b)
	}
	// Well-formed: the whole document tokenises.
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		_, err := d.Token()
		if err != nil {
			if err.Error() != "EOF" {
				t.Fatalf("JUnit XML is not well-formed: %v", err)
			}
			break
		}
	}
	var doc junitDoc
	if err := xml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range doc.Suites {
		n += len(s.Cases)
	}
	if doc.Tests != n {
		t.Errorf("testsuites tests=%d, but %d testcases", doc.Tests, n)
	}
	return doc
}

func hasProperty(s junitSuite, name, value string) bool {
	for _, p := range s.Properties {
		if p.Name == name && p.Value == value {
			return true
		}
	}
	return false
}
