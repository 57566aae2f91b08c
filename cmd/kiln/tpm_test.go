package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/station"
)

func TestTPMInfoSWTPM(t *testing.T) {
	if err := fixtures.HaveSWTPM(); err != nil {
		t.Skip(err) // make deps installs swtpm; CI runs this
	}
	sw, err := fixtures.StartSWTPM(t.Context(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	home := t.TempDir()

	code, out, stderr := kiln(t, home, "tpm", "info", "--tpm", sw.Spec(), "--roots", sw.RootsDir(), "--json")
	if code != exitPass {
		t.Fatalf("exit %d: %s %s", code, out, stderr)
	}
	var info tpmInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.EKCert) == 0 || !strings.HasPrefix(info.Validation, "ok") {
		t.Errorf("swtpm_setup's EK certificate should validate against its CA: cert %d bytes, %s", len(info.EKCert), info.Validation)
	}
	if info.RegistrationID != station.RegistrationIDFromEK(info.EKPublic) || info.EKSHA256 != station.EKHash(info.EKPublic) {
		t.Errorf("identity fields disagree with the EK: %+v", info)
	}

	// Against another maker's root, the same TPM fails validation (exit 1).
	other, err := fixtures.NewCA("not the maker")
	if err != nil {
		t.Fatal(err)
	}
	roots := t.TempDir()
	if _, err := other.WritePEM(roots); err != nil {
		t.Fatal(err)
	}
	code, out, _ = kiln(t, home, "tpm", "info", "--tpm", sw.Spec(), "--roots", roots)
	if code != exitFail || !strings.Contains(out, "validation     FAIL") {
		t.Errorf("wrong root: exit %d\n%s", code, out)
	}
}

func TestTPMInfoSimulator(t *testing.T) {
	// A fresh simulator: no EK, SRK or EK certificate yet.
	code, out, stderr := kiln(t, t.TempDir(), "tpm", "info", "--tpm", "sim")
	if code != exitPass {
		t.Fatalf("exit %d: %s %s", code, out, stderr)
	}
	for _, want := range []string{"was absent: created and persisted now", "EK certificate none at NV 0x01C00002", "not possible: the TPM holds no EK certificate"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
