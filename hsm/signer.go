package hsm

import (
	"context"
	"crypto"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/binary"
	"fmt"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/station"
)

// The key types of CreateSigningKey, in the station CA's names.
const (
	KeyECP256  = "EC-P256"
	KeyRSA2048 = "RSA-2048"
)

// KeyBlob is a signing key created in a TPM under the SRK, as the TPM
// returned it: Public is the TPM2B_PUBLIC and Private the TPM2B_PRIVATE,
// which the TPM encrypted under the SRK (it is useless outside that TPM).
// A device stores both and loads them when it needs the key.
type KeyBlob struct {
	Public  []byte
	Private []byte
}

// signingTemplate is the public template of a device key: an unrestricted
// signing key bound to this TPM and its parent, made inside the TPM, used
// with the empty password, with no scheme of its own (each TPM2_Sign names
// the scheme, so one key serves ECDSA or RSASSA/RSA-PSS with any hash).
func signingTemplate(keyType string) (tpm2.TPMTPublic, error) {
	attrs := tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		SignEncrypt:         true,
	}
	switch keyType {
	case "", KeyECP256:
		return tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgECC,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
				CurveID:   tpm2.TPMECCNistP256,
				KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
		}, nil
	case KeyRSA2048:
		return tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgRSA,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   2048,
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{}),
		}, nil
	}
	return tpm2.TPMTPublic{}, station.Errorf("create TPM signing key", station.KindInvalid,
		"key type %q is not one a TPM key can have here: ask for %s or %s", keyType, KeyECP256, KeyRSA2048)
}

// CreateSigningKey creates a signing key of keyType (KeyECP256, the
// default when empty, or KeyRSA2048) under the SRK at 0x81000001, creating
// and persisting the SRK first when absent. The private key never leaves
// the TPM: the blob holds it encrypted under the SRK. Nothing stays loaded
// in the TPM. Kinds: Invalid (an unknown key type, a TPM that refuses the
// template), Conflict (a foreign key at the SRK handle), Unauthorized,
// Unavailable.
func (t *TPM) CreateSigningKey(ctx context.Context, keyType string) (*KeyBlob, crypto.PublicKey, error) {
	const op = "create TPM signing key"
	tmpl, err := signingTemplate(keyType)
	if err != nil {
		return nil, nil, err
	}
	if err := t.lock(op); err != nil {
		return nil, nil, err
	}
	defer t.mu.Unlock()
	srk, err := t.persistent(ctx, op, SRKHandle, tpmRHOwner, srkTemplate, "SRK")
	if err != nil {
		return nil, nil, err
	}
	if err := ctxError(ctx, op); err != nil {
		return nil, nil, err
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: SRKHandle, Name: tpm2.TPM2BName{Buffer: srk.Name}, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(tmpl),
	}.Execute(t.t)
	if err != nil {
		return nil, nil, tpmError(op, err)
	}
	blob := &KeyBlob{Public: tpm2.Marshal(rsp.OutPublic), Private: tpm2.Marshal(rsp.OutPrivate)}
	pub, _, err := ParsePublic(blob.Public)
	if err != nil {
		return nil, nil, station.E(op, station.KindInvalid, err)
	}
	return blob, pub, nil
}

// KeySigner is a crypto.Signer whose key is a KeyBlob in a TPM: every Sign
// loads the key under the SRK, signs inside the TPM (TPM2_Sign) and
// flushes it, holding the TPM for the whole sequence. ECDSA signatures are
// ASN.1 DER, as crypto/ecdsa makes them; RSA signs PKCS #1 v1.5, or PSS
// when opts is an *rsa.PSSOptions (the TPM chooses the salt length and
// ignores opts.SaltLength: the reference TPM, and TPMs that follow FIPS
// 186, use the hash length, which TLS 1.3 expects; older TPMs may use the
// largest that fits, which rsa.PSSSaltLengthAuto verifies).
type KeySigner struct {
	t    *TPM
	blob KeyBlob
	pub  crypto.PublicKey
}

var _ crypto.Signer = (*KeySigner)(nil)

// Signer returns the crypto.Signer of a key made by CreateSigningKey in
// this TPM. It checks that the blob parses; that the TPM can load it shows
// at the first Sign. Kinds: Invalid.
func (t *TPM) Signer(blob KeyBlob) (*KeySigner, error) {
	const op = "load TPM signing key"
	pub, _, err := ParsePublic(blob.Public)
	if err != nil {
		return nil, err
	}
	if _, err := parsePrivate(blob.Private); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the stored TPM2B_PRIVATE does not parse (%v): generate the key again", err)
	}
	return &KeySigner{t: t, blob: KeyBlob{Public: append([]byte(nil), blob.Public...), Private: append([]byte(nil), blob.Private...)}, pub: pub}, nil
}

// parsePrivate parses a TPM2B_PRIVATE that must fill b exactly, turning a
// panic of the reflective parser on hostile input into an error.
func parsePrivate(b []byte) (v *tpm2.TPM2BPrivate, err error) {
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("unparseable TPM2B_PRIVATE: %v", r)
		}
	}()
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) != len(b)-2 {
		return nil, fmt.Errorf("%d bytes are not one TPM2B_PRIVATE", len(b))
	}
	return tpm2.Unmarshal[tpm2.TPM2BPrivate](b)
}

