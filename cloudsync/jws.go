package cloudsync

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"strings"

	"github.com/kilnworks/kiln/station"
)

// maxJWS bounds one JWS: a unit's claims with an EK certificate are a few
// kilobytes.
const maxJWS = 64 << 10

var b64 = base64.RawURLEncoding

// jwsHeader is the protected header of a JWS (RFC 7515) as Kiln and
// Microchip's manifests use it.
type jwsHeader struct {
	Alg string   `json:"alg"`
	Typ string   `json:"typ,omitempty"`
	Kid string   `json:"kid,omitempty"`
	X5C []string `json:"x5c,omitempty"` // base64 (not URL) DER, signer first
}

// signJWS returns the compact JWS of payload under hdr, signed ES256 by
// key.
func signJWS(key *ecdsa.PrivateKey, hdr jwsHeader, payload []byte) (string, error) {
	hdr.Alg = "ES256"
	h, err := json.Marshal(hdr)
	if err != nil {
		return "", err
	}
	input := b64.EncodeToString(h) + "." + b64.EncodeToString(payload)
	sum := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + b64.EncodeToString(sig), nil
}

// parseJWS splits a compact JWS and decodes its header, payload and
// signature without verifying anything. Kinds: Invalid.
func parseJWS(compact string) (hdr jwsHeader, input string, payload, sig []byte, err error) {
	const op = "read JWS"
	if len(compact) > maxJWS {
		return hdr, "", nil, nil, station.Errorf(op, station.KindInvalid, "the JWS is %d bytes, more than %d", len(compact), maxJWS)
	}
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		return hdr, "", nil, nil, station.Errorf(op, station.KindInvalid, "not a compact JWS: it has %d parts, not 3", len(parts))
	}
	h, err := b64.DecodeString(parts[0])
	if err != nil {
		return hdr, "", nil, nil, station.Errorf(op, station.KindInvalid, "the header is not base64url: %v", err)
	}
	if err := json.Unmarshal(h, &hdr); err != nil {
		return hdr, "", nil, nil, station.Errorf(op, station.KindInvalid, "the header is not JSON: %v", err)
	}
	if payload, err = b64.DecodeString(parts[1]); err != nil {
		return hdr, "", nil, nil, station.Errorf(op, station.KindInvalid, "the payload is not base64url: %v", err)
	}
	if sig, err = b64.DecodeString(parts[2]); err != nil {
		return hdr, "", nil, nil, station.Errorf(op, station.KindInvalid, "the signature is not base64url: %v", err)
	}
	return hdr, parts[0] + "." + parts[1], payload, sig, nil
}

// verifyES256 checks an ES256 signature (r || s, 64 bytes) over input.
// Kinds: Invalid (not ES256, malformed), Unauthorized (does not verify).
func verifyES256(alg, input string, sig []byte, pub *ecdsa.PublicKey) error {
	const op = "verify JWS"
	if alg != "ES256" {
		return station.Errorf(op, station.KindInvalid, "the JWS is signed %q, not ES256: refused", alg)
	}
	if pub == nil || pub.Curve != elliptic.P256() {
		return station.Errorf(op, station.KindInvalid, "the verification key is not a P-256 key")
	}
	if len(sig) != 64 {
		return station.Errorf(op, station.KindUnauthorized, "the signature is %d bytes, not 64: it was damaged", len(sig))
	}
	sum := sha256.Sum256([]byte(input))
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(pub, sum[:], r, s) {
		return station.Errorf(op, station.KindUnauthorized, "the signature does not match: the entry was changed after it was signed, or another key signed it")
	}
	return nil
}

