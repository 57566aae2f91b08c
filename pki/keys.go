package pki

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/scrypt"

	"github.com/kilnworks/kiln/internal/atomicfile"
	"github.com/kilnworks/kiln/station"
)

// KeyType names a public-key algorithm and size, as used for the CA's own
// keys and in a Profile's list of allowed device keys.
type KeyType string

// The key types Kiln creates and recognises.
const (
	ECDSAP256 KeyType = "EC-P256"
	ECDSAP384 KeyType = "EC-P384"
	ECDSAP521 KeyType = "EC-P521"
	RSA2048   KeyType = "RSA-2048"
	RSA3072   KeyType = "RSA-3072"
	RSA4096   KeyType = "RSA-4096"
	Ed25519   KeyType = "Ed25519"
)

// KeyTypeOf returns the KeyType of a public key, e.g. "EC-P256" or
// "RSA-2048"; for an RSA key of another size it is "RSA-<bits>".
func KeyTypeOf(pub crypto.PublicKey) KeyType {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return ECDSAP256
		case elliptic.P384():
			return ECDSAP384
		case elliptic.P521():
			return ECDSAP521
		}
		return KeyType("EC-" + k.Curve.Params().Name)
	case *rsa.PublicKey:
		return KeyType("RSA-" + strconv.Itoa(k.N.BitLen()))
	case ed25519.PublicKey:
		return Ed25519
	}
	return KeyType(fmt.Sprintf("unknown (%T)", pub))
}

// allows reports whether the allowed entry a admits key type k. An entry is a
// KeyType, or an RSA type with a trailing "+" meaning that size or larger
// ("RSA-2048+").
func (a KeyType) allows(k KeyType) bool {
	if a == k {
		return true
	}
	min, ok := strings.CutSuffix(string(a), "+")
	if !ok || !strings.HasPrefix(min, "RSA-") || !strings.HasPrefix(string(k), "RSA-") {
		return false
	}
	want, err1 := strconv.Atoi(strings.TrimPrefix(min, "RSA-"))
	got, err2 := strconv.Atoi(strings.TrimPrefix(string(k), "RSA-"))
	return err1 == nil && err2 == nil && got >= want
}

// generate makes a new software key of type t.
func (t KeyType) generate() (crypto.Signer, error) {
	switch t {
	case ECDSAP256, "":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case ECDSAP521:
		return ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	case RSA2048, RSA3072, RSA4096:
		bits, _ := strconv.Atoi(strings.TrimPrefix(string(t), "RSA-"))
		return rsa.GenerateKey(rand.Reader, bits)
	case Ed25519:
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	}
	return nil, station.Errorf("generate key", station.KindInvalid, "key type %q is not supported: use one of EC-P256, EC-P384, RSA-2048, RSA-3072", t)
}

// KeyStore keeps the CA's private keys and hands them out as crypto.Signers.
// Keys are named ("root", "intermediate"); what a name maps to is the
// store's business.
type KeyStore interface {
	// CreateKey makes a new key of type t under name and returns its signer.
	// It returns KindConflict when name exists, KindInvalid for an
	// unsupported type and KindUnavailable when the store cannot be reached.
	CreateKey(ctx context.Context, name string, t KeyType) (crypto.Signer, error)
	// Signer returns the signer of the existing key name. It returns
	// KindNotFound when there is none and KindUnauthorized when the key
	// cannot be unlocked (missing or wrong passphrase or PIN).
	Signer(ctx context.Context, name string) (crypto.Signer, error)
}

// DefaultScryptN is the scrypt cost FileKeys uses when ScryptN is zero
// (2^15, with r=8 and p=1: about 32 MiB and a tenth of a second).
const DefaultScryptN = 1 << 15

// FileKeys is the default KeyStore: each key is a file <Dir>/<name>.key
// holding the PKCS #8 key sealed with AES-256-GCM under a key derived from
// Passphrase with scrypt. The scrypt parameters and a random salt are stored
// in the file, which is written with mode 0600. The clear key is never
// written anywhere.
type FileKeys struct {
	// Dir holds the key files.
	Dir string
	// Passphrase unlocks the keys. It is required.
	Passphrase []byte
	// ScryptN is the scrypt cost for new files (a power of two, at least
	// 2^10); zero means DefaultScryptN. Existing files keep their own.
	ScryptN int
}

var _ KeyStore = (*FileKeys)(nil)

// sealedKey is the on-disk form of a FileKeys key.
type sealedKey struct {
	Format     string `json:"format"` // "kiln-sealed-key/1"
	KeyType    string `json:"key_type"`
	KDF        string `json:"kdf"` // "scrypt"
	N          int    `json:"n"`
	R          int    `json:"r"`
	P          int    `json:"p"`
	Salt       []byte `json:"salt"`
	Cipher     string `json:"cipher"` // "AES-256-GCM"
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ciphertext"`
}

const sealedFormat = "kiln-sealed-key/1"

// aad binds the parameters to the ciphertext, so editing them breaks the seal.
func (s *sealedKey) aad() []byte {
	return fmt.Appendf(nil, "%s|%s|%s|%d|%d|%d|%x|%s", s.Format, s.KeyType, s.KDF, s.N, s.R, s.P, s.Salt, s.Cipher)
}

func (f *FileKeys) path(name string) string { return filepath.Join(f.Dir, name+".key") }

