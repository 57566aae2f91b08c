package qa

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// Scenario is one QA scenario: what is provisioned, how, with which faults,
// and what must come of it. Parse reads it from the scenario format
// (docs/qa/README.md).
type Scenario struct {
	Name        string // [a-z0-9-]+, unique in a run
	Description string
	File        string // where it was read from, for messages
	Method      station.Method
	// Simulated is the number of simulated DUTs per repetition; Ports the
	// real DUT ports instead (one unit each per repetition).
	Simulated int
	Ports     []string
	Slots     int // units provisioned in parallel; at least 1
	Repeat    int // repetitions; at least 1
	// LineRate is the simulated DUTs' line rate (8N1); negative: unthrottled.
	LineRate int
	// DUTTPM is the simulated DUTs' TPM: "sim" (the reference simulator,
	// the default) or "swtpm" (with an EK certificate by swtpm_setup).
	DUTTPM       string
	EKCertPolicy station.EKCertPolicy
	SerialPrefix string
	Timeout      time.Duration // per unit
	// Verify is the end-to-end check: true (the default) proves each unit
	// against the scenario's DPS; false stops at the station's own steps.
	Verify bool
	Faults []Fault
	Expect []Expect // at most one without Units: the default
}

// FaultKind names a fault a scenario injects.
type FaultKind string

// The faults. DUT faults are done by the simulated DUT and may target
// units; station faults change the station's DPS or its enrollments for
// the whole scenario.
const (
	FaultDUTDrop         FaultKind = "dut-drop"            // the DUT drops off the line after=N answers (DUT)
	FaultGarbage         FaultKind = "garbage"             // random bytes around and inside answers (DUT)
	FaultDelay           FaultKind = "delay"               // each answer d=DURATION late (DUT)
	FaultDuplicateSerial FaultKind = "duplicate-serial"    // the unit reports unit 1's serial (DUT)
	FaultWrongEK         FaultKind = "wrong-ek"            // the enrollment holds another TPM's EK
	FaultDisabled        FaultKind = "disabled-enrollment" // the enrollment is disabled
	FaultExpiredCert     FaultKind = "expired-certificate" // the device certificate has expired (x509)
	FaultDisabledGroup   FaultKind = "disabled-group"      // the enrollment group is disabled
	FaultThrottle        FaultKind = "throttle"            // DPS answers 429 to count=N device requests (or always), or holds quota=N registrations per minute
	FaultWrongIDScope    FaultKind = "wrong-id-scope"      // the DUT is given an ID scope the DPS does not have
	FaultClockSkew       FaultKind = "clock-skew"          // the DPS's clock is by=DURATION ahead of the DUT's
)

// faultArgs lists each fault's arguments; DUT faults accept units= too.
var faultArgs = map[FaultKind][]string{
	FaultDUTDrop:         {"after"},
	FaultGarbage:         nil,
	FaultDelay:           {"d"},
	FaultDuplicateSerial: nil,
	FaultWrongEK:         nil,
	FaultDisabled:        nil,
	FaultExpiredCert:     nil,
	FaultDisabledGroup:   nil,
	FaultThrottle:        {"count", "quota"},
	FaultWrongIDScope:    nil,
	FaultClockSkew:       {"by"},
}

// DUTFault reports whether the simulated DUT does fault k (so it can
// target units).
func (k FaultKind) DUTFault() bool {
	switch k {
	case FaultDUTDrop, FaultGarbage, FaultDelay, FaultDuplicateSerial:
		return true
	}
	return false
}

// Fault is one fault injection.
type Fault struct {
	Kind  FaultKind
	Units []int // 1-based units of each repetition; nil: every unit
	// The arguments, by fault: After (dut-drop), Delay (delay), Count
	// (throttle; -1 is always), Quota (throttle: the DPS's own quota of
	// device registrations per minute instead of Count), Skew (clock-skew).
	After int
	Delay time.Duration
	Count int
	Quota int
	Skew  time.Duration
}