// parsePublic2B parses a TPM2B_PUBLIC that must fill b exactly.
func parsePublic2B(b []byte) (v *tpm2.TPM2BPublic, err error) {
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("unparseable TPM2B_PUBLIC: %v", r)
		}
	}()
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) != len(b)-2 {
		return nil, fmt.Errorf("%d bytes are not one TPM2B_PUBLIC", len(b))
	}
	return tpm2.Unmarshal[tpm2.TPM2BPublic](b)
}

// Public returns the key's public key (*ecdsa.PublicKey or *rsa.PublicKey).
func (s *KeySigner) Public() crypto.PublicKey { return s.pub }

// Sign signs digest inside the TPM (see SignContext), with no deadline.
func (s *KeySigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.SignContext(context.Background(), digest, opts)
}

// SignContext signs digest, the hash of the message by opts.HashFunc()
// (SHA-256, SHA-384 or SHA-512), inside the TPM. Kinds: Invalid (a hash
// the TPM key cannot use, a blob this TPM cannot load: the key was made in
// another TPM or the SRK changed), Unauthorized, Unavailable.
func (s *KeySigner) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	const op = "sign with TPM key"
	var hash tpm2.TPMAlgID
	switch opts.HashFunc() {
	case crypto.SHA256:
		hash = tpm2.TPMAlgSHA256
	case crypto.SHA384:
		hash = tpm2.TPMAlgSHA384
	case crypto.SHA512:
		hash = tpm2.TPMAlgSHA512
	default:
		return nil, station.Errorf(op, station.KindInvalid, "the TPM key signs SHA-256, SHA-384 or SHA-512 digests, not %v", opts.HashFunc())
	}
	if len(digest) != opts.HashFunc().Size() {
		return nil, station.Errorf(op, station.KindInvalid, "a %d-byte digest is not a %v digest", len(digest), opts.HashFunc())
	}
	scheme := tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA,
		Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: hash})}
	if _, ok := s.pub.(*rsa.PublicKey); ok {
		alg := tpm2.TPMAlgRSASSA
		if _, pss := opts.(*rsa.PSSOptions); pss {
			alg = tpm2.TPMAlgRSAPSS
		}
		scheme = tpm2.TPMTSigScheme{Scheme: alg, Details: tpm2.NewTPMUSigScheme(alg, &tpm2.TPMSSchemeHash{HashAlg: hash})}
	}
	t := s.t
	if err := t.lock(op); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	ld, flush, err := t.loadBlob(ctx, op, s.blob, "the stored key", "it was made in another TPM or under another SRK; generate the key again")
	if err != nil {
		return nil, err
	}
	defer flush()
	rsp, err := tpm2.Sign{
		KeyHandle:  tpm2.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: tpm2.PasswordAuth(nil)},
		Digest:     tpm2.TPM2BDigest{Buffer: digest},
		InScheme:   scheme,
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(t.t)
	if err != nil {
		return nil, tpmError(op, err)
	}
	switch scheme.Scheme {
	case tpm2.TPMAlgECDSA:
		sig, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "malformed TPM signature: %w", err)
		}
		der, err := asn1.Marshal(struct{ R, S *big.Int }{
			new(big.Int).SetBytes(sig.SignatureR.Buffer), new(big.Int).SetBytes(sig.SignatureS.Buffer)})
		if err != nil {
			return nil, station.E(op, station.KindInternal, err)
		}
		return der, nil
	case tpm2.TPMAlgRSAPSS:
		sig, err := rsp.Signature.Signature.RSAPSS()
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "malformed TPM signature: %w", err)
		}
		return sig.Sig.Buffer, nil
	default:
		sig, err := rsp.Signature.Signature.RSASSA()
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "malformed TPM signature: %w", err)
		}
		return sig.Sig.Buffer, nil
	}
}

// loadBlob loads a key or sealed object kept as blob under the SRK and
// returns it with the flush that unloads it; what names the blob and fix
// says what a load failure means. The caller holds t.mu.
func (t *TPM) loadBlob(ctx context.Context, op string, blob KeyBlob, what, fix string) (*tpm2.LoadResponse, func(), error) {
	priv, err := parsePrivate(blob.Private)
	if err != nil {
		return nil, nil, station.E(op, station.KindInvalid, err)
	}
	pub, err := parsePublic2B(blob.Public)
	if err != nil {
		return nil, nil, station.E(op, station.KindInvalid, err)
	}
	if err := ctxError(ctx, op); err != nil {
		return nil, nil, err
	}
	srkName, err := t.readName(ctx, op, SRKHandle, "SRK")
	if err != nil {
		return nil, nil, err
	}
	ld, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: SRKHandle, Name: srkName, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    *priv,
		InPublic:     *pub,
	}.Execute(t.t)
	if err != nil {
		return nil, nil, station.Errorf(op, station.KindOf(tpmError(op, err)), "the TPM cannot load %s (%v): %s", what, err, fix)
	}
	flush := func() { tpm2.FlushContext{FlushHandle: ld.ObjectHandle}.Execute(t.t) }
	if err := ctxError(ctx, op); err != nil {
		flush()
		return nil, nil, err
	}
	return ld, flush, nil
}
