package pki_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

const testPassphrase = "correct horse battery staple"

// fastKeys is an encrypted key store with a low scrypt cost, for tests that
// are not about custody.
func fastKeys(dir string) *pki.FileKeys {
	return &pki.FileKeys{Dir: dir, Passphrase: []byte(testPassphrase), ScryptN: 1 << 10}
}

func newCA(t testing.TB, cfg pki.Config) *pki.CA {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	if cfg.Keys == nil {
		cfg.Keys = fastKeys(cfg.Dir)
	}
	ca, err := pki.Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open CA: %v", err)
	}
	t.Cleanup(func() { ca.Close() })
	return ca
}

func deviceKey(t testing.TB, kt pki.KeyType) crypto.Signer {
	t.Helper()
	var (
		k   crypto.Signer
		err error
	)
	switch kt {
	case pki.ECDSAP256:
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case pki.ECDSAP384:
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case pki.RSA2048:
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case pki.RSA3072:
		k, err = rsa.GenerateKey(rand.Reader, 3072)
	default:
		t.Fatalf("no device key type %s", kt)
	}
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func makeCSR(t testing.TB, key crypto.Signer, cn string) *x509.CertificateRequest {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

// verifyChain checks leaf.Chain up to root for TLS client authentication.
func verifyChain(t *testing.T, leaf *pki.Leaf, root *x509.Certificate) {
	t.Helper()
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range leaf.Chain[1:] {
		inters.AddCert(c)
	}
	chains, err := leaf.Certificate.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatalf("leaf does not verify up to the root: %v", err)
	}
	if got := chains[0][len(chains[0])-1]; !got.Equal(root) {
		t.Fatalf("chain ends at %s, want %s", got.Subject, root.Subject)
	}
	// ServerAuth must not be granted.
	if _, err := leaf.Certificate.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("leaf verifies for serverAuth; want clientAuth only")
	}
}

func wantKind(t *testing.T, err error, kind station.Kind, substr string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want %s containing %q", kind, substr)
	}
	if got := station.KindOf(err); got != kind {
		t.Errorf("kind = %s, want %s (err: %v)", got, kind, err)
	}
	if !strings.Contains(err.Error(), substr) {
		t.Errorf("error %q does not contain %q", err, substr)
	}
}

func TestIssueChainVerifies(t *testing.T) {
	for _, tc := range []struct {
		ca, device pki.KeyType
		allowed    []pki.KeyType
	}{
		{pki.ECDSAP256, pki.ECDSAP256, nil},
		{pki.ECDSAP384, pki.ECDSAP384, []pki.KeyType{pki.ECDSAP384}},
		{pki.RSA2048, pki.RSA2048, []pki.KeyType{"RSA-2048+"}},
		{pki.RSA3072, pki.RSA3072, []pki.KeyType{"RSA-2048+", pki.ECDSAP256}},
	} {
		t.Run(string(tc.ca)+"/"+string(tc.device), func(t *testing.T) {
			now := time.Now()
			ca := newCA(t, pki.Config{KeyType: tc.ca, Profile: pki.Profile{AllowedKeys: tc.allowed, Validity: 48 * time.Hour}})
			if got := pki.KeyTypeOf(ca.Intermediate().PublicKey); got != tc.ca {
				t.Errorf("intermediate key type = %s, want %s", got, tc.ca)
			}
			csr := makeCSR(t, deviceKey(t, tc.device), "unit-0001")
			leaf, err := ca.Issue(t.Context(), csr, pki.IssueRequest{RegistrationID: "unit-0001", Operator: "ana", Batch: "b1", IncludeRoot: true})
			if err != nil {
				t.Fatal(err)
			}
			verifyChain(t, leaf, ca.Root())
			c := leaf.Certificate
			if c.Subject.CommonName != "unit-0001" {
				t.Errorf("CN = %q, want unit-0001", c.Subject.CommonName)
			}
			if c.IsCA {
				t.Error("leaf is a CA")
			}
			if len(leaf.Chain) != 3 || !leaf.Chain[1].Equal(ca.Intermediate()) || !leaf.Chain[2].Equal(ca.Root()) {
				t.Errorf("chain = %d certificates, want leaf, intermediate, root", len(leaf.Chain))
			}
			if life := c.NotAfter.Sub(now); life < 47*time.Hour || life > 49*time.Hour {
				t.Errorf("leaf lifetime %v, want the profile's 48h", life)
			}
			if !c.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(csr.PublicKey) {
				t.Error("leaf is not for the CSR's key")
			}
			certs, err := pki.ParseCertificates(leaf.ChainPEM())
			if err != nil || len(certs) != 3 {
				t.Errorf("ChainPEM parses to %d certificates (%v), want 3", len(certs), err)
			}
		})
	}
}

