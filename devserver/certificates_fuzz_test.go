package devserver_test

import (
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/station"
)

// FuzzDecodeCertificateUpload feeds CA certificate upload bodies (seeds in
// testdata/fuzz): no panic, KindInvalid only, and an accepted certificate
// is a CA certificate.
func FuzzDecodeCertificateUpload(f *testing.F) {
	f.Add([]byte(`{"properties":{"certificate":"MIIB","isVerified":true}}`))
	f.Add([]byte(`{"certificate":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}`))
	f.Add([]byte(`{"properties":null}`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, body []byte) {
		c, _, err := devserver.DecodeCertificateUpload(body)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		if c == nil || !c.IsCA || !c.BasicConstraintsValid {
			t.Fatalf("accepted %v, not a CA certificate", c)
		}
	})
}

// FuzzDecodeVerificationRequest feeds proof-of-possession bodies: no
// panic, KindInvalid only, a certificate when accepted.
func FuzzDecodeVerificationRequest(f *testing.F) {
	f.Add([]byte(`{"certificate":"MIIB"}`))
	f.Add([]byte(`{"certificate":""}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, body []byte) {
		c, err := devserver.DecodeVerificationRequest(body)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		if c == nil {
			t.Fatal("accepted without a certificate")
		}
	})
}
