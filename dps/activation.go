package dps

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// KeySize is the size of the HMAC keys DPS sends to TPM devices (§4.4).
const KeySize = 32

// innerKeySize is the size of the inner wrapping key, the credential: the
// C SDK hard-codes AES-128 for the import (§4.4).
const innerKeySize = 16

// idKeyAttributes are the object attributes of the DPS ID key:
// sign (bit 18) | noDA (bit 10) | userWithAuth (bit 6) (§4.4).
const idKeyAttributes = 1<<18 | 1<<10 | 1<<6

// Activation is the server's side of one TPM activation: the blob it sends
// (the challenge's authenticationKey, or the registration state's), and the
// HMAC key inside it, with which it verifies the device's SAS tokens and
// which becomes the device's IoT Hub key. Its String method hides the key.
type Activation struct {
	Blob []byte // the activation blob, raw; AuthenticationKey is its base64
	Key  []byte // the device's HMAC key
}

// AuthenticationKey returns the blob as the JSON carries it: standard base64.
func (a *Activation) AuthenticationKey() string { return base64.StdEncoding.EncodeToString(a.Blob) }

// String describes the activation without the key.
func (a *Activation) String() string {
	return fmt.Sprintf("DPS activation (%d-byte blob, %d-byte key)", len(a.Blob), len(a.Key))
}

// NewActivation makes an activation blob for the TPM whose EK and SRK public
// areas a device sent (the decoded tpm.endorsementKey and
// tpm.storageRootKey: TPM2B_PUBLIC, or a bare TPMT_PUBLIC), carrying a fresh
// random 32-byte HMAC key. random is crypto/rand.Reader when nil.
// Kinds: Invalid (the keys cannot be used), Internal (no randomness).
func NewActivation(random io.Reader, ekPublic, srkPublic []byte) (*Activation, error) {
	if random == nil {
		random = rand.Reader
	}
	key := make([]byte, KeySize)
	if _, err := io.ReadFull(random, key); err != nil {
		return nil, station.E("make DPS activation blob", station.KindInternal, err)
	}
	return NewActivationWithKey(random, ekPublic, srkPublic, key)
}

// NewActivationWithKey is NewActivation carrying a key of the caller's: 16
// to 64 bytes (IoT Hub's limits for device keys), normally 32 random bytes.
// It builds the blob of §4.4 as §4.5 says:
//
//   - the ID key: a keyedHash HMAC-SHA256 key with attributes 0x00040440,
//     an empty authPolicy and unique = SHA-256(seed || key);
//   - its sensitive area wrapped twice: an inner wrapper (integrity digest,
//     then AES-128-CFB with a zero IV under a random 16-byte inner key) and
//     the outer duplication wrapper to the SRK (seed RSA-OAEP-encrypted with
//     label "DUPLICATE", KDFa-derived AES-CFB key and HMAC);
//   - the inner key as a credential (TPM2_MakeCredential) for the EK, bound
//     to the SRK's name, so only this TPM's EK and SRK together unwrap it;
//   - an empty encUriData.
//
// Names are computed over the public areas exactly as received.
// Kinds: Invalid, Internal.
func NewActivationWithKey(random io.Reader, ekPublic, srkPublic, key []byte) (*Activation, error) {
	const op = "make DPS activation blob"
	if random == nil {
		random = rand.Reader
	}
	if len(key) < 16 || len(key) > 64 {
		return nil, station.Errorf(op, station.KindInvalid, "a %d-byte key: DPS device keys are 16 to 64 bytes (32 normally)", len(key))
	}
	ek, err := parent(ekPublic, "EK")
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	srk, err := parent(srkPublic, "SRK")
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	rnd := func(n int) ([]byte, error) {
		b := make([]byte, n)
		if _, err := io.ReadFull(random, b); err != nil {
			return nil, station.E(op, station.KindInternal, err)
		}
		return b, nil
	}
	obfuscate, err := rnd(sha256Size)
	if err != nil {
		return nil, err
	}
	inner, err := rnd(innerKeySize)
	if err != nil {
		return nil, err
	}

	// The ID key's public area and name.
	unique := crypto.SHA256.New()
	unique.Write(obfuscate)
	unique.Write(key)
	// TPMT_PUBLIC, written out (tpm2.Marshal is reflective and slow):
	// keyedHash, SHA-256, attributes, empty authPolicy, HMAC-SHA256
	// scheme, unique as a TPM2B_DIGEST.
	public := make([]byte, 0, 16+sha256Size)
	public = binary.BigEndian.AppendUint16(public, uint16(tpm2.TPMAlgKeyedHash))
	public = binary.BigEndian.AppendUint16(public, uint16(tpm2.TPMAlgSHA256))
	public = binary.BigEndian.AppendUint32(public, idKeyAttributes)
	public = append2B(public, nil)
	public = binary.BigEndian.AppendUint16(public, uint16(tpm2.TPMAlgHMAC))
	public = binary.BigEndian.AppendUint16(public, uint16(tpm2.TPMAlgSHA256))
	public = append2B(public, unique.Sum(nil))
	name := objectName(crypto.SHA256, tpm2.TPMAlgSHA256, public)

	// TPM2B_SENSITIVE: sensitiveType, authValue (empty), seedValue, the key.
	sens := binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMAlgKeyedHash))
	sens = append2B(sens, nil)
	sens = append2B(sens, obfuscate)
	sens = append2B(sens, key)
	sens2B := append2B(nil, sens)

	// Inner wrapper: integrity digest over the sensitive area and the name,
	// then AES-128-CFB (zero IV) under the inner key.
	integrity := crypto.SHA256.New()
	integrity.Write(sens2B)
	integrity.Write(name)
	encSens := cfb(inner, append2B(nil, integrity.Sum(nil)), sens2B)

	// Outer wrapper to the SRK.
	seed, encSeed, err := srk.key.Encapsulate(random, "DUPLICATE")
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "encrypt the duplication seed to the SRK: %w", err)
	}
	dupSens := cfb(tpm2.KDFa(srk.hash, seed, "STORAGE", name, nil, srk.bits), encSens)
	outer := hmac.New(srk.hash.New, tpm2.KDFa(srk.hash, seed, "INTEGRITY", nil, nil, 8*srk.hash.Size()))
	outer.Write(dupSens)
	outer.Write(name)
	duplicate := append(append2B(nil, outer.Sum(nil)), dupSens...)

	// The inner key as a credential for the EK, bound to the SRK's name.
	cred, credSeed, err := tpm2.CreateCredential(random, ek.key, srk.name, inner)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "make the credential for the EK: %w", err)
	}

	blob := (&hsm.ActivationBlob{
		Credential:     cred,
		CredentialSeed: credSeed,
		Duplicate:      duplicate,
		DuplicateSeed:  encSeed,
		Public:         public,
	}).Marshal()
	return &Activation{Blob: blob, Key: append([]byte(nil), key...)}, nil
}