func TestIssueRejects(t *testing.T) {
	ca := newCA(t, pki.Config{Profile: pki.Profile{AllowedKeys: []pki.KeyType{pki.ECDSAP256}}})
	good := makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-0002")

	// A CSR whose signature was made over other bytes.
	tampered := makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-0002")
	raw := bytes.Clone(tampered.Raw)
	sig := bytes.Index(raw, tampered.Signature)
	raw[sig+len(tampered.Signature)/2] ^= 0xff
	bad, err := x509.ParseCertificateRequest(raw)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		csr   *x509.CertificateRequest
		regID string
		kind  station.Kind
		msg   string
	}{
		{"bad signature", bad, "unit-0002", station.KindUnauthorized, "CSR signature does not verify"},
		{"wrong CN", good, "unit-0003", station.KindInvalid, `CSR subject CN "unit-0002" is not the unit's registration ID "unit-0003"`},
		{"RSA not allowed", makeCSR(t, deviceKey(t, pki.RSA2048), "unit-0002"), "unit-0002", station.KindInvalid, "CSR key type RSA-2048 is not allowed: the station profile accepts EC-P256"},
		{"P-384 not allowed", makeCSR(t, deviceKey(t, pki.ECDSAP384), "unit-0002"), "unit-0002", station.KindInvalid, "CSR key type EC-P384 is not allowed"},
		{"bad registration ID", makeCSR(t, deviceKey(t, pki.ECDSAP256), "Unit 2"), "Unit 2", station.KindInvalid, "registration ID"},
		{"no CSR", nil, "unit-0002", station.KindInvalid, "no CSR"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaf, err := ca.Issue(t.Context(), tc.csr, pki.IssueRequest{RegistrationID: tc.regID, Operator: "ana"})
			if leaf != nil {
				t.Errorf("got a leaf %v", leaf.Certificate.Subject)
			}
			wantKind(t, err, tc.kind, tc.msg)
		})
	}

	t.Run("RSA below the minimum", func(t *testing.T) {
		ca := newCA(t, pki.Config{Profile: pki.Profile{AllowedKeys: []pki.KeyType{"RSA-3072+"}}})
		_, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.RSA2048), "unit-0002"), pki.IssueRequest{RegistrationID: "unit-0002"})
		wantKind(t, err, station.KindInvalid, "CSR key type RSA-2048 is not allowed: the station profile accepts RSA-3072+")
	})
}

func TestTemplateFromProfile(t *testing.T) {
	tmpl := `{
		"subject": {"commonName": {{ toJson .Subject.CommonName }}, "organization": ["Kiln line 3"], "serialNumber": {{ toJson .Kiln.Batch }}},
		"keyUsage": ["digitalSignature"],
		"extKeyUsage": ["clientAuth"]
	}`
	ca := newCA(t, pki.Config{Profile: pki.Profile{Template: tmpl}})
	leaf, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-7"), pki.IssueRequest{RegistrationID: "unit-7", Batch: "B-42"})
	if err != nil {
		t.Fatal(err)
	}
	if got := leaf.Certificate.Subject.Organization; len(got) != 1 || got[0] != "Kiln line 3" {
		t.Errorf("organization = %v, want [Kiln line 3]", got)
	}
	if got := leaf.Certificate.Subject.SerialNumber; got != "B-42" {
		t.Errorf("subject serialNumber = %q, want the batch B-42", got)
	}

	_, err = pki.Open(t.Context(), pki.Config{Dir: t.TempDir(), Keys: fastKeys(t.TempDir()), Profile: pki.Profile{Template: `{{ if }`}})
	wantKind(t, err, station.KindInvalid, "fix the profile's template")
}

