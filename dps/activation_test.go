package dps_test

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// softTPM is an EK and an SRK made in software, with their private keys, so
// that tests can open blobs without a TPM.
type softTPM struct {
	ekPriv, srkPriv *rsa.PrivateKey
	ek, srk         []byte // TPM2B_PUBLIC
}

var (
	softOnce sync.Once
	soft     softTPM
)

func publicArea(t testing.TB, template tpm2.TPMTPublic, k *rsa.PrivateKey) []byte {
	t.Helper()
	template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(template))
}

func softKeys(t testing.TB) *softTPM {
	t.Helper()
	softOnce.Do(func() {
		var err error
		if soft.ekPriv, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			t.Fatal(err)
		}
		if soft.srkPriv, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			t.Fatal(err)
		}
		soft.ek = publicArea(t, tpm2.RSAEKTemplate, soft.ekPriv)
		soft.srk = publicArea(t, tpm2.RSASRKTemplate, soft.srkPriv)
	})
	if soft.ek == nil {
		t.Fatal("no software TPM keys")
	}
	return &soft
}

func newActivation(t testing.TB) *dps.Activation {
	t.Helper()
	s := softKeys(t)
	a, err := dps.NewActivation(nil, s.ek, s.srk)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func parseBlob(t testing.TB, b []byte) *hsm.ActivationBlob {
	t.Helper()
	a, err := hsm.ParseActivationBlob(b)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func name(public []byte) []byte {
	h := sha256.Sum256(public)
	return append([]byte{0x00, 0x0B}, h[:]...)
}

func cfbDecrypt(t *testing.T, key, b []byte) []byte {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(b))
	//lint:ignore SA1019 the TPM specifies CFB.
	cipher.NewCFBDecrypter(block, make([]byte, 16)).XORKeyStream(out, b)
	return out
}

func mac(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// TestActivationOpensInSoftware opens a blob with the private EK and SRK, as
// a TPM would, checking every HMAC and digest of §4.5 on the way, and finds
// the server's key with the right public area.
func TestActivationOpensInSoftware(t *testing.T) {
	s := softKeys(t)
	act := newActivation(t)
	a := parseBlob(t, act.Blob)
	srkName := name(s.srk[2:])

	// MakeCredential: the inner key, bound to the SRK's name.
	seedC, err := rsa.DecryptOAEP(sha256.New(), nil, s.ekPriv, a.CredentialSeed, []byte("IDENTITY\x00"))
	if err != nil {
		t.Fatalf("credential seed: %v", err)
	}
	integrity, encIdentity := a.Credential[2:34], a.Credential[34:]
	if binary.BigEndian.Uint16(a.Credential) != 32 || !hmac.Equal(integrity, mac(tpm2.KDFa(crypto.SHA256, seedC, "INTEGRITY", nil, nil, 256), encIdentity, srkName)) {
		t.Fatal("credential integrity HMAC does not check")
	}
	ident := cfbDecrypt(t, tpm2.KDFa(crypto.SHA256, seedC, "STORAGE", srkName, nil, 128), encIdentity)
	if len(ident) != 18 || binary.BigEndian.Uint16(ident) != 16 {
		t.Fatalf("credential is %x, want a TPM2B_DIGEST of 16 bytes", ident)
	}
	inner := ident[2:]

	// Outer wrapper.
	idName := name(a.Public)
	seedD, err := rsa.DecryptOAEP(sha256.New(), nil, s.srkPriv, a.DuplicateSeed, []byte("DUPLICATE\x00"))
	if err != nil {
		t.Fatalf("duplication seed: %v", err)
	}
	outerHMAC, dupSens := a.Duplicate[2:34], a.Duplicate[34:]
	if !hmac.Equal(outerHMAC, mac(tpm2.KDFa(crypto.SHA256, seedD, "INTEGRITY", nil, nil, 256), dupSens, idName)) {
		t.Fatal("outer HMAC does not check")
	}
	encSens := cfbDecrypt(t, tpm2.KDFa(crypto.SHA256, seedD, "STORAGE", idName, nil, 128), dupSens)

	// Inner wrapper.
	plain := cfbDecrypt(t, inner, encSens)
	if len(plain) != 108 || binary.BigEndian.Uint16(plain) != 32 {
		t.Fatalf("inner plaintext is %d bytes starting %x, want 108 starting 0020", len(plain), plain[:2])
	}
	sens2B := plain[34:]
	if want := sha256.Sum256(append(bytes.Clone(sens2B), idName...)); !bytes.Equal(plain[2:34], want[:]) {
		t.Fatal("inner integrity digest does not check")
	}
	want := []byte{0x00, 0x48, 0x00, 0x08, 0x00, 0x00, 0x00, 0x20}
	if !bytes.Equal(sens2B[:8], want) || binary.BigEndian.Uint16(sens2B[40:]) != 32 {
		t.Fatalf("TPM2B_SENSITIVE starts %x, want %x, seed and key of 32 bytes", sens2B[:8], want)
	}
	seed, key := sens2B[8:40], sens2B[42:]
	if !bytes.Equal(key, act.Key) {
		t.Error("the blob carries another key than Activation.Key")
	}

	// The public area: §4.4 byte by byte.
	unique := sha256.Sum256(append(bytes.Clone(seed), key...))
	wantPub := append([]byte{
		0x00, 0x08, // keyedHash
		0x00, 0x0B, // SHA-256
		0x00, 0x04, 0x04, 0x40, // sign | noDA | userWithAuth
		0x00, 0x00, // empty authPolicy
		0x00, 0x05, 0x00, 0x0B, // HMAC with SHA-256
		0x00, 0x20,
	}, unique[:]...)
	if !bytes.Equal(a.Public, wantPub) {
		t.Errorf("ID key public area\n got %x\nwant %x", a.Public, wantPub)
	}
	if len(a.Data) != 0 {
		t.Errorf("encUriData is %d bytes, want empty", len(a.Data))
	}
}

func TestActivationKeys(t *testing.T) {
	s := softKeys(t)
	key := bytes.Repeat([]byte{7}, 32)
	a, err := dps.NewActivationWithKey(nil, s.ek, s.srk, key)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Key, key) {
		t.Error("Activation.Key is not the key given")
	}
	if got := a.String(); strings.Contains(got, fmt.Sprintf("%x", key[:4])) || strings.Contains(got, dps.EncodeKey(key)[:8]) {
		t.Errorf("String() shows the key: %s", got)
	}
	b, err := dps.NewActivation(nil, s.ek, s.srk)
	if err != nil {
		t.Fatal(err)
	}
	c, err := dps.NewActivation(nil, s.ek, s.srk)
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Key) != dps.KeySize || bytes.Equal(b.Key, c.Key) || bytes.Equal(b.Blob, c.Blob) {
		t.Error("two activations share a key or a blob")
	}
	// A bare TPMT_PUBLIC EK, as some tools write it, works too.
	if _, err := dps.NewActivation(nil, s.ek[2:], s.srk); err != nil {
		t.Errorf("bare TPMT_PUBLIC EK: %v", err)
	}
}

