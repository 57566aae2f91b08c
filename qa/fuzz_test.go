package qa_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnworks/kiln/qa"
	"github.com/kilnworks/kiln/station"
)

// FuzzParse feeds the scenario parser arbitrary bytes (scenario files come
// from people and from CI checkouts): it must not panic, and whatever it
// accepts must be a scenario the runner can run.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("../docs/qa/*.scenario")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := qa.Parse("fuzz.scenario", data)
		if err != nil {
			if station.KindOf(err) != station.KindInvalid {
				t.Fatalf("error of kind %v: %v", station.KindOf(err), err)
			}
			return
		}
		n := s.UnitsPerRepeat()
		if s.Name == "" || s.Method == "" || n < 1 || s.Slots < 1 || s.Repeat < 1 {
			t.Fatalf("accepted an unrunnable scenario: %+v", s)
		}
		for u := 1; u <= n; u++ {
			if e := s.ExpectFor(u); e.Result != station.ResultPass && e.Result != station.ResultFail {
				t.Fatalf("unit %d has no expectation: %+v", u, s)
			}
		}
		// What String writes back parses to the same fault and expectation.
		for _, fl := range s.Faults {
			src := "name: x\nmethod: " + string(s.Method) + "\nsimulated: " + itoa(n) + "\nexpect: pass\nfault: " + fl.String() + "\n"
			back, err := qa.Parse("again", []byte(src))
			if err != nil || back.Faults[0].String() != fl.String() {
				t.Fatalf("fault %q does not parse back: %v", fl.String(), err)
			}
		}
		for _, e := range s.Expect {
			src := "name: x\nmethod: " + string(s.Method) + "\nsimulated: " + itoa(n) + "\nexpect: " + e.String() + "\n"
			if e.Units != nil {
				src += "expect: pass\n"
			}
			back, err := qa.Parse("again", []byte(src))
			if err != nil || back.Expect[0].String() != e.String() {
				t.Fatalf("expectation %q does not parse back: %v", e.String(), err)
			}
		}
	})
}

func itoa(n int) string {
	b := []byte{}
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}
