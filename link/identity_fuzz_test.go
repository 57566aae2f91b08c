package link_test

import (
	"bytes"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// The identity decoders read bytes from the station (agent side) or the
// DUT (station side). Each fuzz target checks that nothing panics and that
// whatever decodes survives an encode/decode round trip unchanged.

func FuzzDecodeKeyRequest(f *testing.F) {
	f.Add(link.EncodeKeyRequest(station.KeyRequest{Type: "EC-P256", CommonName: "sn-0001", Storage: station.KeyInTPM}))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := link.DecodeKeyRequest(b)
		if err != nil {
			return
		}
		again, err := link.DecodeKeyRequest(link.EncodeKeyRequest(r))
		if err != nil || again != r {
			t.Fatalf("round trip of %+v = %+v, %v", r, again, err)
		}
	})
}

func FuzzDecodeGeneratedKey(f *testing.F) {
	f.Add(link.EncodeGeneratedKey(station.GeneratedKey{CSR: []byte{0x30, 0x81, 0, 0xff}, Storage: station.KeyInSoftware}))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := link.DecodeGeneratedKey(b)
		if err != nil {
			return
		}
		again, err := link.DecodeGeneratedKey(link.EncodeGeneratedKey(g))
		if err != nil || !cmp.Equal(g, again) {
			t.Fatalf("round trip of %+v = %+v, %v", g, again, err)
		}
	})
}

func FuzzDecodeCertChain(f *testing.F) {
	f.Add(link.EncodeCertChain([][]byte{{0x30, 0}, {0x30, 1, 0}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		chain, err := link.DecodeCertChain(b)
		if err != nil {
			return
		}
		if len(chain) == 0 || len(chain) > link.MaxChain {
			t.Fatalf("decoded a chain of %d certificates", len(chain))
		}
		again, err := link.DecodeCertChain(link.EncodeCertChain(chain))
		if err != nil || !cmp.Equal(chain, again) {
			t.Fatalf("round trip changed the chain (%v)", err)
		}
	})
}

func FuzzDecodeSymmetricKey(f *testing.F) {
	f.Add(link.EncodeSymmetricKey("sn-0001", bytes.Repeat([]byte{0xa5}, 32)))
	f.Fuzz(func(t *testing.T, b []byte) {
		reg, key, err := link.DecodeSymmetricKey(b)
		if err != nil {
			return
		}
		if len(key) < link.MinSymKey || len(key) > link.MaxSymKey || reg == "" {
			t.Fatalf("decoded a %d-byte key for %q", len(key), reg)
		}
		reg2, key2, err := link.DecodeSymmetricKey(link.EncodeSymmetricKey(reg, key))
		if err != nil || reg2 != reg || !bytes.Equal(key, key2) {
			t.Fatalf("round trip changed the key (%v)", err)
		}
	})
}

func FuzzDecodeIdentity(f *testing.F) {
	f.Add(link.EncodeIdentity(station.DeviceIdentity{
		CertChain: [][]byte{{0x30, 0}}, KeyStorage: station.KeyInTPM, SymKeyRegistrationID: "sn-1",
		SymKeySHA256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	}))
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := link.DecodeIdentity(b)
		if err != nil {
			return
		}
		again, err := link.DecodeIdentity(link.EncodeIdentity(id))
		if err != nil || !cmp.Equal(id, again, cmpopts.EquateEmpty()) {
			t.Fatalf("round trip of %+v = %+v, %v", id, again, err)
		}
	})
}