const sha256Size = 32

// parentKey is an EK or SRK as a wrapping target.
type parentKey struct {
	key  tpm2.LabeledEncapsulationKey
	name []byte      // nameAlg || H(TPMT_PUBLIC as received)
	hash crypto.Hash // of the nameAlg
	bits int         // AES key bits of its symmetric definition
}

// parent reads a TPM2B_PUBLIC (or a bare TPMT_PUBLIC) of a storage key or
// an EK: a restricted decryption key with AES-CFB protection.
func parent(b []byte, what string) (*parentKey, error) {
	raw := b
	_, pub, err := hsm.ParsePublic(b)
	if err == nil {
		raw = b[2:]
	} else if len(b) <= 0xFFFF { // perhaps a bare TPMT_PUBLIC, as some tools write EKs
		if _, p, err2 := hsm.ParsePublic(append2B(nil, b)); err2 == nil {
			pub, err = p, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("the %s is not a TPM public area: %w", what, err)
	}
	a := pub.ObjectAttributes
	if !a.Restricted || !a.Decrypt || a.SignEncrypt {
		return nil, fmt.Errorf("the %s is not a restricted decryption key: send the TPM's EK (0x81010001) and SRK (0x81000001)", what)
	}
	hash, err := pub.NameAlg.Hash()
	if err != nil {
		return nil, fmt.Errorf("the %s's name algorithm %v is not supported", what, pub.NameAlg)
	}
	key, err := tpm2.ImportEncapsulationKey(pub)
	if err != nil {
		return nil, fmt.Errorf("the %s cannot wrap secrets: %w", what, err)
	}
	sym := key.SymmetricParameters()
	if sym == nil || sym.Algorithm != tpm2.TPMAlgAES {
		return nil, fmt.Errorf("the %s does not protect with AES", what)
	}
	if mode, err := sym.Mode.AES(); err != nil || *mode != tpm2.TPMAlgCFB {
		return nil, fmt.Errorf("the %s does not protect with AES-CFB", what)
	}
	bits, err := sym.KeyBits.AES()
	if err != nil || (*bits != 128 && *bits != 192 && *bits != 256) {
		return nil, fmt.Errorf("the %s has no usable AES key size", what)
	}
	return &parentKey{key: key, name: objectName(hash, pub.NameAlg, raw), hash: hash, bits: int(*bits)}, nil
}

// objectName is the TPM name of an object: its nameAlg, then the digest of
// its TPMT_PUBLIC bytes.
func objectName(h crypto.Hash, alg tpm2.TPMIAlgHash, public []byte) []byte {
	d := h.New()
	d.Write(public)
	return d.Sum(binary.BigEndian.AppendUint16(nil, uint16(alg)))
}

// append2B appends b as a TPM2B: a 2-byte big-endian size, then b.
func append2B(dst, b []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(b)))
	return append(dst, b...)
}

// cfb encrypts the concatenation of parts with AES in CFB mode (full-block
// feedback) and an all-zero IV, as the TPM does.
func cfb(key []byte, parts ...[]byte) []byte {
	var plain []byte
	for _, p := range parts {
		plain = append(plain, p...)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		panic("dps: AES key of " + fmt.Sprint(len(key)) + " bytes") // sizes are checked above
	}
	out := make([]byte, len(plain))
	//lint:ignore SA1019 the TPM specifies CFB; there is no authenticated alternative here.
	cipher.NewCFBEncrypter(block, make([]byte, aes.BlockSize)).XORKeyStream(out, plain)
	return out
}
