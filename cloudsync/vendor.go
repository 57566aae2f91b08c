package cloudsync

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// VendorEntry is one entry of a vendor manifest in Microchip's Trust
// Platform style: a JWS in flattened JSON serialization whose protected
// header carries the signer's certificate chain (x5c) and whose payload
// describes one secure element.
type VendorEntry struct {
	Payload   string `json:"payload"`
	Protected string `json:"protected"`
	Header    struct {
		UniqueID string `json:"uniqueId"`
	} `json:"header"`
	Signature string `json:"signature"`
}

// VendorPart is what a verified vendor entry says of one part.
type VendorPart struct {
	UniqueID   string
	Model      string
	PartNumber string
	// Certificate is the part's device certificate (first key's x5c[0]),
	// nil when the entry carries none.
	Certificate *x509.Certificate
	// PublicKey is the part's first public key.
	PublicKey *ecdsa.PublicKey
	// RegistrationID is the certificate's common name (what DPS takes as
	// the registration ID of an X.509 device), else "sn" + the unique ID.
	RegistrationID string
	Provisioned    time.Time
}

// vendorPayload is the part of a secure element's payload Kiln reads.
type vendorPayload struct {
	Version               int       `json:"version"`
	Model                 string    `json:"model"`
	PartNumber            string    `json:"partNumber"`
	UniqueID              string    `json:"uniqueId"`
	ProvisioningTimestamp time.Time `json:"provisioningTimestamp"`
	PublicKeySet          struct {
		Keys []struct {
			Kid string   `json:"kid"`
			Kty string   `json:"kty"`
			Crv string   `json:"crv"`
			X   string   `json:"x"`
			Y   string   `json:"y"`
			X5C []string `json:"x5c"`
		} `json:"keys"`
	} `json:"publicKeySet"`
}

// maxVendorManifest bounds a vendor manifest file.
const maxVendorManifest = 256 << 20

// DecodeVendorManifest reads a vendor manifest: a JSON array of entries.
// Nothing is verified yet. Kinds: Invalid.
func DecodeVendorManifest(b []byte) ([]VendorEntry, error) {
	const op = "read vendor manifest"
	if len(b) > maxVendorManifest {
		return nil, station.Errorf(op, station.KindInvalid, "the file is %d bytes, more than %d", len(b), maxVendorManifest)
	}
	var entries []VendorEntry
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&entries); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "not a vendor manifest (a JSON array of signed entries): %v", err)
	}
	if dec.More() {
		return nil, station.Errorf(op, station.KindInvalid, "the file has data after the manifest's array")
	}
	if len(entries) == 0 {
		return nil, station.Errorf(op, station.KindInvalid, "the manifest holds no entries")
	}
	return entries, nil
}

// VerifyVendorEntry checks entry e against the trusted manifest signer
// certificate: the entry's x5c chain must start with signer or chain up to
// it, and the entry's ES256 signature must verify under the chain's first
// certificate. It returns the part the entry describes. Kinds:
// Unauthorized (chain or signature), Invalid (malformed).
func VerifyVendorEntry(e *VendorEntry, signer *x509.Certificate, now time.Time) (*VendorPart, error) {
	const op = "verify vendor entry"
	h, err := b64.DecodeString(e.Protected)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the protected header is not base64url: %v", err)
	}
	var hdr jwsHeader
	if err := json.Unmarshal(h, &hdr); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the protected header is not JSON: %v", err)
	}
	if len(hdr.X5C) == 0 {
		return nil, station.Errorf(op, station.KindUnauthorized, "the entry carries no x5c chain: it cannot be tied to the signer")
	}
	chain := make([]*x509.Certificate, 0, len(hdr.X5C))
	for i, c := range hdr.X5C {
		der, err := base64.StdEncoding.DecodeString(c)
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "x5c[%d] is not base64: %v", i, err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "x5c[%d] is not a certificate: %v", i, err)
		}
		chain = append(chain, cert)
	}
	if !chain[0].Equal(signer) {
		roots := x509.NewCertPool()
		roots.AddCert(signer)
		inter := x509.NewCertPool()
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return nil, station.Errorf(op, station.KindUnauthorized,
				"the entry's signer %q does not chain to the signer certificate you gave (%q): %v", chain[0].Subject.CommonName, signer.Subject.CommonName, err)
		}
	}
	pub, ok := chain[0].PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, station.Errorf(op, station.KindInvalid, "the entry's signer key is not an EC key")
	}
	sig, err := b64.DecodeString(e.Signature)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the signature is not base64url: %v", err)
	}
	if err := verifyES256(hdr.Alg, e.Protected+"."+e.Payload, sig, pub); err != nil {
		return nil, station.Errorf(op, station.KindOf(err), "unique ID %.40q: %w", e.Header.UniqueID, err)
	}
	raw, err := b64.DecodeString(e.Payload)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the payload is not base64url: %v", err)
	}
	var p vendorPayload
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the payload is not a secure element's description: %v", err)
	}
	if p.UniqueID == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the payload has no uniqueId")
	}
	if e.Header.UniqueID != "" && !strings.EqualFold(e.Header.UniqueID, p.UniqueID) {
		return nil, station.Errorf(op, station.KindUnauthorized, "the unsigned header names part %.40q but the signed payload part %.40q", e.Header.UniqueID, p.UniqueID)
	}
	part := &VendorPart{UniqueID: strings.ToLower(p.UniqueID), Model: p.Model, PartNumber: p.PartNumber, Provisioned: p.ProvisioningTimestamp}
	if keys := p.PublicKeySet.Keys; len(keys) > 0 {
		k := keys[0]
		if len(k.X5C) > 0 {
			if der, err := base64.StdEncoding.DecodeString(k.X5C[0]); err == nil {
				if c, err := x509.ParseCertificate(der); err == nil {
					part.Certificate = c
				}
			}
			if part.Certificate == nil {
				return nil, station.Errorf(op, station.KindInvalid, "part %s: its key's x5c[0] is not a certificate", part.UniqueID)
			}
		}
		if k.Kty == "EC" && k.Crv == "P-256" {
			x, ex := b64.DecodeString(k.X)
			y, ey := b64.DecodeString(k.Y)
			if ex == nil && ey == nil && len(x) == 32 && len(y) == 32 {
				if pk, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), append(append([]byte{4}, x...), y...)); err == nil {
					part.PublicKey = pk
				}
			}
		}
	}
	part.RegistrationID = "sn" + part.UniqueID
	if part.Certificate != nil && part.Certificate.Subject.CommonName != "" {
		part.RegistrationID = part.Certificate.Subject.CommonName
	}
	return part, nil
}

