package qa_test

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/qa"
	"github.com/kilnworks/kiln/station"
)

func TestScenarioParse(t *testing.T) {
	src := `# a comment line
name: slots-and-faults   # a trailing comment
description: first line
description: second line with a "#quoted" word
method: tpm
simulated: 3
slots: 2
repeat: 2
line-rate: unthrottled
ek-cert-policy: warn
serial-prefix: LINE7-
timeout: 90s
fault: dut-drop after=4 units=3,2
fault: throttle count=always
fault: clock-skew by=-30m
expect: pass
expect: fail step=read-ek kind=unavailable text="the DUT # went away" units=2,3
`
	got, err := qa.Parse("a.scenario", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	want := &qa.Scenario{
		Name: "slots-and-faults", Description: `first line second line with a "#quoted" word`, File: "a.scenario",
		Method: station.MethodTPM, Simulated: 3, Slots: 2, Repeat: 2, LineRate: -1,
		EKCertPolicy: station.EKCertWarn, SerialPrefix: "LINE7-", Timeout: 90 * time.Second, Verify: true, DUTTPM: "sim",
		Faults: []qa.Fault{
			{Kind: qa.FaultDUTDrop, Units: []int{2, 3}, After: 4, Delay: 100 * time.Millisecond, Count: 2, Skew: 2 * time.Hour},
			{Kind: qa.FaultThrottle, After: 2, Delay: 100 * time.Millisecond, Count: -1, Skew: 2 * time.Hour},
			{Kind: qa.FaultClockSkew, After: 2, Delay: 100 * time.Millisecond, Count: 2, Skew: -30 * time.Minute},
		},
		Expect: []qa.Expect{
			{Result: station.ResultPass},
			{Units: []int{2, 3}, Result: station.ResultFail, Step: "read-ek", Kind: "unavailable", Text: "the DUT # went away"},
		},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Parse (-want +got):\n%s", d)
	}
	if e := got.ExpectFor(1); e.Result != station.ResultPass {
		t.Errorf("unit 1 expects %s, want the default pass", e)
	}
	if e := got.ExpectFor(3); e.Step != "read-ek" {
		t.Errorf("unit 3 expects %s, want the read-ek failure", e)
	}
	if f := got.Faults[0]; f.Applies(1) || !f.Applies(2) {
		t.Errorf("fault %s applies to unit 1 or not to unit 2", f)
	}
	if s := got.Expect[1].String(); s != `fail step=read-ek kind=unavailable text="the DUT # went away" units=2,3` {
		t.Errorf("Expect.String() = %s", s)
	}
}

func TestScenarioParseErrors(t *testing.T) {
	base := "name: x\nmethod: tpm\nsimulated: 2\nexpect: pass\n"
	tests := []struct {
		name, src, want string
	}{
		{"no colon", base + "slots 2\n", "s.scenario:5: \"slots 2\" is not a key: value line"},
		{"unknown key", base + "colour: red\n", `s.scenario:5: unknown key "colour"`},
		{"duplicate key", base + "slots: 1\nslots: 2\n", "slots is given already on line 5"},
		{"bad method", "name: x\nmethod: psk\nsimulated: 1\nexpect: pass\n", `method "psk": use tpm, x509 or symkey`},
		{"no name", "method: tpm\nsimulated: 1\nexpect: pass\n", "no name"},
		{"no method", "name: x\nsimulated: 1\nexpect: pass\n", "no method"},
		{"no units", "name: x\nmethod: tpm\nexpect: pass\n", "no units"},
		{"both units", base + "port: /dev/ttyUSB0\n", "simulated and port lines both given"},
		{"no expect", "name: x\nmethod: tpm\nsimulated: 1\n", "no expectation"},
		{"too many units", "name: x\nmethod: tpm\nsimulated: 100000\nexpect: pass\n", "simulated: \"100000\" is not a whole number from 1 to 256"},
		{"unknown fault", base + "fault: gremlins\n", `unknown fault "gremlins"`},
		{"fault arg", base + "fault: garbage level=9\n", `fault garbage takes no "level"`},
		{"station fault units", base + "fault: wrong-ek units=1\n", "takes no units="},
		{"fault twice", base + "fault: garbage\nfault: garbage units=1\n", "fault garbage is given twice"},
		{"fault unit out of range", base + "fault: garbage units=3\n", "names unit 3, but a repetition has 2 units"},
		{"dut fault on ports", "name: x\nmethod: tpm\nport: /dev/ttyUSB0\nexpect: pass\nfault: garbage\n", "real ports cannot do it"},
		{"duplicate-serial unit 1", base + "fault: duplicate-serial units=1\n", "cannot name unit 1"},
		{"duplicate-serial all", base + "fault: duplicate-serial\n", "needs units="},
		{"wrong-ek without tpm", "name: x\nmethod: symkey\nsimulated: 1\nexpect: pass\nfault: wrong-ek\n", "fault wrong-ek needs method tpm"},
		{"expired cert without x509", base + "fault: expired-certificate\n", "fault expired-certificate needs method x509"},
		{"disabled enrollment without tpm", "name: x\nmethod: x509\nsimulated: 1\nexpect: pass\nfault: disabled-enrollment\n", "fault disabled-enrollment needs method tpm: x509 units register through an enrollment group"},
		{"disabled group with tpm", base + "fault: disabled-group\n", "fault disabled-group needs method x509 or symkey"},
		{"throttle count and quota", base + "fault: throttle count=2 quota=5\n", "count= (a front throttles each registration's first requests) or quota= (the DPS's own quota), not both"},
		{"throttle bad quota", base + "fault: throttle quota=0\n", "fault throttle quota: \"0\" is not a whole number from 1 to 100000"},
		{"dps fault without dps", base + "verify: off\nfault: throttle\n", "fault throttle acts on the DPS, but verify is off"},
		{"bad dut-tpm", base + "dut-tpm: fpga\n", `dut-tpm "fpga": use sim`},
		{"dut-tpm on ports", "name: x\nmethod: tpm\nport: /dev/ttyUSB0\ndut-tpm: swtpm\nexpect: pass\n", "s.scenario:4: dut-tpm is for simulated DUTs"},
		{"bad verify", base + "verify: maybe\n", `verify "maybe": use embedded`},
		{"bad skew", base + "fault: clock-skew by=soon\n", "a non-zero duration"},
		{"pass with step", "name: x\nmethod: tpm\nsimulated: 1\nexpect: pass step=record\n", "expect pass takes only units="},
		{"bad kind", "name: x\nmethod: tpm\nsimulated: 1\nexpect: fail kind=oops\n", `kind "oops"`},
		{"two defaults", base + "expect: fail\n", "2 expectations without units="},
		{"unit twice", base + "expect: fail units=1\nexpect: fail units=1,2\n", "unit 1 has two expectations"},
		{"units uncovered", "name: x\nmethod: tpm\nsimulated: 2\nexpect: pass units=1\n", "some units have no expectation"},
		{"open quote", base + `expect: fail text="abc` + "\n", "s.scenario:5: a quote is not closed"},
		{"bad name", "name: Big Name\nmethod: tpm\nsimulated: 1\nexpect: pass\n", "name \"Big Name\" must be"},
		{"bad timeout", base + "timeout: 5ms\n", "a duration from 1s to 1h"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := qa.Parse("s.scenario", []byte(tt.src))
			if err == nil {
				t.Fatalf("Parse accepted:\n%s", tt.src)
			}
			if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q (kind %v), want Invalid containing %q", err, station.KindOf(err), tt.want)
			}
		})
	}
}