// String is the fault as written in a scenario.
func (f Fault) String() string {
	s := string(f.Kind)
	switch f.Kind {
	case FaultDUTDrop:
		s += " after=" + strconv.Itoa(f.After)
	case FaultDelay:
		s += " d=" + f.Delay.String()
	case FaultThrottle:
		if f.Quota > 0 {
			s += " quota=" + strconv.Itoa(f.Quota)
		} else if f.Count < 0 {
			s += " count=always"
		} else {
			s += " count=" + strconv.Itoa(f.Count)
		}
	case FaultClockSkew:
		s += " by=" + f.Skew.String()
	}
	if f.Units != nil {
		s += " units=" + joinInts(f.Units)
	}
	return s
}

// Applies reports whether f targets unit (1-based).
func (f Fault) Applies(unit int) bool { return f.Units == nil || slices.Contains(f.Units, unit) }

// Fault returns the scenario's fault of kind k, if it has one.
func (s *Scenario) Fault(k FaultKind) (Fault, bool) {
	for _, f := range s.Faults {
		if f.Kind == k {
			return f, true
		}
	}
	return Fault{}, false
}

// Expect is the outcome expected of units.
type Expect struct {
	Units  []int          // nil: every unit no other expectation names
	Result station.Result // pass or fail
	Step   string         // fail: the step that fails; empty: any
	Kind   string         // fail: the error kind (station.Kind, spaces as -); empty: any
	Text   string         // fail: a substring of the reason; empty: any
}

// String is the expectation as written in a scenario.
func (e Expect) String() string {
	s := string(e.Result)
	if e.Step != "" {
		s += " step=" + e.Step
	}
	if e.Kind != "" {
		s += " kind=" + e.Kind
	}
	if e.Text != "" {
		s += " text=" + strconv.Quote(e.Text)
	}
	if e.Units != nil {
		s += " units=" + joinInts(e.Units)
	}
	return s
}

// ExpectFor returns the expectation of unit (1-based).
func (s *Scenario) ExpectFor(unit int) Expect {
	var def Expect
	for _, e := range s.Expect {
		if e.Units == nil {
			def = e
		} else if slices.Contains(e.Units, unit) {
			return e
		}
	}
	return def
}

// UnitsPerRepeat is the number of units in one repetition.
func (s *Scenario) UnitsPerRepeat() int {
	if len(s.Ports) > 0 {
		return len(s.Ports)
	}
	return s.Simulated
}

// KindName is the scenario name of an error kind: its String with spaces
// as dashes ("not-found").
func KindName(k station.Kind) string { return strings.ReplaceAll(k.String(), " ", "-") }

var kindNames = func() map[string]bool {
	m := map[string]bool{}
	for k := station.KindOther; k <= station.KindInternal; k++ {
		m[KindName(k)] = true
	}
	return m
}()

// maxUnits bounds a scenario's units per repetition, repetitions and slots:
// a typo must not start a thousand processes.
const maxUnits = 256

// Load reads the scenarios of paths: files, or folders whose *.scenario
// files are read in name order. Names must be unique across them.
func Load(paths ...string) ([]*Scenario, error) {
	var files []string
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, station.Errorf("load scenarios", station.KindNotFound, "%w: give a scenario file or a folder of *.scenario files", err)
		}
		if !fi.IsDir() {
			files = append(files, p)
			continue
		}
		m, err := filepath.Glob(filepath.Join(p, "*.scenario"))
		if err != nil {
			return nil, err
		}
		if len(m) == 0 {
			return nil, station.Errorf("load scenarios", station.KindNotFound, "folder %s holds no *.scenario file", p)
		}
		sort.Strings(m)
		files = append(files, m...)
	}
	seen := map[string]string{}
	var out []*Scenario
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, station.E("load scenarios", station.KindNotFound, err)
		}
		s, err := Parse(f, b)
		if err != nil {
			return nil, err
		}
		if prev, ok := seen[s.Name]; ok {
			return nil, station.Errorf("load scenarios", station.KindInvalid, "%s: scenario name %q is used by %s too: names must be unique", f, s.Name, prev)
		}
		seen[s.Name] = f
		out = append(out, s)
	}
	return out, nil
}