func TestNamePolicy(t *testing.T) {
	ca := newCA(t, pki.Config{NamePolicy: &pki.NamePolicy{Denied: []string{"unit-banned"}}})
	_, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-banned"), pki.IssueRequest{RegistrationID: "unit-banned"})
	wantKind(t, err, station.KindInvalid, "name policy refuses unit-banned")
	if _, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-fine"), pki.IssueRequest{RegistrationID: "unit-fine"}); err != nil {
		t.Errorf("allowed name refused: %v", err)
	}
}

func TestCaps(t *testing.T) {
	dir := t.TempDir()
	cfg := pki.Config{Dir: dir, Keys: fastKeys(dir), Profile: pki.Profile{MaxPerBatch: 3, MaxPerShift: 4}}
	ca := newCA(t, cfg)
	issue := func(ca *pki.CA, id, batch, shift string) error {
		_, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), id), pki.IssueRequest{RegistrationID: id, Operator: "ana", Batch: batch, Shift: shift})
		return err
	}
	for i := range 3 {
		if err := issue(ca, fmt.Sprintf("u%d", i), "b1", "s1"); err != nil {
			t.Fatal(err)
		}
	}
	wantKind(t, issue(ca, "u3", "b1", "s1"), station.KindConflict, `batch "b1" has reached its cap of 3 certificates: refused`)
	if err := issue(ca, "u4", "b2", "s1"); err != nil {
		t.Fatalf("new batch refused: %v", err)
	}
	wantKind(t, issue(ca, "u5", "b2", "s1"), station.KindConflict, `shift "s1" has reached its cap of 4 certificates: refused`)
	wantKind(t, issue(ca, "u6", "", "s2"), station.KindInvalid, "no batch given")

	// The counters survive a restart.
	ca.Close()
	ca2 := newCA(t, cfg)
	wantKind(t, issue(ca2, "u7", "b1", "s2"), station.KindConflict, `batch "b1" has reached its cap`)
	if err := issue(ca2, "u8", "b2", "s2"); err != nil {
		t.Fatal(err)
	}

	// Concurrent issuance never overshoots a cap.
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	for i := range 8 {
		wg.Go(func() {
			err := issue(ca2, fmt.Sprintf("c%d", i), "b3", "s3")
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				ok++
			} else if station.KindOf(err) != station.KindConflict {
				t.Errorf("concurrent issue: %v", err)
			}
		})
	}
	wg.Wait()
	if ok != 3 {
		t.Errorf("%d concurrent issuances passed a cap of 3", ok)
	}
}