// TestScenarioLibrary loads the built-in scenarios of docs/qa: they parse,
// and between them they cover the golden path of each method and every
// negative case of the QA brief.
func TestScenarioLibrary(t *testing.T) {
	scs, err := qa.Load("../docs/qa")
	if err != nil {
		t.Fatal(err)
	}
	golden := map[station.Method]bool{}
	faults := map[qa.FaultKind]bool{}
	for _, s := range scs {
		if len(s.Faults) == 0 && s.ExpectFor(1).Result == station.ResultPass {
			golden[s.Method] = true
		}
		for _, f := range s.Faults {
			faults[f.Kind] = true
		}
		if s.Slots > 1 && s.UnitsPerRepeat() < 2 {
			t.Errorf("%s: %d slots for %d unit", s.Name, s.Slots, s.UnitsPerRepeat())
		}
	}
	for _, m := range []station.Method{station.MethodTPM, station.MethodX509, station.MethodSymKey} {
		if !golden[m] {
			t.Errorf("no golden-path scenario for method %s", m)
		}
	}
	for _, k := range []qa.FaultKind{qa.FaultDUTDrop, qa.FaultWrongEK, qa.FaultDisabled, qa.FaultExpiredCert,
		qa.FaultDisabledGroup, qa.FaultThrottle, qa.FaultWrongIDScope, qa.FaultClockSkew} {
		if !faults[k] {
			t.Errorf("no scenario injects %s", k)
		}
	}
	if _, err := qa.Load("../docs/qa/tpm-golden.scenario", "../docs/qa"); err == nil || !strings.Contains(err.Error(), "names must be unique") {
		t.Errorf("a scenario loaded twice: %v, want a unique-name error", err)
	}
}
