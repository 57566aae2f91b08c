package hsm_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"testing"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

func TestSigningKeyECDSA(t *testing.T) {
	sim := openSim(t)
	tpm := hsm.New(sim)
	blob, pub, err := tpm.CreateSigningKey(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	checkNoLeftovers(t, sim)
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve.Params().BitSize != 256 {
		t.Fatalf("default key is %T, want an ECDSA P-256 key", pub)
	}
	// The private part is the TPM's: the blob's sensitive area is
	// encrypted under the SRK, so the public template says so.
	_, tp, err := hsm.ParsePublic(blob.Public)
	if err != nil {
		t.Fatal(err)
	}
	if a := tp.ObjectAttributes; !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.SignEncrypt || a.Decrypt {
		t.Errorf("key attributes %+v: want fixedTPM, fixedParent, sensitiveDataOrigin, sign only", a)
	}

	s, err := tpm.Signer(*blob)
	if err != nil {
		t.Fatal(err)
	}
	if !ec.Equal(s.Public()) {
		t.Fatal("the signer's public key is not the created key")
	}
	d := sha256.Sum256([]byte("kiln"))
	sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(ec, d[:], sig) {
		t.Error("the TPM's ECDSA signature does not verify with the key's public key")
	}
	if ecdsa.VerifyASN1(ec, make([]byte, 32), sig) {
		t.Error("the signature verifies over another digest")
	}
	checkNoLeftovers(t, sim)

	// A CSR signed through the TPM verifies and carries the TPM key.
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "sn-1"}}, s)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Errorf("CSR signature: %v", err)
	}
	if !ec.Equal(csr.PublicKey) {
		t.Error("the CSR's public key is not the TPM key")
	}

	// A digest of the wrong size is refused before the TPM sees it.
	if _, err := s.Sign(rand.Reader, d[:15], crypto.SHA256); station.KindOf(err) != station.KindInvalid {
		t.Errorf("signing a short digest: %v, want Invalid", err)
	}
}

func TestSigningKeyRSA(t *testing.T) {
	sim := openSim(t)
	tpm := hsm.New(sim)
	blob, pub, err := tpm.CreateSigningKey(t.Context(), hsm.KeyRSA2048)
	if err != nil {
		t.Fatal(err)
	}
	rk, ok := pub.(*rsa.PublicKey)
	if !ok || rk.N.BitLen() != 2048 {
		t.Fatalf("key is %T, want RSA-2048", pub)
	}
	s, err := tpm.Signer(*blob)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("kiln"))
	sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := rsa.VerifyPKCS1v15(rk, crypto.SHA256, d[:], sig); err != nil {
		t.Errorf("PKCS #1 v1.5 signature: %v", err)
	}
	d384 := sha512.Sum384([]byte("kiln"))
	sig, err = s.Sign(rand.Reader, d384[:], &rsa.PSSOptions{Hash: crypto.SHA384})
	if err != nil {
		t.Fatal(err)
	}
	if err := rsa.VerifyPSS(rk, crypto.SHA384, d384[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
		t.Errorf("PSS signature: %v", err)
	}
	checkNoLeftovers(t, sim)
}

func TestSigningKeyErrors(t *testing.T) {
	sim := openSim(t)
	tpm := hsm.New(sim)
	if _, _, err := tpm.CreateSigningKey(t.Context(), "EC-P384"); station.KindOf(err) != station.KindInvalid {
		t.Errorf("unknown key type: %v, want Invalid", err)
	}
	blob, _, err := tpm.CreateSigningKey(t.Context(), hsm.KeyECP256)
	if err != nil {
		t.Fatal(err)
	}
	// A tampered private blob: the TPM refuses to load it (integrity).
	bad := hsm.KeyBlob{Public: blob.Public, Private: bytes.Clone(blob.Private)}
	bad.Private[len(bad.Private)-1] ^= 1
	s, err := tpm.Signer(bad)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(nil)
	if _, err := s.Sign(rand.Reader, d[:], crypto.SHA256); station.KindOf(err) != station.KindInvalid {
		t.Errorf("signing with a tampered blob: %v, want Invalid", err)
	}
	checkNoLeftovers(t, sim)
	if _, err := tpm.Signer(hsm.KeyBlob{Public: blob.Public, Private: []byte{0, 9, 1}}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a truncated private blob: %v, want Invalid", err)
	}
	if _, err := s.Sign(rand.Reader, d[:], crypto.MD5); station.KindOf(err) != station.KindInvalid {
		t.Errorf("MD5: %v, want Invalid", err)
	}
}

func TestSealUnseal(t *testing.T) {
	sim := openSim(t)
	tpm := hsm.New(sim)
	secret := bytes.Repeat([]byte{0, 0xff, 7}, 11)
	blob, err := tpm.Seal(t.Context(), secret)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(blob.Private, secret[:8]) || bytes.Contains(blob.Public, secret[:8]) {
		t.Error("the sealed blob holds the data in the clear")
	}
	got, err := tpm.Unseal(t.Context(), *blob)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, secret) {
		t.Errorf("Unseal = %x, want %x", got, secret)
	}
	checkNoLeftovers(t, sim)
	bad := hsm.KeyBlob{Public: blob.Public, Private: bytes.Clone(blob.Private)}
	bad.Private[len(bad.Private)-3] ^= 0x40
	if _, err := tpm.Unseal(t.Context(), bad); station.KindOf(err) != station.KindInvalid {
		t.Errorf("Unseal of an altered blob: %v, want Invalid", err)
	}
	checkNoLeftovers(t, sim)
	if _, err := tpm.Seal(t.Context(), make([]byte, hsm.MaxSealed+1)); station.KindOf(err) != station.KindInvalid {
		t.Errorf("sealing %d bytes: %v, want Invalid", hsm.MaxSealed+1, err)
	}
}