func TestIssuanceLog(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, pki.Config{Dir: dir, Keys: fastKeys(dir)})
	leaf, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-9"), pki.IssueRequest{RegistrationID: "unit-9", Operator: "bo", Batch: "b9", Shift: "2025-06-02/early"})
	if err != nil {
		t.Fatal(err)
	}
	ca.Close()
	l, err := pki.OpenFileLog(filepath.Join(dir, pki.LogFile))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	all, err := l.Entries(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 {
		t.Fatalf("%d log entries, want 1", len(all))
	}
	got := all[0]
	if got.Serial != fmt.Sprintf("%x", leaf.Certificate.SerialNumber) || got.RegistrationID != "unit-9" || got.Operator != "bo" || got.Batch != "b9" || got.Shift != "2025-06-02/early" || got.Subject != "CN=unit-9" || got.KeyType != pki.ECDSAP256 || got.Time.IsZero() {
		t.Errorf("log entry = %+v", got)
	}
	if len(got.PublicKeySHA256) != 64 || got.PublicKeySHA256 != leaf.Issuance.PublicKeySHA256 {
		t.Errorf("public key hash = %q, want %q", got.PublicKeySHA256, leaf.Issuance.PublicKeySHA256)
	}
	if fi, _ := os.Stat(filepath.Join(dir, pki.LogFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("log file mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestReopenUsesSameCA(t *testing.T) {
	dir := t.TempDir()
	a := newCA(t, pki.Config{Dir: dir, Keys: fastKeys(dir)})
	a.Close()
	b := newCA(t, pki.Config{Dir: dir, Keys: fastKeys(dir)})
	if !a.Root().Equal(b.Root()) || !a.Intermediate().Equal(b.Intermediate()) {
		t.Error("reopening made a new CA")
	}
}

func TestKeyCustody(t *testing.T) {
	dir := t.TempDir()
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	keys := &pki.FileKeys{Dir: dir, Passphrase: []byte(testPassphrase)} // default scrypt cost
	ca := newCA(t, pki.Config{Dir: dir, Keys: keys, Logger: logger})
	if _, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-1"), pki.IssueRequest{RegistrationID: "unit-1"}); err != nil {
		t.Fatal(err)
	}
	ca.Close()
	if logs.Len() == 0 {
		t.Fatal("nothing logged; the log check below would prove nothing")
	}

	for _, name := range []string{pki.RootKey, pki.IntermediateKey} {
		key, err := keys.Signer(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		ec := key.(*ecdsa.PrivateKey)
		der, _ := x509.MarshalPKCS8PrivateKey(ec)
		sec1, _ := x509.MarshalECPrivateKey(ec)
		d, err := ec.Bytes()
		if err != nil {
			t.Fatal(err)
		}
		secrets := map[string][]byte{
			"PKCS #8 DER":    der,
			"SEC 1 DER":      sec1,
			"PEM":            pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
			"base64 of DER":  []byte(base64.StdEncoding.EncodeToString(der)),
			"scalar":         d,
			"scalar hex":     fmt.Appendf(nil, "%x", d),
			"scalar base64":  []byte(base64.StdEncoding.EncodeToString(d)),
			"scalar decimal": []byte(new(big.Int).SetBytes(d).String()),
		}
		files, _ := filepath.Glob(filepath.Join(dir, "*"))
		if len(files) < 4 {
			t.Fatalf("only %d files in the CA directory", len(files))
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for what, s := range secrets {
				if bytes.Contains(b, s) {
					t.Errorf("%s holds the %s key's %s", filepath.Base(f), name, what)
				}
			}
		}
		for what, s := range secrets {
			if bytes.Contains(logs.Bytes(), s) {
				t.Errorf("the log holds the %s key's %s", name, what)
			}
		}
		fi, err := os.Stat(filepath.Join(dir, name+".key"))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s.key mode %v, want 0600", name, fi.Mode().Perm())
		}
		b, _ := os.ReadFile(filepath.Join(dir, name+".key"))
		for _, want := range []string{`"kdf": "scrypt"`, `"n": 32768`, `"cipher": "AES-256-GCM"`, `"salt"`} {
			if !bytes.Contains(b, []byte(want)) {
				t.Errorf("%s.key lacks %s", name, want)
			}
		}
	}

	t.Run("wrong passphrase", func(t *testing.T) {
		_, err := pki.Open(t.Context(), pki.Config{Dir: dir, Keys: &pki.FileKeys{Dir: dir, Passphrase: []byte("Tr0ub4dor&3")}})
		wantKind(t, err, station.KindUnauthorized, "wrong passphrase")
	})
	t.Run("no passphrase", func(t *testing.T) {
		_, err := pki.Open(t.Context(), pki.Config{Dir: dir, Keys: &pki.FileKeys{Dir: dir}})
		wantKind(t, err, station.KindUnauthorized, "is encrypted: give the station CA passphrase")
	})
	t.Run("altered parameters", func(t *testing.T) {
		alt := t.TempDir()
		b, _ := os.ReadFile(filepath.Join(dir, "intermediate.key"))
		os.WriteFile(filepath.Join(alt, "intermediate.key"), bytes.Replace(b, []byte(`"p": 1`), []byte(`"p": 2`), 1), 0o600)
		_, err := (&pki.FileKeys{Dir: alt, Passphrase: []byte(testPassphrase)}).Signer(t.Context(), "intermediate")
		wantKind(t, err, station.KindUnauthorized, "wrong passphrase")
	})
	t.Run("no passphrase on create", func(t *testing.T) {
		d := t.TempDir()
		_, err := pki.Open(t.Context(), pki.Config{Dir: d, Keys: &pki.FileKeys{Dir: d}})
		wantKind(t, err, station.KindInvalid, "always encrypted at rest")
	})
}

func TestIntermediateUnderCustomerRoot(t *testing.T) {
	// The customer's CA: a root and its key, outside the station.
	custDir := t.TempDir()
	cust := newCA(t, pki.Config{Dir: custDir, Keys: fastKeys(custDir), Name: "Customer"})
	custRootKey, err := fastKeys(custDir).Signer(t.Context(), pki.RootKey)
	if err != nil {
		t.Fatal(err)
	}
	custRoot := cust.Root()

	dir := t.TempDir()
	cfg := pki.Config{Dir: dir, Keys: fastKeys(dir), Name: "Line 3"}
	csr, err := pki.RequestIntermediate(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("intermediate CSR: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, pki.CSRFile)); err != nil {
		t.Fatal(err)
	}
	// Until the signed certificate is imported, the CA cannot be opened.
	_, err = pki.Open(t.Context(), cfg)
	wantKind(t, err, station.KindConflict, "awaits the customer's signature")

	sign := func(isCA bool, pub crypto.PublicKey, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
		tmpl := &x509.Certificate{
			SerialNumber: bigSerial(t), Subject: csr.Subject,
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: isCA,
		}
		if !isCA {
			tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c
	}
	otherRoot := newCA(t, pki.Config{Name: "Other"}).Root()

	t.Run("not a CA", func(t *testing.T) {
		_, err := pki.ImportIntermediate(t.Context(), cfg, sign(false, csr.PublicKey, custRoot, custRootKey), custRoot)
		wantKind(t, err, station.KindInvalid, "is not a CA certificate")
	})
	t.Run("another key", func(t *testing.T) {
		_, err := pki.ImportIntermediate(t.Context(), cfg, sign(true, deviceKey(t, pki.ECDSAP256).Public(), custRoot, custRootKey), custRoot)
		wantKind(t, err, station.KindInvalid, "is not for this station's intermediate key")
	})
	t.Run("wrong root", func(t *testing.T) {
		_, err := pki.ImportIntermediate(t.Context(), cfg, sign(true, csr.PublicKey, custRoot, custRootKey), otherRoot)
		wantKind(t, err, station.KindUnauthorized, "does not chain to root")
	})

	signed := sign(true, csr.PublicKey, custRoot, custRootKey)
	ca, err := pki.ImportIntermediate(t.Context(), cfg, signed, custRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	leaf, err := ca.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-c1"), pki.IssueRequest{RegistrationID: "unit-c1"})
	if err != nil {
		t.Fatal(err)
	}
	verifyChain(t, leaf, custRoot)
	ca.Close()

	// Reopened later, it is the same CA under the customer's root.
	ca2 := newCA(t, cfg)
	if !ca2.Root().Equal(custRoot) || !ca2.Intermediate().Equal(signed) {
		t.Error("reopened CA is not the imported one")
	}
	if _, err := os.Stat(filepath.Join(dir, pki.RootKey+".key")); !os.IsNotExist(err) {
		t.Errorf("a station root key exists under a customer root (%v)", err)
	}
}

func bigSerial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