func TestActivationErrors(t *testing.T) {
	s := softKeys(t)
	signing := tpm2.RSASRKTemplate
	signing.ObjectAttributes.Decrypt = false
	signing.ObjectAttributes.SignEncrypt = true
	tests := []struct {
		name     string
		ek, srk  []byte
		key      []byte
		wantKind station.Kind
	}{
		{"empty EK", nil, s.srk, nil, station.KindInvalid},
		{"garbage EK", []byte("not a key"), s.srk, nil, station.KindInvalid},
		{"garbage SRK", s.ek, []byte{0, 2, 0, 1}, nil, station.KindInvalid},
		{"signing SRK", s.ek, publicArea(t, signing, s.srkPriv), nil, station.KindInvalid},
		{"short key", s.ek, s.srk, make([]byte, 8), station.KindInvalid},
		{"long key", s.ek, s.srk, make([]byte, 65), station.KindInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			if tt.key != nil {
				_, err = dps.NewActivationWithKey(nil, tt.ek, tt.srk, tt.key)
			} else {
				_, err = dps.NewActivation(nil, tt.ek, tt.srk)
			}
			if station.KindOf(err) != tt.wantKind {
				t.Errorf("error %v, want kind %v", err, tt.wantKind)
			}
		})
	}
	if _, err := dps.NewActivation(bytes.NewReader(make([]byte, 10)), s.ek, s.srk); station.KindOf(err) != station.KindInternal {
		t.Errorf("without randomness: %v, want an Internal error", err)
	}
}

func TestParseActivationBlob(t *testing.T) {
	act := newActivation(t)
	a := parseBlob(t, act.Blob)
	if got := a.Marshal(); !bytes.Equal(got, act.Blob) {
		t.Error("Marshal(ParseActivationBlob(b)) != b")
	}
	// Trailing bytes are ignored, as by the Node SDK.
	if _, err := hsm.ParseActivationBlob(append(bytes.Clone(act.Blob), 1, 2, 3)); err != nil {
		t.Errorf("trailing bytes: %v", err)
	}
	bad := map[string][]byte{
		"empty":                nil,
		"one byte":             {0},
		"size beyond the end":  {0xFF, 0xFF, 0},
		"five fields":          act.Blob[:len(act.Blob)-2],
		"empty credential":     append([]byte{0, 0}, act.Blob[54:]...),
		"public not keyedHash": replacePublic(t, act.Blob, tpm2.Marshal(tpm2.RSASRKTemplate)),
	}
	for name, b := range bad {
		_, err := hsm.ParseActivationBlob(b)
		if station.KindOf(err) != station.KindInvalid {
			t.Errorf("%s: error %v, want Invalid", name, err)
		}
	}
}

func replacePublic(t *testing.T, blob, public []byte) []byte {
	t.Helper()
	a := parseBlob(t, blob)
	a.Public = public
	return a.Marshal()
}

// BenchmarkActivationBlob measures the server side: one blob for an
// RSA-2048 EK and SRK (two OAEP encryptions dominate).
func BenchmarkActivationBlob(b *testing.B) {
	s := softKeys(b)
	for b.Loop() {
		if _, err := dps.NewActivation(nil, s.ek, s.srk); err != nil {
			b.Fatal(err)
		}
	}
}
