package hsm_test

import (
	"bytes"
	"testing"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// FuzzParsePublic feeds TPM2B_PUBLIC bytes, as a device sends them, to the
// parser: it must not panic, and what it accepts has a key.
func FuzzParsePublic(f *testing.F) {
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		key, pub, err := hsm.ParsePublic(b)
		if err != nil {
			if station.KindOf(err) != station.KindInvalid {
				t.Fatalf("kind %v, want invalid", station.KindOf(err))
			}
			return
		}
		if key == nil || pub == nil {
			t.Fatal("accepted without a key")
		}
	})
}

// FuzzParseTPMSAN feeds subjectAltName values, as EK certificates carry
// them, to the TCG directoryName parser.
func FuzzParseTPMSAN(f *testing.F) {
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := hsm.ParseTPMSAN(b)
		if err == nil && id == (hsm.TPMIdentity{}) && !bytes.Contains(b, []byte{0x67, 0x81, 0x05, 0x02}) {
			t.Fatal("accepted a SAN without TCG attributes")
		}
	})
}

// FuzzResponse feeds TPM responses to the retry layer and the EK reader:
// no panic, every error has a Kind, and nothing is retried for ever.
func FuzzResponse(f *testing.F) {
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x22})
	f.Fuzz(func(t *testing.T, b []byte) {
		tr := &counter{next: fixed(b)}
		tpm := hsm.New(tr)
		_, err := tpm.EK(t.Context())
		if err != nil && station.KindOf(err) == station.KindOther {
			t.Fatalf("error without a kind: %v", err)
		}
		if tr.sends > 20 {
			t.Fatalf("%d sends for one EK read", tr.sends)
		}
	})
}
