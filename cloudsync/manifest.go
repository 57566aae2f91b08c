package cloudsync

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// ManifestFormat names the format of Kiln's signed manifests.
const ManifestFormat = "kiln-manifest/1"

// maxManifest bounds a manifest file: a million units' entries would not
// fit, a batch's do.
const maxManifest = 256 << 20

// Claims is what one manifest entry says of a unit, signed.
type Claims struct {
	Serial         string `json:"serial"`
	RegistrationID string `json:"registrationId"`
	Method         string `json:"method"`
	EKPublic       string `json:"ekPublic,omitempty"`    // base64 TPM2B_PUBLIC
	EKCert         string `json:"ekCert,omitempty"`      // base64 DER
	Certificate    string `json:"certificate,omitempty"` // base64 DER of an X.509 unit's leaf
	// CertSerial and CertThumbprint name an X.509 unit's leaf: its serial
	// (hex) and SHA-256 thumbprint (upper-case hex).
	CertSerial     string `json:"certificateSerial,omitempty"`
	CertThumbprint string `json:"sha256Thumbprint,omitempty"`
	// EnrollmentGroup is the group a symmetric-key unit registers through,
	// SymKeySHA256 the SHA-256 of its device key (never the key).
	EnrollmentGroup string    `json:"enrollmentGroupId,omitempty"`
	SymKeySHA256    string    `json:"symmetricKeySha256,omitempty"`
	Model           string    `json:"model,omitempty"`
	Firmware        string    `json:"firmware,omitempty"`
	BatchID         int64     `json:"batchId"`
	Batch           string    `json:"batch"`
	Station         string    `json:"station"`
	Operator        string    `json:"operator"`
	Provisioned     time.Time `json:"provisioned"` // when the unit was recorded
	Signed          time.Time `json:"signed"`
}

// Manifest is a batch's signed manifest: one compact JWS (ES256) per unit,
// in the spirit of Microchip's Trust Platform manifests, and a seal (a JWS
// over the digest of the entry list) so that removing, adding or
// reordering entries is caught too.
type Manifest struct {
	Format  string    `json:"format"`
	BatchID int64     `json:"batchId"`
	Batch   string    `json:"batch"`
	Created time.Time `json:"created"`
	KeyID   string    `json:"kid"` // the signer's JWK thumbprint
	// PublicKey is the signer's key (PEM), for information: verify with a
	// key you got from the station by another channel.
	PublicKey string   `json:"publicKey"`
	Entries   []string `json:"entries"`
	Seal      string   `json:"seal"`
}

// sealClaims is the payload of a manifest's seal.
type sealClaims struct {
	BatchID int64  `json:"batchId"`
	Count   int    `json:"count"`
	Entries string `json:"entriesSha256"` // hex SHA-256 of the entries joined by "\n"
}

func entriesDigest(entries []string) string {
	sum := sha256.Sum256([]byte(strings.Join(entries, "\n")))
	return hex.EncodeToString(sum[:])
}

// UnitClaims returns the claims of unit u of batch b.
func UnitClaims(b *station.Batch, u *station.Unit, signed time.Time) Claims {
	c := Claims{Serial: u.Serial, RegistrationID: u.RegistrationID, Method: string(u.Method), Model: u.Model, Firmware: u.Firmware,
		BatchID: b.ID, Batch: b.Name, Station: u.Station, Operator: u.Operator, Provisioned: u.Created.UTC(), Signed: signed.UTC()}
	if len(u.EKPublic) > 0 {
		c.EKPublic = base64.StdEncoding.EncodeToString(u.EKPublic)
	}
	if len(u.EKCert) > 0 {
		c.EKCert = base64.StdEncoding.EncodeToString(u.EKCert)
	}
	id := Identity(u, "")
	c.Certificate, c.CertSerial, c.CertThumbprint = id.Certificate, id.CertSerial, id.SHA256Thumbprint
	c.EnrollmentGroup, c.SymKeySHA256 = id.EnrollmentGroup, id.SymKeySHA256
	return c
}

