//go:build stepca

// The remote step-ca test builds a real step-ca from the module (about ten
// minutes cold on two cores, so it sits behind the stepca build tag and runs
// in `make e2e`: go test -tags stepca ./pki/). The binary is cached under
// os.UserCacheDir()/kiln-test/, keyed by the module version.

package pki_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

func TestRemoteStepCA(t *testing.T) {
	bin, err := fixtures.StepCABinary(t.Context(), ".")
	if err != nil {
		t.Fatal(err)
	}

	// The factory CA's root and intermediate, made with pki itself.
	dir := t.TempDir()
	factory := newCA(t, pki.Config{Dir: filepath.Join(dir, "factory"), Name: "Factory"})
	interKey, err := fastKeys(filepath.Join(dir, "factory")).Signer(t.Context(), pki.IntermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	const password = "provisioner password"
	ca, err := fixtures.StartStepCA(t.Context(), fixtures.StepCAConfig{Binary: bin, Dir: dir,
		Root: factory.Root(), Intermediate: factory.Intermediate(), IntermediateKey: interKey,
		Provisioner: "kiln-station", Password: password, LeafTemplate: pki.DefaultLeafTemplate})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("step-ca log:\n%s", ca.Log())
		}
		ca.Close()
	})
	url := ca.URL

	log, err := pki.OpenFileLog(filepath.Join(t.TempDir(), "issuance.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	remote, err := pki.NewRemote(t.Context(), pki.RemoteConfig{
		URL: url, Root: factory.Root(), Provisioner: "kiln-station", Password: []byte(password),
		Profile: pki.Profile{Validity: 30 * 24 * time.Hour, MaxPerBatch: 2}, Log: log,
	})
	if err != nil {
		t.Fatal(err)
	}

	leaf, err := remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r1"), pki.IssueRequest{RegistrationID: "unit-r1", Operator: "ana", Batch: "rb", IncludeRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	verifyChain(t, leaf, factory.Root())
	if !leaf.Chain[1].Equal(factory.Intermediate()) {
		t.Error("the remote leaf is not signed by the factory intermediate")
	}
	if life := time.Until(leaf.Certificate.NotAfter); life < 29*24*time.Hour {
		t.Errorf("remote leaf lifetime %v, want the profile's 30 days", life)
	}

	// Local checks and caps apply before the CA is asked.
	_, err = remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r2"), pki.IssueRequest{RegistrationID: "unit-r3", Batch: "rb"})
	wantKind(t, err, station.KindInvalid, `CSR subject CN "unit-r2" is not the unit's registration ID "unit-r3"`)
	_, err = remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.RSA2048), "unit-r2"), pki.IssueRequest{RegistrationID: "unit-r2", Batch: "rb"})
	wantKind(t, err, station.KindInvalid, "CSR key type RSA-2048 is not allowed")
	if _, err := remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r2"), pki.IssueRequest{RegistrationID: "unit-r2", Batch: "rb"}); err != nil {
		t.Fatal(err)
	}
	_, err = remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r4"), pki.IssueRequest{RegistrationID: "unit-r4", Batch: "rb"})
	wantKind(t, err, station.KindConflict, `batch "rb" has reached its cap of 2`)
	if all, _ := log.Entries(t.Context()); len(all) != 2 {
		t.Errorf("%d issuances logged, want 2", len(all))
	}

	// A wrong provisioner password is refused.
	_, err = pki.NewRemote(t.Context(), pki.RemoteConfig{URL: url, Root: factory.Root(), Provisioner: "kiln-station", Password: []byte("nope"), Log: log})
	wantKind(t, err, station.KindUnauthorized, "kiln-station")
}
