package cloudsync_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

type testCert struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var certSerial int64

func newCert(t testing.TB, cn string, parent *testCert, ca bool) *testCert {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	certSerial++
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(certSerial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: ca}
	if ca {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	issuer, signer := tmpl, key
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCert{c, key}
}

// vendorEntry builds one Microchip-style entry for a part, signed by
// signer with x5c chain.
func vendorEntry(t testing.TB, uid string, device *testCert, signer *testCert, chain ...*x509.Certificate) cloudsync.VendorEntry {
	t.Helper()
	raw, err := device.key.PublicKey.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	x, y := raw[1:33], raw[33:]
	payload := map[string]any{"version": 1, "model": "ATECC608B", "partNumber": "ATECC608B-TFLXTLS", "uniqueId": uid,
		"provisioningTimestamp": "2026-11-01T10:00:00.000Z",
		"publicKeySet": map[string]any{"keys": []map[string]any{{"kid": "0", "kty": "EC", "crv": "P-256",
			"x": base64.RawURLEncoding.EncodeToString(x), "y": base64.RawURLEncoding.EncodeToString(y),
			"x5c": []string{base64.StdEncoding.EncodeToString(device.cert.Raw)}}}}}
	pj, _ := json.Marshal(payload)
	var x5c []string
	for _, c := range chain {
		x5c = append(x5c, base64.StdEncoding.EncodeToString(c.Raw))
	}
	compact, err := cloudsync.SignJWSForTest(signer.key, x5c, pj)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(compact, ".")
	e := cloudsync.VendorEntry{Protected: parts[0], Payload: parts[1], Signature: parts[2]}
	e.Header.UniqueID = uid
	return e
}

func TestImportVendorManifest(t *testing.T) {
	vendorRoot := newCert(t, "Vendor Root", nil, true)
	signer := newCert(t, "Vendor Manifest Signer", vendorRoot, false)
	deviceCA := newCert(t, "Vendor Device CA", nil, true)
	var entries []cloudsync.VendorEntry
	for i := range 12 {
		uid := fmt.Sprintf("0123%014x", i)
		dev := newCert(t, "sn"+uid, deviceCA, false)
		entries = append(entries, vendorEntry(t, uid, dev, signer, signer.cert))
	}
	raw, _ := json.Marshal(entries)
	decoded, err := cloudsync.DecodeVendorManifest(raw)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("refused", func(t *testing.T) {
		other := newCert(t, "Someone Else", nil, true)
		tampered := append([]cloudsync.VendorEntry(nil), decoded...)
		p, _ := base64.RawURLEncoding.DecodeString(tampered[4].Payload)
		tampered[4].Payload = base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(p), "ATECC608B\"", "ATECC608X\"", 1)))
		for _, tt := range []struct {
			name    string
			entries []cloudsync.VendorEntry
			trust   *x509.Certificate
			reason  string
		}{
			{"another signer", decoded, other.cert, "does not chain to the signer certificate you gave"},
			{"payload changed", tampered, signer.cert, "entry 5: verify vendor entry: unique ID"},
		} {
			s := openStation(t, t.TempDir())
			_, _, err := cloudsync.Import(t.Context(), s.store, tt.entries, tt.trust, "line-1", "ada", time.Now(), nil)
			if err == nil || !strings.Contains(err.Error(), tt.reason) || !strings.Contains(err.Error(), "nothing was imported") {
				t.Errorf("%s: %v; want it to say %q and that nothing was imported", tt.name, err, tt.reason)
			}
			if u, _ := s.store.UnitBySerial(t.Context(), "0123"+fmt.Sprintf("%014x", 0)); u != nil {
				t.Errorf("%s: a part was recorded", tt.name)
			}
		}
	})

	// Trusting the vendor root: the entries' signer chains to it.
	s := openStation(t, t.TempDir())
	b, parts, err := cloudsync.Import(t.Context(), s.store, decoded, vendorRoot.cert, "line-1", "ada", time.Now(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 12 || parts[3].RegistrationID != "sn0123"+fmt.Sprintf("%014x", 3) || parts[3].Model != "ATECC608B" || parts[3].PublicKey == nil {
		t.Fatalf("parts[3] = %+v", parts[3])
	}
	// Again: the same parts, nothing new.
	if _, _, err := cloudsync.Import(t.Context(), s.store, decoded, signer.cert, "line-1", "ada", time.Now(), nil); err != nil {
		t.Fatalf("import again: %v", err)
	}
	units, err := s.store.BatchUnits(t.Context(), b.ID)
	if err != nil || len(units) != 12 || units[0].Method != station.MethodX509 {
		t.Fatalf("batch holds %d units (%v); want 12 X.509 units", len(units), err)
	}
	for _, u := range units {
		if _, tp := station.Thumbprints(u.Certificate); len(u.Certificate) == 0 || u.CertThumbprint != tp {
			t.Errorf("part %s recorded without its device certificate (thumbprint %q)", u.Serial, u.CertThumbprint)
		}
	}

	// Push the imported batch: one X.509 group under the device CA.
	d := startQuotaTarget(t, 6000)
	tg := s.addTarget(t, d, d.conn)
	ctx := t.Context()
	if err := s.store.SetBatchTarget(ctx, b.ID, tg.Name, station.EnrollmentTemplate{ProvisioningStatus: station.ProvisioningDisabled}); err != nil {
		t.Fatal(err)
	}
	if err := s.store.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 6000, Window: time.Minute})
	caPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: deviceCA.cert.Raw}))
	p.Group = &cloudsync.Group{ID: "vendor-parts", Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: caPEM}}}}}
	rep, err := p.Push(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Total != 1 || rep.Done != 1 {
		t.Errorf("report %+v; want the one group done", rep)
	}
	if n := len(d.enrollments(t)); n != 0 {
		t.Errorf("%d individual enrollments; want none (the group covers the parts)", n)
	}
	svc, _ := cloudsync.NewServiceClient(tg, s.sealer)
	g, err := svc.GetEnrollmentGroup(ctx, "vendor-parts")
	if err != nil || g.Attestation.X509 == nil || g.ProvisioningStatus != dps.ProvisioningDisabled {
		t.Fatalf("the DPS's group: %+v, %v; want an X.509 group, disabled", g, err)
	}
	// Second phase: the group is enabled.
	if rep, err := p.Enable(ctx, b.ID); err != nil || rep.Done != 1 {
		t.Fatalf("enable: %+v, %v", rep, err)
	}
	if g, err := svc.GetEnrollmentGroup(ctx, "vendor-parts"); err != nil || g.ProvisioningStatus != dps.ProvisioningEnabled {
		t.Errorf("after enable the group is %q (%v); want enabled", g.ProvisioningStatus, err)
	}
}