// Parse reads one scenario. file names it in error messages. The format:
// one "key: value" per line; '#' starts a comment (at the start of a line,
// or after a space outside quotes); blank lines are ignored. Errors are
// Invalid and name the line.
func Parse(file string, data []byte) (*Scenario, error) {
	s := &Scenario{File: file, Slots: 1, Repeat: 1, LineRate: 115200, EKCertPolicy: station.EKCertRequire, SerialPrefix: "QA-", Timeout: 2 * time.Minute, Verify: true, DUTTPM: "sim"}
	seen := map[string]int{}
	for i, raw := range strings.Split(string(data), "\n") {
		n := i + 1
		fail := func(format string, args ...any) error {
			return station.Errorf("parse scenario", station.KindInvalid, "%s:%d: %s", file, n, fmt.Sprintf(format, args...))
		}
		line, err := stripComment(raw)
		if err != nil {
			return nil, fail("%v", err)
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fail("%q is not a key: value line (a comment starts with #)", clip(line))
		}
		key, val = strings.ToLower(strings.TrimSpace(key)), strings.TrimSpace(val)
		if key != "fault" && key != "expect" && key != "port" && key != "description" {
			if prev, dup := seen[key]; dup {
				return nil, fail("%s is given already on line %d", key, prev)
			}
		}
		seen[key] = n
		switch key {
		case "name":
			if !validName(val) {
				return nil, fail("name %q must be 1 to 64 characters of a-z, 0-9 and -", clip(val))
			}
			s.Name = val
		case "description":
			if s.Description != "" {
				s.Description += " "
			}
			s.Description += val
		case "method":
			switch m := station.Method(strings.ToLower(val)); m {
			case station.MethodTPM, station.MethodX509, station.MethodSymKey:
				s.Method = m
			default:
				return nil, fail("method %q: use tpm, x509 or symkey", clip(val))
			}
		case "simulated":
			if s.Simulated, err = boundedInt(val, 1, maxUnits); err != nil {
				return nil, fail("simulated: %v", err)
			}
		case "port":
			if val == "" || strings.ContainsAny(val, " \t") {
				return nil, fail("port %q: give one serial port path per port line", clip(val))
			}
			if len(s.Ports) >= maxUnits {
				return nil, fail("more than %d ports", maxUnits)
			}
			s.Ports = append(s.Ports, val)
		case "slots":
			if s.Slots, err = boundedInt(val, 1, maxUnits); err != nil {
				return nil, fail("slots: %v", err)
			}
		case "repeat":
			if s.Repeat, err = boundedInt(val, 1, maxUnits); err != nil {
				return nil, fail("repeat: %v", err)
			}
		case "line-rate":
			if val == "unthrottled" {
				s.LineRate = -1
			} else if s.LineRate, err = boundedInt(val, 300, 12_000_000); err != nil {
				return nil, fail("line-rate: %v (or unthrottled)", err)
			}
		case "ek-cert-policy":
			switch p := station.EKCertPolicy(val); p {
			case station.EKCertRequire, station.EKCertWarn, station.EKCertOff:
				s.EKCertPolicy = p
			default:
				return nil, fail("ek-cert-policy %q: use require, warn or off", clip(val))
			}
		case "serial-prefix":
			if val == "" || len(val) > 32 || strings.ContainsAny(val, " \t\"") {
				return nil, fail("serial-prefix %q: 1 to 32 characters, no spaces or quotes", clip(val))
			}
			s.SerialPrefix = val
		case "timeout":
			d, err := time.ParseDuration(val)
			if err != nil || d < time.Second || d > time.Hour {
				return nil, fail("timeout %q: a duration from 1s to 1h, like 90s", clip(val))
			}
			s.Timeout = d
		case "dut-tpm":
			if val != "sim" && val != "swtpm" {
				return nil, fail("dut-tpm %q: use sim (the reference TPM simulator) or swtpm", clip(val))
			}
			s.DUTTPM = val
		case "verify":
			switch val {
			case "embedded":
				s.Verify = true
			case "off":
				s.Verify = false
			default:
				return nil, fail("verify %q: use embedded (the scenario's DPS and hub) or off", clip(val))
			}
		case "fault":
			f, err := parseFault(val)
			if err != nil {
				return nil, fail("%v", err)
			}
			if _, dup := s.Fault(f.Kind); dup {
				return nil, fail("fault %s is given twice", f.Kind)
			}
			s.Faults = append(s.Faults, f)
		case "expect":
			e, err := parseExpect(val)
			if err != nil {
				return nil, fail("%v", err)
			}
			s.Expect = append(s.Expect, e)
		default:
			return nil, fail("unknown key %q: use name, description, method, simulated, port, slots, repeat, line-rate, ek-cert-policy, serial-prefix, timeout, dut-tpm, verify, fault or expect", clip(key))
		}
	}
	if n, ok := seen["dut-tpm"]; ok && len(s.Ports) > 0 {
		return nil, station.Errorf("parse scenario", station.KindInvalid, "%s:%d: dut-tpm is for simulated DUTs: real ports bring their own TPMs", file, n)
	}
	return s, s.check()
}

