package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

func stepNames(r *station.Run) string {
	var names []string
	for _, s := range r.Steps {
		names = append(names, s.Name)
	}
	return strings.Join(names, ",")
}

func requireAllOK(t *testing.T, r *station.Run) {
	t.Helper()
	for _, s := range r.Steps {
		if s.Status != station.StepOK && s.Status != station.StepSkip {
			t.Errorf("step %s: %s %s", s.Name, s.Status, s.Error)
		}
	}
}

// The X.509 method end to end on a simulated DUT with a TPM: the DUT makes
// its key in the TPM, the station CA issues the leaf, the chain is written
// and read back, the DUT registers with its certificate through the X.509
// group and sends telemetry to the hub with it.
func TestProvisionX509EndToEnd(t *testing.T) {
	home := t.TempDir()
	d, _ := startDUT(t, dutOpts{serial: "SN-X509-01"})
	code, rr, stderr := provisionJSON(t, home, "--port", d.path, "--method", "x509", "--verify", "embedded")
	if code != exitPass {
		t.Fatalf("exit %d: %s\nsteps: %+v\n%s", code, rr.Error, rr.Steps, stderr)
	}
	requireAllOK(t, rr.Run)
	if got, want := stepNames(rr.Run), strings.Join(station.X509EndToEndSteps, ","); got != want {
		t.Errorf("steps %s, want %s", got, want)
	}
	if rr.RegistrationID != "sn-x509-01" || rr.DPSStatus != "assigned" || rr.DeviceID != rr.RegistrationID || rr.TelemetryAt.IsZero() {
		t.Errorf("run: regid %q status %q device %q telemetry %v", rr.RegistrationID, rr.DPSStatus, rr.DeviceID, rr.TelemetryAt)
	}

	u := mustUnit(t, home, "SN-X509-01")
	if u.Method != station.MethodX509 || u.KeyStorage != station.KeyInTPM || u.EKHash != "" || u.EnrollmentGroup != defaultX509Group {
		t.Errorf("unit: method %s, key storage %q, EK hash %q, group %q; want x509, tpm, none, %s", u.Method, u.KeyStorage, u.EKHash, u.EnrollmentGroup, defaultX509Group)
	}
	leaf, err := x509.ParseCertificate(u.Certificate)
	if err != nil {
		t.Fatalf("recorded certificate: %v", err)
	}
	if _, tp := station.Thumbprints(u.Certificate); tp != u.CertThumbprint || hex.EncodeToString(leaf.SerialNumber.Bytes()) != u.CertSerial {
		t.Errorf("recorded thumbprint %s / serial %s do not match the certificate", u.CertThumbprint, u.CertSerial)
	}
	if leaf.Subject.CommonName != "sn-x509-01" || !hasEKU(leaf, x509.ExtKeyUsageClientAuth) {
		t.Errorf("leaf: CN %q, EKU %v; want the registration ID and clientAuth", leaf.Subject.CommonName, leaf.ExtKeyUsage)
	}

	// The chain on the DUT verifies with crypto/x509 up to the station root.
	l, err := link.Open(t.Context(), d.path, link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	id, err := l.ReadIdentity(t.Context())
	l.Close() // one link on a port at a time: the next run opens it again
	if err != nil {
		t.Fatal(err)
	}
	if len(id.CertChain) < 2 || !bytes.Equal(id.CertChain[0], u.Certificate) {
		t.Fatalf("the DUT holds %d certificates, leaf matches record: %v", len(id.CertChain), len(id.CertChain) > 0 && bytes.Equal(id.CertChain[0], u.Certificate))
	}
	_, rootPEM, _ := kiln(t, home, "ca", "export", "--what", "root")
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	rc, err := pki.ParseCertificates([]byte(rootPEM))
	if err != nil || len(rc) != 1 {
		t.Fatalf("station root: %v", err)
	}
	roots.AddCert(rc[0])
	for _, der := range id.CertChain[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		inters.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("the DUT's chain does not verify up to the station root: %v", err)
	}

	// One unit, one provisioning.
	code, rr, _ = provisionJSON(t, home, "--port", d.path, "--method", "x509")
	if code != exitFail || rr.ErrorKind != "conflict" || !strings.Contains(rr.Error, "already provisioned") {
		t.Errorf("second run of the same unit: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
}

func hasEKU(c *x509.Certificate, want x509.ExtKeyUsage) bool {
	for _, u := range c.ExtKeyUsage {
		if u == want {
			return true
		}
	}
	return false
}

// A DUT without a TPM keeps its key in software, and still passes the
// end-to-end check with it.
func TestProvisionX509SoftwareKey(t *testing.T) {
	home := t.TempDir()
	dut, err := fixtures.StartDUT(t.Context(), fixtures.DUTConfig{Info: station.DeviceInfo{Serial: "SN-X509-02"}, LineRate: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer dut.Close()
	code, rr, stderr := provisionJSON(t, home, "--port", dut.Path(), "--method", "x509", "--verify", "embedded")
	if code != exitPass {
		t.Fatalf("exit %d: %s\nsteps: %+v\n%s", code, rr.Error, rr.Steps, stderr)
	}
	if u := mustUnit(t, home, "SN-X509-02"); u.KeyStorage != station.KeyInSoftware {
		t.Errorf("key storage %q, want software", u.KeyStorage)
	}
}

// The symmetric-key method end to end: the key written is HMAC(group key,
// registration ID), confirmed by fingerprint, and the DUT registers with it
// through the group.
func TestProvisionSymKeyEndToEnd(t *testing.T) {
	home := t.TempDir()
	dut, err := fixtures.StartDUT(t.Context(), fixtures.DUTConfig{Info: station.DeviceInfo{Serial: "SN-SYM-01"}, LineRate: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer dut.Close()
	code, rr, stderr := provisionJSON(t, home, "--port", dut.Path(), "--method", "symkey", "--verify", "embedded")
	if code != exitPass {
		t.Fatalf("exit %d: %s\nsteps: %+v\n%s", code, rr.Error, rr.Steps, stderr)
	}
	requireAllOK(t, rr.Run)
	if got, want := stepNames(rr.Run), strings.Join(station.SymKeyEndToEndSteps, ","); got != want {
		t.Errorf("steps %s, want %s", got, want)
	}
	if rr.DPSStatus != "assigned" || rr.DeviceID != "sn-sym-01" || rr.TelemetryAt.IsZero() {
		t.Errorf("run: status %q device %q telemetry %v", rr.DPSStatus, rr.DeviceID, rr.TelemetryAt)
	}
	u := mustUnit(t, home, "SN-SYM-01")
	pass, err := os.ReadFile(filepath.Join(home, passphraseFileName))
	if err != nil {
		t.Fatal(err)
	}
	gk, err := (&pki.FileKeys{Dir: filepath.Join(home, caDirName), Passphrase: bytes.TrimSpace(pass)}).Secret(t.Context(), symKeySecretName, 32)
	if err != nil {
		t.Fatal(err)
	}
	m := hmac.New(sha256.New, gk)
	m.Write([]byte("sn-sym-01"))
	if want := station.KeyFingerprint(m.Sum(nil)); u.SymKeySHA256 != want || u.EnrollmentGroup != defaultSymKeyGroup {
		t.Errorf("unit: key sha256 %s group %q; want %s, %s", u.SymKeySHA256, u.EnrollmentGroup, want, defaultSymKeyGroup)
	}
	// The group key is nowhere in the record or the database in clear.
	db, err := os.ReadFile(filepath.Join(home, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(db, gk) || bytes.Contains(db, m.Sum(nil)) || strings.Contains(stderr, hex.EncodeToString(gk)) {
		t.Error("a symmetric key is stored or logged in clear")
	}
}

// The station CA's checks reach the technician as a FAIL with the reason:
// a key type the profile forbids, and a cap that is reached.
func TestProvisionX509Refusals(t *testing.T) {
	home := t.TempDir()
	cfg, _ := json.Marshal(map[string]any{"device_key_type": "RSA-2048", "ca": map[string]any{"max_per_batch": 1}})
	if err := os.WriteFile(filepath.Join(home, configFile), cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	d, closeDUT := startDUT(t, dutOpts{serial: "SN-X509-03"})
	code, rr, _ := provisionJSON(t, home, "--port", d.path, "--method", "x509")
	if code != exitFail || !strings.Contains(rr.Error, "RSA-2048") {
		t.Errorf("RSA key where EC-P256 is allowed: exit %d: %s", code, rr.Error)
	}
	if s := rr.Steps[len(rr.Steps)-1]; s.Name != station.StepIssue || s.Status != station.StepFail {
		t.Errorf("failed at %s (%s), want %s", s.Name, s.Status, station.StepIssue)
	}
	closeDUT()

	// EC keys now; the first unit takes the batch's only leaf.
	cfg, _ = json.Marshal(map[string]any{"ca": map[string]any{"max_per_batch": 1}})
	os.WriteFile(filepath.Join(home, configFile), cfg, 0o600)
	d, closeDUT = startDUT(t, dutOpts{serial: "SN-X509-04"})
	if code, rr, _ := provisionJSON(t, home, "--port", d.path, "--method", "x509"); code != exitPass {
		t.Fatalf("first unit: exit %d: %s", code, rr.Error)
	}
	closeDUT()
	d, _ = startDUT(t, dutOpts{serial: "SN-X509-05"})
	code, rr, _ = provisionJSON(t, home, "--port", d.path, "--method", "x509")
	if code != exitFail || rr.ErrorKind != "conflict" || !strings.Contains(rr.Error, "cap") {
		t.Errorf("over the batch cap: exit %d kind %s: %s", code, rr.ErrorKind, rr.Error)
	}
}

// CSRs a DUT could send wrong: another CN, a broken signature, a key type
// the profile does not allow. Each is refused with a reason.
func TestStationIssuerRefusesBadCSRs(t *testing.T) {
	home := t.TempDir()
	c, err := loadConfig(&env{getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(string) string { return "" }}
	iss, closeFn, err := openIssuer(t.Context(), e, c)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	csr := func(cn string, key any) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good := csr("unit-1", ec)
	if _, err := iss.Issue(t.Context(), station.IssueRequest{CSR: good, RegistrationID: "unit-1"}); err != nil {
		t.Fatalf("a good CSR is refused: %v", err)
	}
	broken := bytes.Clone(good)
	broken[len(broken)-3] ^= 0xff
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, c := range []struct {
		name, want string
		kind       station.Kind
		csr        []byte
	}{
		{"wrong CN", "unit-1", station.KindInvalid, csr("unit-2", ec)},
		{"bad signature", "signature does not verify", station.KindUnauthorized, broken},
		{"forbidden key type", "RSA-2048", station.KindInvalid, csr("unit-1", rsaKey)},
		{"not a CSR", "does not parse", station.KindInvalid, []byte("hello")},
	} {
		_, err := iss.Issue(t.Context(), station.IssueRequest{CSR: c.csr, RegistrationID: "unit-1"})
		if station.KindOf(err) != c.kind || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v; want %v naming %q", c.name, err, c.kind, c.want)
		}
	}
}

// The station CA behind the embedded DPS's certificate issuance (kiln serve
// --issue-certs): a CSR for the registration ID gets a leaf and the
// intermediate; one for another ID is refused.
func TestDPSIssuer(t *testing.T) {
	home := t.TempDir()
	c, err := loadConfig(&env{getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	iss, closeFn, err := openIssuer(t.Context(), &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(string) string { return "" }}, c)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-7"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := dpsIssuer{iss}.IssueDeviceCertificate(t.Context(), "dev-7", csr)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].Subject.CommonName != "dev-7" || chain[0].CheckSignatureFrom(chain[1]) != nil || !bytes.Equal(chain[1].Raw, iss.SigningCertificate()) {
		t.Errorf("chain of %d: leaf %v", len(chain), chain[0].Subject)
	}
	if _, err := (dpsIssuer{iss}).IssueDeviceCertificate(t.Context(), "dev-8", csr); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a CSR for another registration ID: %v", err)
	}
}
