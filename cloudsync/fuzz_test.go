package cloudsync_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"

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
