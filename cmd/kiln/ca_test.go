package main

import (
	"bytes"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/pki"
)

// kilnWith runs one kiln command line with extra environment variables.
func kilnWith(t *testing.T, home string, vars map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	e := &env{stdout: &out, stderr: &errb, getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return vars[k]
	}}
	code := run(t.Context(), args, e)
	return code, out.String(), errb.String()
}

func TestCAInitShowExport(t *testing.T) {
	home := t.TempDir()
	pass := map[string]string{"KILN_CA_PASSPHRASE": "line 4 passphrase"}
	code, out, errOut := kilnWith(t, home, pass, "ca", "init", "--name", "Line 4")
	if code != exitPass {
		t.Fatalf("kiln ca init: exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(out, "station CA created") || !strings.Contains(out, "CN=Line 4 Root CA") || !strings.Contains(out, "CN=Line 4 Intermediate CA") {
		t.Errorf("kiln ca init printed:\n%s", out)
	}
	if code, out, _ = kilnWith(t, home, pass, "ca", "init"); code != exitPass || !strings.Contains(out, "exists already") {
		t.Errorf("a second kiln ca init: exit %d, printed:\n%s", code, out)
	}

	// The chain exported verifies: intermediate under root.
	code, out, errOut = kilnWith(t, home, pass, "ca", "export")
	if code != exitPass {
		t.Fatalf("kiln ca export: exit %d: %s", code, errOut)
	}
	certs, err := pki.ParseCertificates([]byte(out))
	if err != nil || len(certs) != 2 {
		t.Fatalf("exported chain: %d certificates, %v\n%s", len(certs), err, out)
	}
	roots := x509.NewCertPool()
	roots.AddCert(certs[1])
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("exported intermediate does not verify under the exported root: %v", err)
	}
	if strings.Contains(out, "PRIVATE KEY") {
		t.Error("kiln ca export printed a private key")
	}

	// show --json names the custody and counts nothing issued yet.
	code, out, _ = kilnWith(t, home, pass, "ca", "show", "--json")
	var info caInfo
	if code != exitPass || json.Unmarshal([]byte(out), &info) != nil {
		t.Fatalf("kiln ca show --json: exit %d\n%s", code, out)
	}
	if info.Mode != "embedded" || !strings.Contains(info.Custody, "AES-256-GCM") || info.Issued == nil || *info.Issued != 0 || len(info.Intermediates) != 1 {
		t.Errorf("ca show: %+v", info)
	}

	// The key files are sealed: the passphrase is needed to use them.
	for _, name := range []string{"root.key", "intermediate.key"} {
		b, err := os.ReadFile(filepath.Join(home, caDirName, name))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte("PRIVATE KEY")) || !bytes.Contains(b, []byte("AES-256-GCM")) {
			t.Errorf("%s is not a sealed key file:\n%s", name, b)
		}
	}
	code, _, errOut = kilnWith(t, home, map[string]string{"KILN_CA_PASSPHRASE": "a wrong one"}, "ca", "init")
	if code == exitPass || !strings.Contains(errOut, "passphrase") {
		t.Errorf("kiln ca init with a wrong passphrase: exit %d, stderr %q; want a failure naming the passphrase", code, errOut)
	}
	code, _, errOut = kilnWith(t, home, nil, "ca", "init")
	if code == exitPass || !strings.Contains(errOut, "passphrase") {
		t.Errorf("kiln ca init with the generated passphrase instead of the one used: exit %d, stderr %q", code, errOut)
	}
}

// Without a passphrase in the environment, the data dir gets its own (the
// embedded default), and kiln ca show warns about it.
func TestCAGeneratedPassphrase(t *testing.T) {
	home := t.TempDir()
	if code, out, errOut := kilnWith(t, home, nil, "ca", "init"); code != exitPass {
		t.Fatalf("kiln ca init: exit %d\n%s%s", code, out, errOut)
	}
	fi, err := os.Stat(filepath.Join(home, passphraseFileName))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("generated passphrase file: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}
	_, out, _ := kilnWith(t, home, nil, "ca", "show")
	if !strings.Contains(out, "warning") || !strings.Contains(out, "KILN_CA_PASSPHRASE") {
		t.Errorf("kiln ca show does not warn about the generated passphrase:\n%s", out)
	}
}

// A CA under a customer's root: CSR out, signed certificate in.
func TestCAUnderCustomerRoot(t *testing.T) {
	home := t.TempDir()
	pass := map[string]string{"KILN_CA_PASSPHRASE": "p"}
	csrPath := filepath.Join(t.TempDir(), "station.csr")
	if code, out, errOut := kilnWith(t, home, pass, "ca", "init", "--csr", csrPath); code != exitPass {
		t.Fatalf("kiln ca init --csr: exit %d\n%s%s", code, out, errOut)
	}
	b, err := os.ReadFile(csrPath)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		t.Fatalf("the CSR written does not parse or verify: %v", err)
	}
	customer, err := fixtures.NewCA("Customer Root")
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "Line 4 under Customer"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(5, 0, 0),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, customer.Cert, csr.PublicKey, customer.Key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	signed, root := filepath.Join(dir, "signed.pem"), filepath.Join(dir, "root.pem")
	os.WriteFile(signed, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: customer.Cert.Raw}), 0o644)

	// The customer's root as the intermediate is refused: not for our key.
	if code, _, errOut := kilnWith(t, home, pass, "ca", "import", "--cert", root, "--root", root); code == exitPass || !strings.Contains(errOut, "not for this station's intermediate key") {
		t.Errorf("importing a certificate for another key: exit %d, %s", code, errOut)
	}
	code, out, errOut := kilnWith(t, home, pass, "ca", "import", "--cert", signed, "--root", root)
	if code != exitPass || !strings.Contains(out, "CN=Customer Root") {
		t.Fatalf("kiln ca import: exit %d\n%s%s", code, out, errOut)
	}
	_, out, _ = kilnWith(t, home, pass, "ca", "export", "--what", "root")
	if certs, _ := pki.ParseCertificates([]byte(out)); len(certs) != 1 || !certs[0].Equal(customer.Cert) {
		t.Errorf("exported root is not the customer's:\n%s", out)
	}
}

func TestShiftOf(t *testing.T) {
	loc := time.Local
	for _, c := range []struct {
		at   time.Time
		want string
	}{
		{time.Date(2026, 11, 25, 6, 0, 0, 0, loc), "2026-11-25/early"},
		{time.Date(2026, 11, 25, 13, 59, 0, 0, loc), "2026-11-25/early"},
		{time.Date(2026, 11, 25, 14, 0, 0, 0, loc), "2026-11-25/late"},
		{time.Date(2026, 11, 25, 22, 30, 0, 0, loc), "2026-11-25/night"},
		{time.Date(2026, 11, 26, 5, 59, 0, 0, loc), "2026-11-25/night"},
	} {
		if got := shiftOf(c.at); got != c.want {
			t.Errorf("shiftOf(%v) = %s, want %s", c.at, got, c.want)
		}
	}
}
