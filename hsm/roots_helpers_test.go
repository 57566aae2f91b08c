package hsm_test

import (
	"testing"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
)

func mustCA(t *testing.T, name string) *fixtures.CA {
	t.Helper()
	ca, err := fixtures.NewCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// rootsWith writes the CAs to a new folder and loads it.
func rootsWith(t *testing.T, cas ...*fixtures.CA) *hsm.Roots {
	t.Helper()
	dir := t.TempDir()
	for _, ca := range cas {
		if _, err := ca.WritePEM(dir); err != nil {
			t.Fatal(err)
		}
	}
	r, err := hsm.LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