// KeyID returns the RFC 7638 JWK thumbprint (SHA-256, base64url) of a
// P-256 public key: how manifests name their signer.
func KeyID(pub *ecdsa.PublicKey) string {
	raw, err := pub.Bytes() // 0x04 || X || Y
	if err != nil || len(raw) != 65 {
		return ""
	}
	x, y := raw[1:33], raw[33:]
	j := `{"crv":"P-256","kty":"EC","x":"` + b64.EncodeToString(x) + `","y":"` + b64.EncodeToString(y) + `"}`
	sum := sha256.Sum256([]byte(j))
	return b64.EncodeToString(sum[:])
}

// SigningKeyFile is the name of the manifest signing key's file in the
// station's data directory.
const SigningKeyFile = "manifest-signing.key"

const signingKeyAAD = "manifest signing key"

// Signer signs manifests with the station's ES256 key.
type Signer struct {
	key *ecdsa.PrivateKey
	kid string
}

// LoadSigner reads the station's manifest signing key from path, sealed by
// s, creating it (P-256, file mode 0600) when it does not exist. Kinds:
// Unavailable (file), Unauthorized (it does not unseal), Invalid.
func LoadSigner(path string, s *Sealer) (*Signer, error) {
	const op = "load manifest signing key"
	sealed, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, station.E(op, station.KindInternal, err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, station.E(op, station.KindInternal, err)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, station.Errorf(op, station.KindUnavailable, "create %s: %w", path, err)
		}
		_, werr := f.Write(s.Seal(der, signingKeyAAD))
		if err := errors.Join(werr, f.Sync(), f.Close()); err != nil {
			os.Remove(path)
			return nil, station.Errorf(op, station.KindUnavailable, "write %s: %w", path, err)
		}
		return &Signer{key: key, kid: KeyID(&key.PublicKey)}, nil
	}
	if err != nil {
		return nil, station.Errorf(op, station.KindUnavailable, "read %s: %w", path, err)
	}
	der, err := s.Open(sealed, signingKeyAAD)
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	key, ok := k.(*ecdsa.PrivateKey)
	if err != nil || !ok || key.Curve != elliptic.P256() {
		return nil, station.Errorf(op, station.KindInvalid, "%s does not hold a P-256 key: restore it from a backup", path)
	}
	return &Signer{key: key, kid: KeyID(&key.PublicKey)}, nil
}

// NewSigner returns a signer with key (P-256), for tests and for keys held
// elsewhere.
func NewSigner(key *ecdsa.PrivateKey) *Signer { return &Signer{key: key, kid: KeyID(&key.PublicKey)} }

// KeyID is the signer's JWK thumbprint.
func (s *Signer) KeyID() string { return s.kid }

// Public returns the signer's public key.
func (s *Signer) Public() *ecdsa.PublicKey { return &s.key.PublicKey }

// PublicKeyPEM returns the signer's public key as a PEM "PUBLIC KEY":
// what a customer is given to verify manifests.
func (s *Signer) PublicKeyPEM() []byte {
	der, _ := x509.MarshalPKIXPublicKey(&s.key.PublicKey)
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// ParsePublicKeyPEM reads a P-256 public key from PEM: a "PUBLIC KEY" or a
// certificate. Kinds: Invalid.
func ParsePublicKeyPEM(b []byte) (*ecdsa.PublicKey, error) {
	const op = "read the signer's public key"
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, station.Errorf(op, station.KindInvalid, "no PEM block: give the PUBLIC KEY or CERTIFICATE file of the signer")
	}
	var k any
	var err error
	switch blk.Type {
	case "PUBLIC KEY":
		k, err = x509.ParsePKIXPublicKey(blk.Bytes)
	case "CERTIFICATE":
		var c *x509.Certificate
		if c, err = x509.ParseCertificate(blk.Bytes); err == nil {
			k = c.PublicKey
		}
	default:
		return nil, station.Errorf(op, station.KindInvalid, "a PEM %q: give a PUBLIC KEY or a CERTIFICATE", blk.Type)
	}
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "%v", err)
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, station.Errorf(op, station.KindInvalid, "the key is not a P-256 (ES256) key")
	}
	return pub, nil
}
