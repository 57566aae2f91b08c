//go:build stepca

// The X.509 method with a remote step-ca as the signing CA: a real step-ca
// built from the module and started on loopback (slow the first time, so it
// sits behind the stepca tag and runs in make e2e).

package main

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/pki"
)

func TestProvisionX509RemoteStepCA(t *testing.T) {
	bin, err := fixtures.StepCABinary(t.Context(), ".")
	if err != nil {
		t.Fatal(err)
	}
	root, err := fixtures.NewCA("Factory Root")
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate("Factory Issuing CA")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	const password = "provisioner password"
	ca, err := fixtures.StartStepCA(t.Context(), fixtures.StepCAConfig{Binary: bin, Dir: dir,
		Root: root.Cert, Intermediate: inter.Cert, IntermediateKey: inter.Key,
		Provisioner: "line-4", Password: password, LeafTemplate: pki.DefaultLeafTemplate})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("step-ca log:\n%s", ca.Log())
		}
		ca.Close()
	}()
	rootPath, pwPath := filepath.Join(dir, "factory-root.pem"), filepath.Join(dir, "password")
	os.WriteFile(rootPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Cert.Raw}), 0o644)
	os.WriteFile(pwPath, []byte(password+"\n"), 0o600)

	home := t.TempDir()
	if code, out, errOut := kiln(t, home, "ca", "use-remote", "--url", ca.URL, "--provisioner", "line-4", "--root", rootPath, "--password-file", pwPath); code != exitPass {
		t.Fatalf("kiln ca use-remote: exit %d\n%s%s", code, out, errOut)
	}
	d, _ := startDUT(t, dutOpts{serial: "SN-REMOTE-01"})
	code, rr, stderr := provisionJSON(t, home, "--port", d.path, "--method", "x509", "--verify", "embedded")
	if code != exitPass {
		t.Fatalf("exit %d: %s\nsteps: %+v\n%s", code, rr.Error, rr.Steps, stderr)
	}
	u := mustUnit(t, home, "SN-REMOTE-01")
	leaf, err := x509.ParseCertificate(u.Certificate)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(leaf.Issuer.CommonName, "Factory Issuing CA") {
		t.Errorf("leaf issued by %s, want the factory step-ca", leaf.Issuer)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root.Cert)
	inters.AddCert(inter.Cert)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("leaf does not verify up to the factory root: %v", err)
	}
	if rr.DPSStatus != "assigned" || rr.TelemetryAt.IsZero() {
		t.Errorf("end-to-end: %q, telemetry %v", rr.DPSStatus, rr.TelemetryAt)
	}
}