// SignManifest returns the signed manifest of batch b's units. progress,
// when set, is called after each unit.
func SignManifest(b *station.Batch, units []*station.Unit, s *Signer, now time.Time, progress func(done int)) (*Manifest, error) {
	m := &Manifest{Format: ManifestFormat, BatchID: b.ID, Batch: b.Name, Created: now.UTC(), KeyID: s.kid,
		PublicKey: string(s.PublicKeyPEM()), Entries: make([]string, 0, len(units))}
	hdr := jwsHeader{Typ: "kiln-unit+jws", Kid: s.kid}
	for i, u := range units {
		payload, err := json.Marshal(UnitClaims(b, u, now))
		if err != nil {
			return nil, station.E("sign manifest", station.KindInternal, err)
		}
		jws, err := signJWS(s.key, hdr, payload)
		if err != nil {
			return nil, station.E("sign manifest", station.KindInternal, err)
		}
		m.Entries = append(m.Entries, jws)
		if progress != nil {
			progress(i + 1)
		}
	}
	payload, _ := json.Marshal(sealClaims{BatchID: b.ID, Count: len(m.Entries), Entries: entriesDigest(m.Entries)})
	seal, err := signJWS(s.key, jwsHeader{Typ: "kiln-manifest-seal+jws", Kid: s.kid}, payload)
	if err != nil {
		return nil, station.E("sign manifest", station.KindInternal, err)
	}
	m.Seal = seal
	return m, nil
}

// WriteManifest writes m as indented JSON.
func WriteManifest(w io.Writer, m *Manifest) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(m)
}

// DecodeManifest reads a manifest file without verifying it. Kinds:
// Invalid (not a Kiln manifest, malformed, too large).
func DecodeManifest(b []byte) (*Manifest, error) {
	const op = "read manifest"
	if len(b) > maxManifest {
		return nil, station.Errorf(op, station.KindInvalid, "the file is %d bytes, more than a manifest's %d", len(b), maxManifest)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "not a manifest's JSON: %v", err)
	}
	if dec.More() {
		return nil, station.Errorf(op, station.KindInvalid, "the file has data after the manifest")
	}
	if m.Format != ManifestFormat {
		return nil, station.Errorf(op, station.KindInvalid, "format %.40q: this reads %s manifests", m.Format, ManifestFormat)
	}
	return &m, nil
}

// VerifyManifest checks every entry and the seal of m against the trusted
// signer key pub and returns the entries' claims. It fails at the first
// problem, saying which entry and why. Kinds: Unauthorized (a signature
// does not verify, another key signed, entries were removed, added or
// reordered, an entry belongs to another batch), Invalid (malformed).
func VerifyManifest(m *Manifest, pub *ecdsa.PublicKey) ([]Claims, error) {
	const op = "verify manifest"
	if pub == nil {
		return nil, station.Errorf(op, station.KindInvalid, "no signer key: give the public key of the station that signed the manifest")
	}
	kid := KeyID(pub)
	if m.KeyID != kid {
		return nil, station.Errorf(op, station.KindUnauthorized,
			"the manifest names signer %s, not the key you trust (%s): get the right public key from the station that signed it", m.KeyID, kid)
	}
	claims := make([]Claims, 0, len(m.Entries))
	seen := map[string]bool{}
	for i, e := range m.Entries {
		hdr, input, payload, sig, err := parseJWS(e)
		if err != nil {
			return nil, station.Errorf(op, station.KindOf(err), "entry %d: %w", i+1, err)
		}
		if hdr.Kid != kid {
			return nil, station.Errorf(op, station.KindUnauthorized, "entry %d names signer %q, not %s", i+1, hdr.Kid, kid)
		}
		var c Claims
		if err := json.Unmarshal(payload, &c); err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "entry %d: the payload is not a unit's claims: %v", i+1, err)
		}
		if err := verifyES256(hdr.Alg, input, sig, pub); err != nil {
			return nil, station.Errorf(op, station.KindOf(err), "entry %d (serial %.64q): %w", i+1, c.Serial, err)
		}
		if c.BatchID != m.BatchID {
			return nil, station.Errorf(op, station.KindUnauthorized, "entry %d (serial %.64q) was signed for batch %d, not this manifest's batch %d", i+1, c.Serial, c.BatchID, m.BatchID)
		}
		if seen[c.Serial] {
			return nil, station.Errorf(op, station.KindUnauthorized, "entry %d repeats serial %.64q", i+1, c.Serial)
		}
		seen[c.Serial] = true
		claims = append(claims, c)
	}
	hdr, input, payload, sig, err := parseJWS(m.Seal)
	if err != nil {
		return nil, station.Errorf(op, station.KindOf(err), "the seal: %w", err)
	}
	if err := verifyES256(hdr.Alg, input, sig, pub); err != nil {
		return nil, station.Errorf(op, station.KindOf(err), "the seal: %w", err)
	}
	var sc sealClaims
	if err := json.Unmarshal(payload, &sc); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the seal's payload: %v", err)
	}
	if sc.BatchID != m.BatchID || sc.Count != len(m.Entries) || sc.Entries != entriesDigest(m.Entries) {
		return nil, station.Errorf(op, station.KindUnauthorized,
			"the list of entries was changed after signing (the seal covers %d entries of batch %d; the file has %d of batch %d, or another order)",
			sc.Count, sc.BatchID, len(m.Entries), m.BatchID)
	}
	return claims, nil
}