// check validates what no single line can.
func (s *Scenario) check() error {
	fail := func(format string, args ...any) error {
		return station.Errorf("parse scenario", station.KindInvalid, "%s: %s", s.File, fmt.Sprintf(format, args...))
	}
	switch {
	case s.Name == "":
		return fail("no name: add a line name: SOME-NAME")
	case s.Method == "":
		return fail("no method: add a line method: tpm (or x509, symkey)")
	case s.Simulated == 0 && len(s.Ports) == 0:
		return fail("no units: add simulated: N or one port: PATH line per DUT")
	case s.Simulated > 0 && len(s.Ports) > 0:
		return fail("simulated and port lines both given: a scenario runs simulated DUTs or real ones")
	case len(s.Expect) == 0:
		return fail("no expectation: add expect: pass or expect: fail step=STEP kind=KIND")
	}
	n := s.UnitsPerRepeat()
	defaults := 0
	named := map[int]bool{}
	for _, e := range s.Expect {
		if e.Units == nil {
			defaults++
			continue
		}
		for _, u := range e.Units {
			if u > n {
				return fail("expect %s names unit %d, but a repetition has %d units", e, u, n)
			}
			if named[u] {
				return fail("unit %d has two expectations", u)
			}
			named[u] = true
		}
	}
	if defaults > 1 {
		return fail("%d expectations without units=: give one default at most", defaults)
	}
	if defaults == 0 && len(named) < n {
		return fail("some units have no expectation: add a default expect line without units=")
	}
	for _, f := range s.Faults {
		for _, u := range f.Units {
			if u > n {
				return fail("fault %s names unit %d, but a repetition has %d units", f, u, n)
			}
		}
		if f.Kind.DUTFault() && len(s.Ports) > 0 {
			return fail("fault %s is done by a simulated DUT: real ports cannot do it", f.Kind)
		}
		if f.Kind == FaultDuplicateSerial && slices.Contains(f.Units, 1) {
			return fail("fault duplicate-serial gives units unit 1's serial: it cannot name unit 1")
		}
		if !f.Kind.DUTFault() && !s.Verify {
			return fail("fault %s acts on the DPS, but verify is off: remove one of them", f.Kind)
		}
		if f.Kind == FaultWrongEK && s.Method != station.MethodTPM {
			return fail("fault wrong-ek needs method tpm: only TPM units have an EK enrolled")
		}
		if f.Kind == FaultExpiredCert && s.Method != station.MethodX509 {
			return fail("fault expired-certificate needs method x509: only X.509 units have a certificate")
		}
		if f.Kind == FaultDisabled && s.Method != station.MethodTPM {
			return fail("fault disabled-enrollment needs method tpm: %s units register through an enrollment group (use disabled-group)", s.Method)
		}
		if f.Kind == FaultDisabledGroup && s.Method == station.MethodTPM {
			return fail("fault disabled-group needs method x509 or symkey: TPM units have individual enrollments (use disabled-enrollment)")
		}
		if f.Kind == FaultDuplicateSerial && f.Units == nil {
			return fail("fault duplicate-serial needs units=: the units that report unit 1's serial")
		}
	}
	return nil
}