// CreateKey implements KeyStore.
func (f *FileKeys) CreateKey(ctx context.Context, name string, t KeyType) (crypto.Signer, error) {
	const op = "create CA key"
	if len(f.Passphrase) == 0 {
		return nil, station.Errorf(op, station.KindInvalid, "no passphrase for the CA key: the key is always encrypted at rest, so give one")
	}
	if _, err := os.Stat(f.path(name)); err == nil {
		return nil, station.Errorf(op, station.KindConflict, "key file %s exists already: remove it or load it instead", f.path(name))
	}
	key, err := t.generate()
	if err != nil {
		return nil, err
	}
	if err := f.seal(name, t, key); err != nil {
		return nil, err
	}
	return key, nil
}

func (f *FileKeys) seal(name string, t KeyType, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return station.E("seal CA key", station.KindInvalid, err)
	}
	defer clear(der)
	return f.sealBytes(name, string(KeyTypeOf(key.Public())), der)
}

// sealBytes writes plain, sealed under the passphrase, to name's file.
func (f *FileKeys) sealBytes(name, keyType string, plain []byte) error {
	const op = "seal CA key"
	n := f.ScryptN
	if n == 0 {
		n = DefaultScryptN
	}
	if n < 1<<10 || n&(n-1) != 0 {
		return station.Errorf(op, station.KindInvalid, "scrypt cost %d must be a power of two of at least 1024", n)
	}
	s := &sealedKey{Format: sealedFormat, KeyType: keyType, KDF: "scrypt", N: n, R: 8, P: 1, Cipher: "AES-256-GCM"}
	s.Salt = make([]byte, 16)
	rand.Read(s.Salt)
	aead, err := s.aead(f.Passphrase)
	if err != nil {
		return err
	}
	s.Nonce = make([]byte, aead.NonceSize())
	rand.Read(s.Nonce)
	s.Ciphertext = aead.Seal(nil, s.Nonce, plain, s.aad())
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	if err := os.MkdirAll(f.Dir, 0o700); err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	if err := writeFileAtomic(f.path(name), append(b, '\n'), 0o600); err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	return nil
}

func (s *sealedKey) aead(passphrase []byte) (cipher.AEAD, error) {
	if s.KDF != "scrypt" || s.Cipher != "AES-256-GCM" {
		return nil, station.Errorf("unseal CA key", station.KindInvalid, "key file uses %s/%s: only scrypt/AES-256-GCM is supported", s.KDF, s.Cipher)
	}
	k, err := scrypt.Key(passphrase, s.Salt, s.N, s.R, s.P, 32)
	if err != nil {
		return nil, station.Errorf("unseal CA key", station.KindInvalid, "scrypt parameters in the key file: %w", err)
	}
	defer clear(k)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, station.E("unseal CA key", station.KindInternal, err)
	}
	return cipher.NewGCM(block)
}

// Signer implements KeyStore.
func (f *FileKeys) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	const op = "unlock CA key"
	der, err := f.unseal(name)
	if err != nil {
		return nil, err
	}
	defer clear(der)
	key, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "key in %s does not parse: %w", f.path(name), err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, station.Errorf(op, station.KindInvalid, "key in %s is a %T, not a signing key", f.path(name), key)
	}
	return signer, nil
}

// unseal returns the clear contents of name's file.
func (f *FileKeys) unseal(name string) ([]byte, error) {
	const op = "unlock CA key"
	b, err := os.ReadFile(f.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, station.Errorf(op, station.KindNotFound, "no key file %s", f.path(name))
	} else if err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	var s sealedKey
	if err := json.Unmarshal(b, &s); err != nil || s.Format != sealedFormat {
		return nil, station.Errorf(op, station.KindInvalid, "%s is not a Kiln sealed key file", f.path(name))
	}
	if len(f.Passphrase) == 0 {
		return nil, station.Errorf(op, station.KindUnauthorized, "%s is encrypted: give the station CA passphrase", f.path(name))
	}
	aead, err := s.aead(f.Passphrase)
	if err != nil {
		return nil, err
	}
	der, err := aead.Open(nil, s.Nonce, s.Ciphertext, s.aad())
	if err != nil {
		return nil, station.Errorf(op, station.KindUnauthorized, "wrong passphrase for %s (or the file was altered): check the station CA passphrase", f.path(name))
	}
	return der, nil
}

// secretKeyType marks a sealed file that holds a secret, not a signing key.
const secretKeyType = "secret"

// Secret returns the secret stored under name, sealed like the CA keys
// (e.g. the symmetric-key enrollment group key), creating a random one of
// size bytes when there is none. Kinds: Unauthorized (wrong passphrase),
// Invalid (the file holds a signing key, or no passphrase is set).
func (f *FileKeys) Secret(ctx context.Context, name string, size int) ([]byte, error) {
	const op = "open station secret"
	b, err := f.unseal(name)
	if station.KindOf(err) == station.KindNotFound {
		if len(f.Passphrase) == 0 {
			return nil, station.Errorf(op, station.KindInvalid, "no passphrase: station secrets are always encrypted at rest, so give one")
		}
		b = make([]byte, size)
		rand.Read(b)
		if err := f.sealBytes(name, secretKeyType, b); err != nil {
			return nil, err
		}
		return b, nil
	}
	if err != nil {
		return nil, err
	}
	if _, perr := x509.ParsePKCS8PrivateKey(b); perr == nil {
		clear(b)
		return nil, station.Errorf(op, station.KindInvalid, "%s holds a signing key, not a secret: use another name", f.path(name))
	}
	return b, nil
}

// writeFileAtomic writes b to a temporary file beside path and renames it
// into place, so a crash never leaves a half-written file.
func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	return atomicfile.WriteFile(path, b, mode)
}
