package cloudsync

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// An X.509 enrollment read back from a service that answers only the
// certificate's info (Azure's DPS) is the same as the one pushed when the
// SHA-256 thumbprints agree; another certificate is another device's.
func TestSameClientCert(t *testing.T) {
	mk := func(cn string) []byte {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	a, b := mk("a"), mk("b")
	att := func(c *dps.X509CertificateWithInfo) dps.AttestationMechanism {
		return dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{Primary: c}}}
	}
	info := func(der []byte) *dps.X509CertificateInfo {
		_, tp := station.Thumbprints(der)
		return &dps.X509CertificateInfo{SHA256Thumbprint: tp}
	}
	want := att(&dps.X509CertificateWithInfo{Certificate: CertificatePEM(a)})
	for _, tc := range []struct {
		name string
		got  dps.AttestationMechanism
		same bool
	}{
		{"same PEM", att(&dps.X509CertificateWithInfo{Certificate: CertificatePEM(a)}), true},
		{"same, base64 DER", att(&dps.X509CertificateWithInfo{Certificate: base64.StdEncoding.EncodeToString(a)}), true},
		{"info only, same thumbprint", att(&dps.X509CertificateWithInfo{Info: info(a)}), true},
		{"info only, another thumbprint", att(&dps.X509CertificateWithInfo{Info: info(b)}), false},
		{"another certificate", att(&dps.X509CertificateWithInfo{Certificate: CertificatePEM(b)}), false},
		{"neither", att(&dps.X509CertificateWithInfo{}), false},
		{"a signing certificate", dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: CertificatePEM(a)}}}}, false},
	} {
		if got := sameAttestation(tc.got, want); got != tc.same {
			t.Errorf("%s: same = %v; want %v", tc.name, got, tc.same)
		}
	}
}

// FuzzCompareX509 feeds X.509 enrollments as a target answers them (a
// certificate in any encoding, or only its info) to the read-back
// comparison: it must not panic, and a certificate that is not the one
// pushed never compares the same. Seeds in testdata/fuzz/FuzzCompareX509.
func FuzzCompareX509(f *testing.F) {
	f.Add("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "AB:CD")
	f.Add("TUlJQg==", "")
	f.Add("", "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fuzz"}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		f.Fatal(err)
	}
	_, tp := station.Thumbprints(der)
	want := dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{
		Primary: &dps.X509CertificateWithInfo{Certificate: CertificatePEM(der)}}}}
	f.Fuzz(func(t *testing.T, cert, thumbprint string) {
		got := dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{
			Primary: &dps.X509CertificateWithInfo{Certificate: cert, Info: &dps.X509CertificateInfo{SHA256Thumbprint: thumbprint}}}}}
		d := certDER(cert)
		if sameAttestation(got, want) && !bytes.Equal(d, der) && !(d == nil && strings.EqualFold(strings.NewReplacer(":", "", " ", "", "-", "").Replace(thumbprint), tp)) {
			t.Fatalf("certificate %q, thumbprint %q compare the same as the pushed one", cert, thumbprint)
		}
	})
}