// VendorUnit returns the unit record of an imported part: an X.509 unit
// named by its unique ID, enrolled through its batch's group, with its
// device certificate when the manifest carries one (so that it can also
// be enrolled on its own).
func VendorUnit(p *VendorPart, stationName, operator string) *station.Unit {
	u := &station.Unit{Serial: p.UniqueID, RegistrationID: p.RegistrationID, Method: station.MethodX509,
		Model: p.Model, Firmware: p.PartNumber, Station: stationName, Operator: operator}
	if c := p.Certificate; c != nil {
		u.Certificate, u.CertSerial = c.Raw, hex.EncodeToString(c.SerialNumber.Bytes())
		_, u.CertThumbprint = station.Thumbprints(c.Raw)
	}
	return u
}

// ImportStore is what an import needs of the station's store.
type ImportStore interface {
	RecordUnit(ctx context.Context, u *station.Unit) error
	UnitBySerial(ctx context.Context, serial string) (*station.Unit, error)
	station.BatchStore
}

// Import verifies every entry against signer and, only when all verify,
// records the parts as X.509 units and puts them into the open batch
// (opened when none is). A part recorded already with the same
// registration ID is taken as it is, so an import can be run again.
// progress, when set, is called after each part. Kinds: Unauthorized,
// Invalid (an entry; nothing is recorded), Conflict (a serial recorded
// with another identity, or in another batch).
func Import(ctx context.Context, s ImportStore, entries []VendorEntry, signer *x509.Certificate, stationName, operator string,
	now time.Time, progress func(done int)) (*station.Batch, []*VendorPart, error) {
	parts := make([]*VendorPart, 0, len(entries))
	seen := map[string]bool{}
	for i := range entries {
		p, err := VerifyVendorEntry(&entries[i], signer, now)
		if err != nil {
			return nil, nil, station.Errorf("import vendor manifest", station.KindOf(err), "entry %d: %w: nothing was imported", i+1, err)
		}
		if seen[p.UniqueID] {
			return nil, nil, station.Errorf("import vendor manifest", station.KindInvalid, "entry %d repeats part %s: nothing was imported", i+1, p.UniqueID)
		}
		seen[p.UniqueID] = true
		parts = append(parts, p)
	}
	b, err := s.OpenBatch(ctx)
	if station.KindOf(err) == station.KindNotFound {
		b = &station.Batch{Name: station.BatchName(now), Created: now}
		err = s.CreateBatch(ctx, b)
	}
	if err != nil {
		return nil, nil, err
	}
	for i, p := range parts {
		u := VendorUnit(p, stationName, operator)
		u.Created = now
		if err := s.RecordUnit(ctx, u); station.KindOf(err) == station.KindConflict {
			old, gerr := s.UnitBySerial(ctx, u.Serial)
			if gerr != nil || old.RegistrationID != u.RegistrationID {
				return b, parts[:i], err
			}
		} else if err != nil {
			return b, parts[:i], err
		}
		if err := s.AddUnit(ctx, b.ID, u.Serial); err != nil {
			return b, parts[:i], err
		}
		if progress != nil {
			progress(i + 1)
		}
	}
	return b, parts, nil
}
