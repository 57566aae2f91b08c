package cloudsync_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
)

// FuzzDecodeManifest feeds manifest files (from a customer, or damaged)
// through the decoder and the verifier: they must refuse, never panic.
// Seeds in testdata/fuzz/FuzzDecodeManifest.
func FuzzDecodeManifest(f *testing.F) {
	f.Add([]byte(`{"format":"kiln-manifest/1","entries":["a.b.c"],"seal":"x"}`))
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := cloudsync.DecodeManifest(b)
		if err != nil {
			return
		}
		m.KeyID = cloudsync.KeyID(&key.PublicKey) // reach the entries
		if _, err := cloudsync.VerifyManifest(m, &key.PublicKey); err == nil {
			t.Fatal("a manifest not signed by the key verifies")
		}
	})
}

// FuzzDecodeVendorManifest feeds vendor manifest files through the decoder
// and the entry verifier against a signer that signed none of them: they
// must refuse, never panic. Seeds in testdata/fuzz/FuzzDecodeVendorManifest.
func FuzzDecodeVendorManifest(f *testing.F) {
	f.Add([]byte(`[{"payload":"e30","protected":"eyJhbGciOiJFUzI1NiJ9","header":{"uniqueId":"01"},"signature":""}]`))
	signer := newCert(f, "Fuzz Signer", nil, true)
	f.Fuzz(func(t *testing.T, b []byte) {
		entries, err := cloudsync.DecodeVendorManifest(b)
		if err != nil {
			return
		}
		for i := range entries {
			if _, err := cloudsync.VerifyVendorEntry(&entries[i], signer.cert, time.Now()); err == nil {
				t.Fatal("an entry not signed by the signer verifies")
			}
		}
	})
}
