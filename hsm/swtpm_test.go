package hsm_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// startSWTPM starts a manufactured swtpm for one test, skipping the test
// only when swtpm is not installed.
func startSWTPM(t *testing.T, unix bool) *fixtures.SWTPM {
	t.Helper()
	if err := fixtures.HaveSWTPM(); err != nil {
		t.Skipf("swtpm tests need swtpm: %v", err)
	}
	start := fixtures.StartSWTPM
	if unix {
		start = fixtures.StartSWTPMUnix
	}
	s, err := start(t.Context(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func openSpec(t *testing.T, spec string) *hsm.TPM {
	t.Helper()
	tpm, err := hsm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tpm.Close() })
	return tpm
}

func TestSWTPMEndorsementValidates(t *testing.T) {
	t.Parallel()
	sw := startSWTPM(t, false)
	ctx := t.Context()
	tpm := openSpec(t, sw.Spec())
	start := time.Now()
	e, err := tpm.Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Endorsement() over swtpm TCP: %v", time.Since(start))
	if e.EKCreated {
		t.Error("EKCreated on a TPM that swtpm_setup manufactured")
	}
	if !e.SRKCreated {
		t.Error("SRK not created (swtpm_setup makes none)")
	}
	if len(e.EKCert) == 0 {
		t.Fatal("no EK certificate from swtpm_setup")
	}

	roots, err := hsm.LoadRoots(sw.RootsDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := roots.VerifyEKCert(ctx, e); err != nil {
		t.Errorf("swtpm's EK certificate against its CA: %v", err)
	}

	err = rootsWith(t, mustCA(t, "Some Other Maker")).VerifyEKCert(ctx, e)
	wantKind(t, err, station.KindUnauthorized)

	// The certificate of this swtpm with the EK of another TPM.
	sim := openSim(t)
	simEK, err := hsm.New(sim).Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	clone := *simEK
	clone.EKCert = e.EKCert
	err = roots.VerifyEKCert(ctx, &clone)
	wantKind(t, err, station.KindUnauthorized)

	// SRK persisted: a second connection finds it.
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	e2, err := openSpec(t, sw.Spec()).Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e2.SRKCreated || !bytes.Equal(e2.SRKPublic, e.SRKPublic) {
		t.Error("the SRK did not persist across connections")
	}
}

func TestSWTPMFlushesLeftoverHandles(t *testing.T) {
	t.Parallel()
	sw := startSWTPM(t, false)
	first := openSpec(t, sw.Spec())
	_, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(first)
	if err != nil {
		t.Fatal(err)
	}
	if n := transients(t, first); n != 1 {
		t.Fatalf("%d transient objects after CreatePrimary, want 1", n)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if n := transients(t, openSpec(t, sw.Spec())); n != 0 {
		t.Errorf("%d transient objects left after reopening, want 0", n)
	}
}

func transients(t *testing.T, tpm *hsm.TPM) int {
	t.Helper()
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: 0x80000000, PropertyCount: 32}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		t.Fatal(err)
	}
	return len(hs.Handle)
}

func TestSWTPMUnixSocket(t *testing.T) {
	t.Parallel()
	sw := startSWTPM(t, true)
	e, err := openSpec(t, sw.Spec()).Endorsement(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	roots, err := hsm.LoadRoots(sw.RootsDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := roots.VerifyEKCert(t.Context(), e); err != nil {
		t.Error(err)
	}
}

// Two swtpms: each one's certificate validates with its own EK only.
func TestSWTPMCertificateOfAnotherSWTPM(t *testing.T) {
	t.Parallel()
	a, b := startSWTPM(t, false), startSWTPM(t, false)
	ea, err := openSpec(t, a.Spec()).Endorsement(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	eb, err := openSpec(t, b.Spec()).Endorsement(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	roots, err := hsm.LoadRoots(a.RootsDir())
	if err != nil {
		t.Fatal(err)
	}
	mixed := *eb
	mixed.EKCert = ea.EKCert
	wantKind(t, roots.VerifyEKCert(t.Context(), &mixed), station.KindUnauthorized)
	// b's certificate is from b's own local CA, which a's folder lacks.
	wantKind(t, roots.VerifyEKCert(t.Context(), eb), station.KindUnauthorized)
}