func parseFault(val string) (Fault, error) {
	words, err := fields(val)
	if err != nil {
		return Fault{}, err
	}
	if len(words) == 0 {
		return Fault{}, fmt.Errorf("fault: name one (dut-drop, garbage, delay, duplicate-serial, wrong-ek, disabled-enrollment, expired-certificate, disabled-group, throttle, wrong-id-scope, clock-skew)")
	}
	f := Fault{Kind: FaultKind(strings.ToLower(words[0])), After: 2, Delay: 100 * time.Millisecond, Count: 2, Skew: 2 * time.Hour}
	allowed, ok := faultArgs[f.Kind]
	if !ok {
		return Fault{}, fmt.Errorf("unknown fault %q: use dut-drop, garbage, delay, duplicate-serial, wrong-ek, disabled-enrollment, expired-certificate, disabled-group, throttle, wrong-id-scope or clock-skew", clip(words[0]))
	}
	for _, w := range words[1:] {
		k, v, ok := strings.Cut(w, "=")
		if !ok {
			return Fault{}, fmt.Errorf("fault %s: %q is not key=value", f.Kind, clip(w))
		}
		switch {
		case k == "units" && f.Kind.DUTFault():
			if f.Units, err = parseUnits(v); err != nil {
				return Fault{}, fmt.Errorf("fault %s: %v", f.Kind, err)
			}
		case k == "units":
			return Fault{}, fmt.Errorf("fault %s acts on the station for the whole scenario: it takes no units=", f.Kind)
		case !slices.Contains(allowed, k):
			return Fault{}, fmt.Errorf("fault %s takes no %q", f.Kind, clip(k))
		case k == "after":
			if f.After, err = boundedInt(v, 1, 1000); err != nil {
				return Fault{}, fmt.Errorf("fault %s after: %v", f.Kind, err)
			}
		case k == "d":
			if f.Delay, err = time.ParseDuration(v); err != nil || f.Delay <= 0 || f.Delay > time.Minute {
				return Fault{}, fmt.Errorf("fault %s d=%q: a duration up to 1m, like 50ms", f.Kind, clip(v))
			}
		case k == "quota":
			if f.Quota, err = boundedInt(v, 1, 100000); err != nil {
				return Fault{}, fmt.Errorf("fault %s quota: %v (device registrations per minute)", f.Kind, err)
			}
		case k == "count":
			if v == "always" {
				f.Count = -1
			} else if f.Count, err = boundedInt(v, 1, 1000); err != nil {
				return Fault{}, fmt.Errorf("fault %s count: %v (or always)", f.Kind, err)
			}
		case k == "by":
			if f.Skew, err = time.ParseDuration(v); err != nil || f.Skew == 0 || f.Skew > 1000*time.Hour || f.Skew < -1000*time.Hour {
				return Fault{}, fmt.Errorf("fault %s by=%q: a non-zero duration, like 2h or -30m", f.Kind, clip(v))
			}
		}
	}
	if f.Kind == FaultThrottle && f.Quota > 0 && findArg(words[1:], "count") != "" {
		return Fault{}, fmt.Errorf("fault throttle takes count= (a front throttles each registration's first requests) or quota= (the DPS's own quota), not both")
	}
	return f, nil
}

// findArg returns the word of words that is key=..., or "".
func findArg(words []string, key string) string {
	for _, w := range words {
		if strings.HasPrefix(w, key+"=") {
			return w
		}
	}
	return ""
}

