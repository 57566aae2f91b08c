// Package kiln_test holds repository-wide checks: the import rules of the
// architecture, enforced on what `go list` reports.
package kiln_test

import (
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/kilnworks/kiln"

// allowed lists, for each project package, the project packages it may import
// directly (ARCHITECTURE.md). A package missing from this table fails the
// test: new packages are placed deliberately.
var allowed = map[string][]string{
	"station":             {},
	"station/sqlite":      {"station", "internal/sqlitedb"},
	"internal/sqlitedb":   {"station"}, // how every Kiln store opens SQLite
	"internal/fynelocale": {},          // a parseable locale for Fyne when the process has none
	"internal/datakey":    {"station"}, // the data key that seals a store's secrets
	"internal/atomicfile": {},          // files written whole or not at all
	"link":                {"station"},
	"hsm":                 {"station"},
	"hsm/tpmsim":          {"station", "hsm"},
	"pki":                 {"station", "internal/atomicfile"},
	"dps":                 {"station", "hsm"},
	"devserver":           {"station", "dps", "internal/sqlitedb", "internal/datakey"},
	"cloudsync":           {"station", "dps", "internal/datakey"},
	"agent":               {"station", "dps", "hsm", "link"},
	"ui":                  {"station"},
	"fixtures":            {"*", "-ui", "-cmd/kiln"},
	"qa":                  {"station", "fixtures"}, // scenarios, runner, reports; cmd/kiln wires the bench
	"cmd/kiln":            {"*"},
	"cmd/kiln-agent":      {"agent", "station", "link", "hsm", "dps"},
}

type pkg struct {
	ImportPath string
	Standard   bool
	Imports    []string
	Deps       []string
	CgoFiles   []string
}

func list(t *testing.T, args ...string) []pkg {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list", "-e", "-json"}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %v: %v", args, err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

func rel(path string) (string, bool) {
	if path == module {
		return ".", true
	}
	r, ok := strings.CutPrefix(path, module+"/")
	return r, ok
}

func TestImportRules(t *testing.T) {
	all := list(t, "-deps", "./...")
	std := map[string]bool{}
	for _, p := range all {
		std[p.ImportPath] = p.Standard
	}
	for _, p := range all {
		name, ok := rel(p.ImportPath)
		if !ok || name == "." {
			continue
		}
		rules, known := allowed[name]
		if !known {
			t.Errorf("%s is not in the import table of deps_test.go (ARCHITECTURE.md): add it deliberately", name)
			continue
		}
		for _, imp := range p.Imports {
			dep, own := rel(imp)
			if !own {
				continue
			}
			if !permits(rules, dep) {
				t.Errorf("%s imports %s, which ARCHITECTURE.md forbids", name, dep)
			}
		}
		for _, d := range p.Deps {
			if d == "testing" || strings.HasPrefix(d, "testing/") {
				t.Errorf("%s (non-test code) depends on %s", name, d)
			}
		}
		switch name {
		case "station":
			for _, d := range p.Deps {
				if !std[d] {
					t.Errorf("station must import the standard library only, but depends on %s", d)
				}
			}
		case "ui":
			if slices.Contains(p.Deps, "fyne.io/fyne/v2/app") {
				t.Errorf("ui must not import fyne.io/fyne/v2/app: only cmd/kiln creates the app")
			}
		}
	}
}

func permits(rules []string, dep string) bool {
	if slices.Contains(rules, "-"+dep) {
		return false
	}
	return slices.Contains(rules, "*") || slices.Contains(rules, dep)
}

// TestAgentIsPureGo checks that the device side links no cgo, no SQLite, no
// simulator and no GUI, for the DUT architectures.
func TestAgentIsPureGo(t *testing.T) {
	forbidden := []string{"github.com/mattn/go-sqlite3", "github.com/google/go-tpm-tools/simulator", "fyne.io/fyne/v2", "runtime/cgo"}
	for _, arch := range []string{"arm64", "arm", "amd64"} {
		cmd := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", "./cmd/kiln-agent")
		cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("go list for linux/%s: %v", arch, err)
		}
		for _, line := range strings.Fields(string(out)) {
			for _, f := range forbidden {
				if line == f || strings.HasPrefix(line, f+"/") {
					t.Errorf("kiln-agent for linux/%s depends on %s", arch, line)
				}
			}
		}
	}
}