func parseExpect(val string) (Expect, error) {
	words, err := fields(val)
	if err != nil {
		return Expect{}, err
	}
	if len(words) == 0 {
		return Expect{}, fmt.Errorf("expect: pass or fail")
	}
	e := Expect{Result: station.Result(strings.ToLower(words[0]))}
	if e.Result != station.ResultPass && e.Result != station.ResultFail {
		return Expect{}, fmt.Errorf("expect %q: pass or fail", clip(words[0]))
	}
	for _, w := range words[1:] {
		k, v, ok := strings.Cut(w, "=")
		if !ok {
			return Expect{}, fmt.Errorf("expect: %q is not key=value", clip(w))
		}
		if k != "units" && e.Result == station.ResultPass {
			return Expect{}, fmt.Errorf("expect pass takes only units=; %s= describes a failure", clip(k))
		}
		switch k {
		case "units":
			if e.Units, err = parseUnits(v); err != nil {
				return Expect{}, fmt.Errorf("expect: %v", err)
			}
		case "step":
			if !validName(v) {
				return Expect{}, fmt.Errorf("expect: step %q is not a step name", clip(v))
			}
			e.Step = v
		case "kind":
			if !kindNames[v] {
				return Expect{}, fmt.Errorf("expect: kind %q: use invalid, not-found, conflict, unauthorized, unavailable, internal or other", clip(v))
			}
			e.Kind = v
		case "text":
			if v == "" {
				return Expect{}, fmt.Errorf("expect: text= is empty")
			}
			e.Text = v
		default:
			return Expect{}, fmt.Errorf("expect takes units, step, kind and text, not %q", clip(k))
		}
	}
	return e, nil
}

// stripComment removes a comment: '#' at the start or after white space,
// outside double quotes. An unterminated quote is an error.
func stripComment(line string) (string, error) {
	in := false
	for i := 0; i < len(line); i++ {
		switch c := line[i]; {
		case c == '\\' && in:
			i++
		case c == '"':
			in = !in
		case c == '#' && !in && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t'):
			return line[:i], nil
		}
	}
	if in {
		return "", fmt.Errorf("a quote is not closed")
	}
	return line, nil
}

// fields splits val at white space; key="quoted value" keeps its spaces
// (Go string syntax).
func fields(val string) ([]string, error) {
	var out []string
	for {
		val = strings.TrimLeft(val, " \t")
		if val == "" {
			return out, nil
		}
		i := 0
		for i < len(val) && val[i] != ' ' && val[i] != '\t' && val[i] != '"' {
			i++
		}
		if i < len(val) && val[i] == '"' {
			// key="...": find the closing quote.
			j := i + 1
			for j < len(val) && val[j] != '"' {
				if val[j] == '\\' {
					j++
				}
				j++
			}
			if j >= len(val) {
				return nil, fmt.Errorf("a quote is not closed")
			}
			s, err := strconv.Unquote(val[i : j+1])
			if err != nil {
				return nil, fmt.Errorf("%s is not a valid quoted string", clip(val[i:j+1]))
			}
			if strings.ContainsAny(s, "\n\r") {
				return nil, fmt.Errorf("a quoted value holds a line break")
			}
			out = append(out, val[:i]+s)
			val = val[j+1:]
			if val != "" && val[0] != ' ' && val[0] != '\t' {
				return nil, fmt.Errorf("put a space after a quoted value")
			}
			continue
		}
		out = append(out, val[:i])
		val = val[i:]
	}
}

func parseUnits(v string) ([]int, error) {
	var out []int
	for _, p := range strings.Split(v, ",") {
		n, err := boundedInt(p, 1, maxUnits)
		if err != nil {
			return nil, fmt.Errorf("units=%q: unit numbers from 1, separated by commas", clip(v))
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, nil
}

func boundedInt(v string, lo, hi int) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%q is not a whole number from %d to %d", clip(v), lo, hi)
	}
	return n, nil
}

func validName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// clip shortens what is quoted back in an error message.
func clip(s string) string {
	if len(s) > 60 {
		return s[:60] + "…"
	}
	return s
}
