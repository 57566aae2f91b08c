package link

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/kilnworks/kiln/station"
)

// The identity commands (docs/dut-link.md §7): GENERATE KEY (0x10), WRITE
// CERT CHAIN (0x11), WRITE SYMMETRIC KEY (0x12) and READ IDENTITY (0x13).
// Their payloads carry DER and key bytes, so they are TLVs like the HELLO
// response (tag u8, length u16 big-endian, value), not JSON: unknown tags
// are skipped, a tag that may appear once and appears twice is an error.

var _ station.IdentityLink = (*Client)(nil)

// DefaultKeyGenTimeout bounds one attempt of GENERATE KEY: a TPM may take
// many seconds to find an RSA-2048 key.
const DefaultKeyGenTimeout = 90 * time.Second

// Limits of the identity payloads.
const (
	// MaxChain is the most certificates a chain may hold.
	MaxChain = 8
	// MinSymKey and MaxSymKey bound a symmetric key's length in bytes (DPS
	// makes 32- or 64-byte keys).
	MinSymKey, MaxSymKey = 16, 64
	// maxName bounds the common name and registration ID (DPS: 128).
	maxName = 128
	// maxShort bounds the key type and storage names.
	maxShort = 32
)

// TLV tags of the identity payloads.
const (
	// KEY REQUEST (request of 0x10).
	tagKeyType    = 0x01 // UTF-8, optional: "EC-P256" (default) or "RSA-2048"
	tagCommonName = 0x02 // UTF-8, required
	tagStorage    = 0x03 // UTF-8, optional: "tpm" or "software"
	// GENERATED KEY (response of 0x10).
	tagGenStorage = 0x01 // UTF-8, required
	tagCSR        = 0x02 // DER, required
	// CERT CHAIN (request of 0x11) and IDENTITY (response of 0x13).
	tagCert = 0x01 // DER, repeated, leaf first
	// SYMMETRIC KEY (request of 0x12).
	tagSymRegID = 0x01 // UTF-8, required
	tagSymKey   = 0x02 // bytes, required
	// IDENTITY (response of 0x13), besides tagCert.
	tagIDStorage = 0x02 // UTF-8
	tagIDSymReg  = 0x03 // UTF-8
	tagIDSymHash = 0x04 // 32 bytes: SHA-256 of the symmetric key
)

type tlv struct {
	tag byte
	v   []byte
}

// parseTLVs splits p into TLVs. what names the payload in errors, which
// never quote payload bytes.
func parseTLVs(p []byte, what string) ([]tlv, error) {
	var out []tlv
	for len(p) > 0 {
		if len(p) < 3 {
			return nil, fmt.Errorf("the %s ends inside a TLV header", what)
		}
		tag, n := p[0], int(binary.BigEndian.Uint16(p[1:3]))
		if len(p) < 3+n {
			return nil, fmt.Errorf("the %s's TLV 0x%02x of %d bytes runs past the end", what, tag, n)
		}
		out = append(out, tlv{tag, p[3 : 3+n]})
		p = p[3+n:]
	}
	return out, nil
}

// onceTags checks that none of tags appears twice.
func onceTags(ts []tlv, what string, tags ...byte) error {
	for _, tag := range tags {
		n := 0
		for _, t := range ts {
			if t.tag == tag {
				n++
			}
		}
		if n > 1 {
			return fmt.Errorf("the %s has %d TLVs 0x%02x, want at most one", what, n, tag)
		}
	}
	return nil
}

// text checks a UTF-8 TLV value of at most max bytes.
func text(v []byte, what, field string, max int) (string, error) {
	if !utf8.Valid(v) {
		return "", fmt.Errorf("the %s's %s is not UTF-8", what, field)
	}
	if len(v) > max {
		return "", fmt.Errorf("the %s's %s is %d bytes, longer than %d", what, field, len(v), max)
	}
	return string(v), nil
}

// appendTLVs appends a TLV per value; values longer than a TLV holds are
// cut (the encoders' callers stay far below).
func appendTLVs(dst []byte, tag byte, vs ...[]byte) []byte {
	for _, v := range vs {
		dst = appendTLV(dst, tag, v)
	}
	return dst
}

// EncodeKeyRequest encodes a GENERATE KEY request payload. Empty optional
// fields are left out.
func EncodeKeyRequest(r station.KeyRequest) []byte {
	var b []byte
	if r.Type != "" {
		b = appendTLV(b, tagKeyType, []byte(r.Type))
	}
	b = appendTLV(b, tagCommonName, []byte(r.CommonName))
	if r.Storage != "" {
		b = appendTLV(b, tagStorage, []byte(r.Storage))
	}
	return b
}

// DecodeKeyRequest reads a GENERATE KEY request payload: a common name
// (1–128 bytes of UTF-8) is required; the key type and storage are checked
// for UTF-8 and length only (the agent decides what it can make).
func DecodeKeyRequest(p []byte) (station.KeyRequest, error) {
	const what = "key request"
	ts, err := parseTLVs(p, what)
	if err == nil {
		err = onceTags(ts, what, tagKeyType, tagCommonName, tagStorage)
	}
	if err != nil {
		return station.KeyRequest{}, err
	}
	var r station.KeyRequest
	for _, t := range ts {
		var s string
		switch t.tag {
		case tagKeyType:
			s, err = text(t.v, what, "key type", maxShort)
			r.Type = s
		case tagCommonName:
			s, err = text(t.v, what, "common name", maxName)
			r.CommonName = s
		case tagStorage:
			s, err = text(t.v, what, "storage", maxShort)
			r.Storage = station.KeyStorage(s)
		}
		if err != nil {
			return station.KeyRequest{}, err
		}
	}
	if r.CommonName == "" {
		return station.KeyRequest{}, fmt.Errorf("the %s names no common name", what)
	}
	return r, nil
}

// EncodeGeneratedKey encodes a GENERATE KEY response payload.
func EncodeGeneratedKey(g station.GeneratedKey) []byte {
	b := appendTLV(nil, tagGenStorage, []byte(g.Storage))
	return appendTLV(b, tagCSR, g.CSR)
}

// DecodeGeneratedKey reads a GENERATE KEY response payload: the storage
// and a non-empty CSR are required; the CSR is not parsed here.
func DecodeGeneratedKey(p []byte) (station.GeneratedKey, error) {
	const what = "generated key"
	ts, err := parseTLVs(p, what)
	if err == nil {
		err = onceTags(ts, what, tagGenStorage, tagCSR)
	}
	if err != nil {
		return station.GeneratedKey{}, err
	}
	var g station.GeneratedKey
	for _, t := range ts {
		switch t.tag {
		case tagGenStorage:
			s, err := text(t.v, what, "storage", maxShort)
			if err != nil {
				return station.GeneratedKey{}, err
			}
			g.Storage = station.KeyStorage(s)
		case tagCSR:
			g.CSR = append([]byte(nil), t.v...)
		}
	}
	if g.Storage == "" {
		return station.GeneratedKey{}, fmt.Errorf("the %s does not say where the key is", what)
	}
	if len(g.CSR) == 0 {
		return station.GeneratedKey{}, fmt.Errorf("the %s carries no CSR", what)
	}
	return g, nil
}

// EncodeCertChain encodes a WRITE CERT CHAIN request payload.
func EncodeCertChain(chain [][]byte) []byte { return appendTLVs(nil, tagCert, chain...) }

// DecodeCertChain reads a WRITE CERT CHAIN request payload: 1 to MaxChain
// non-empty certificates, leaf first. The DER is not parsed here.
func DecodeCertChain(p []byte) ([][]byte, error) {
	const what = "certificate chain"
	ts, err := parseTLVs(p, what)
	if err != nil {
		return nil, err
	}
	chain, err := certs(ts, what)
	if err != nil {
		return nil, err
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("the %s holds no certificate", what)
	}
	return chain, nil
}

// certs collects the certificate TLVs of ts.
func certs(ts []tlv, what string) ([][]byte, error) {
	var chain [][]byte
	for _, t := range ts {
		if t.tag != tagCert {
			continue
		}
		if len(t.v) == 0 {
			return nil, fmt.Errorf("certificate %d of the %s is empty", len(chain)+1, what)
		}
		if len(chain) == MaxChain {
			return nil, fmt.Errorf("the %s holds more than %d certificates", what, MaxChain)
		}
		chain = append(chain, append([]byte(nil), t.v...))
	}
	return chain, nil
}

// EncodeSymmetricKey encodes a WRITE SYMMETRIC KEY request payload.
func EncodeSymmetricKey(regID string, key []byte) []byte {
	b := appendTLV(nil, tagSymRegID, []byte(regID))
	return appendTLV(b, tagSymKey, key)
}

// DecodeSymmetricKey reads a WRITE SYMMETRIC KEY request payload: a
// registration ID (1–128 bytes of UTF-8) and a key of MinSymKey to
// MaxSymKey bytes. Errors never hold key bytes.
func DecodeSymmetricKey(p []byte) (regID string, key []byte, err error) {
	const what = "symmetric key"
	ts, err := parseTLVs(p, what)
	if err == nil {
		err = onceTags(ts, what, tagSymRegID, tagSymKey)
	}
	if err != nil {
		return "", nil, err
	}
	for _, t := range ts {
		switch t.tag {
		case tagSymRegID:
			if regID, err = text(t.v, what, "registration ID", maxName); err != nil {
				return "", nil, err
			}
		case tagSymKey:
			key = append([]byte(nil), t.v...)
		}
	}
	if regID == "" {
		return "", nil, fmt.Errorf("the %s names no registration ID", what)
	}
	if len(key) < MinSymKey || len(key) > MaxSymKey {
		return "", nil, fmt.Errorf("the %s is %d bytes, not %d–%d", what, len(key), MinSymKey, MaxSymKey)
	}
	return regID, key, nil
}

// EncodeIdentity encodes a READ IDENTITY response payload. A fingerprint
// that is not 64 hex digits is left out.
func EncodeIdentity(id station.DeviceIdentity) []byte {
	b := appendTLVs(nil, tagCert, id.CertChain...)
	if id.KeyStorage != "" {
		b = appendTLV(b, tagIDStorage, []byte(id.KeyStorage))
	}
	if id.SymKeyRegistrationID != "" {
		b = appendTLV(b, tagIDSymReg, []byte(id.SymKeyRegistrationID))
	}
	if h, err := hex.DecodeString(id.SymKeySHA256); err == nil && len(h) == 32 {
		b = appendTLV(b, tagIDSymHash, h)
	}
	return b
}

// DecodeIdentity reads a READ IDENTITY response payload; every field is
// optional. A symmetric key fingerprint must be 32 bytes and comes with a
// registration ID.
func DecodeIdentity(p []byte) (station.DeviceIdentity, error) {
	const what = "identity"
	ts, err := parseTLVs(p, what)
	if err == nil {
		err = onceTags(ts, what, tagIDStorage, tagIDSymReg, tagIDSymHash)
	}
	if err != nil {
		return station.DeviceIdentity{}, err
	}
	var id station.DeviceIdentity
	if id.CertChain, err = certs(ts, what); err != nil {
		return station.DeviceIdentity{}, err
	}
	for _, t := range ts {
		switch t.tag {
		case tagIDStorage:
			s, err := text(t.v, what, "key storage", maxShort)
			if err != nil {
				return station.DeviceIdentity{}, err
			}
			id.KeyStorage = station.KeyStorage(s)
		case tagIDSymReg:
			s, err := text(t.v, what, "symmetric key's registration ID", maxName)
			if err != nil {
				return station.DeviceIdentity{}, err
			}
			id.SymKeyRegistrationID = s
		case tagIDSymHash:
			if len(t.v) != 32 {
				return station.DeviceIdentity{}, fmt.Errorf("the %s's symmetric key fingerprint is %d bytes, want 32", what, len(t.v))
			}
			id.SymKeySHA256 = hex.EncodeToString(t.v)
		}
	}
	if (id.SymKeySHA256 == "") != (id.SymKeyRegistrationID == "") {
		return station.DeviceIdentity{}, fmt.Errorf("the %s has a symmetric key fingerprint without its registration ID, or the reverse", what)
	}
	return id, nil
}

// GenerateKey makes the DUT generate a key pair and a CSR for it
// (GENERATE KEY, 0x10), waiting KeyGenTimeout per attempt. Kinds:
// Unavailable, Invalid (a key type or storage the DUT cannot make, a
// malformed answer), NotFound (storage tpm asked of a DUT without a TPM).
func (c *Client) GenerateKey(ctx context.Context, req station.KeyRequest) (station.GeneratedKey, error) {
	const op = "generate DUT key"
	if req.CommonName == "" || len(req.CommonName) > maxName {
		return station.GeneratedKey{}, station.Errorf(op, station.KindInvalid,
			"the CSR's common name must be 1–%d bytes (it is the registration ID); got %d", maxName, len(req.CommonName))
	}
	f, err := c.request(ctx, op, CmdKeyCSR, EncodeKeyRequest(req), c.cfg.KeyGenTimeout, c.cfg.KeyGenTimeout, nil)
	if err != nil {
		return station.GeneratedKey{}, err
	}
	g, err := DecodeGeneratedKey(f.Payload)
	if err != nil {
		return station.GeneratedKey{}, station.Errorf(op, station.KindInvalid, "%s: %v: the agent is faulty", c.dut, err)
	}
	return g, nil
}

// WriteCertChain stores chain (DER, leaf first) on the DUT for the key it
// generated (WRITE CERT CHAIN, 0x11). Kinds: Unavailable, Invalid (an
// empty or too long chain, a leaf that is not for the DUT's key, no key
// generated, a chain that does not fit the DUT's frame limit).
func (c *Client) WriteCertChain(ctx context.Context, chain [][]byte) error {
	const op = "write DUT certificate chain"
	if len(chain) == 0 || len(chain) > MaxChain {
		return station.Errorf(op, station.KindInvalid, "a chain of %d certificates: write 1 to %d, leaf first", len(chain), MaxChain)
	}
	for i, der := range chain {
		if len(der) == 0 || len(der) > 0xFFFF {
			return station.Errorf(op, station.KindInvalid, "certificate %d of the chain is %d bytes: not a certificate", i+1, len(der))
		}
	}
	_, err := c.request(ctx, op, CmdWriteCertChain, EncodeCertChain(chain), c.cfg.ConfigTimeout, c.cfg.ConfigTimeout, nil)
	return err
}

// WriteSymmetricKey stores the DPS device key of registration ID regID on
// the DUT (WRITE SYMMETRIC KEY, 0x12). The key is never logged. Kinds:
// Unavailable, Invalid.
func (c *Client) WriteSymmetricKey(ctx context.Context, regID string, key []byte) error {
	const op = "write DUT symmetric key"
	if regID == "" || len(regID) > maxName {
		return station.Errorf(op, station.KindInvalid, "the registration ID must be 1–%d bytes; got %d", maxName, len(regID))
	}
	if len(key) < MinSymKey || len(key) > MaxSymKey {
		return station.Errorf(op, station.KindInvalid, "a %d-byte symmetric key: DPS device keys are %d–%d bytes (decode the base64 first)", len(key), MinSymKey, MaxSymKey)
	}
	_, err := c.request(ctx, op, CmdWriteSymKey, EncodeSymmetricKey(regID, key), c.cfg.ConfigTimeout, c.cfg.ConfigTimeout, nil)
	return err
}

// ReadIdentity reads back the identity the DUT holds (READ IDENTITY,
// 0x13): the chain, where its key is and the symmetric key's registration
// ID and fingerprint, never a secret. Kinds: Unavailable, Invalid (a
// malformed answer).
func (c *Client) ReadIdentity(ctx context.Context) (station.DeviceIdentity, error) {
	const op = "read DUT identity"
	f, err := c.request(ctx, op, CmdReadIdentity, nil, c.cfg.ConfigTimeout, c.cfg.ConfigTimeout, nil)
	if err != nil {
		return station.DeviceIdentity{}, err
	}
	id, err := DecodeIdentity(f.Payload)
	if err != nil {
		return station.DeviceIdentity{}, station.Errorf(op, station.KindInvalid, "%s: %v: the agent is faulty", c.dut, err)
	}
	return id, nil
}

// Identity is the device side of the identity commands: what an agent does
// when the station asks for a key and CSR, writes a chain or a symmetric
// key, or reads back what it holds. Errors travel to the station as error
// frames (kind and message). The Kinds are those of station.IdentityLink.
type Identity interface {
	GenerateKey(ctx context.Context, req station.KeyRequest) (station.GeneratedKey, error)
	WriteCertChain(ctx context.Context, chain [][]byte) error
	WriteSymmetricKey(ctx context.Context, regID string, key []byte) error
	ReadIdentity(ctx context.Context) (station.DeviceIdentity, error)
}

// AddIdentity makes Serve answer GENERATE KEY, WRITE CERT CHAIN, WRITE
// SYMMETRIC KEY and READ IDENTITY with id, adding them to cfg.Commands. A
// payload that does not decode is answered with an error of kind Invalid
// before id sees it.
func AddIdentity(cfg *ServeConfig, id Identity) {
	if cfg.Commands == nil {
		cfg.Commands = map[Command]HandlerFunc{}
	}
	disagree := func(cmd Command, err error) error {
		return station.Errorf(cmd.String(), station.KindInvalid, "%v: the station and agent disagree on %s; update both", err, cmd)
	}
	cfg.Commands[CmdKeyCSR] = func(ctx context.Context, p []byte) ([]byte, error) {
		req, err := DecodeKeyRequest(p)
		if err != nil {
			return nil, disagree(CmdKeyCSR, err)
		}
		g, err := id.GenerateKey(ctx, req)
		if err != nil {
			return nil, err
		}
		if g.Storage == "" || len(g.CSR) == 0 || len(g.CSR) > 0xFFFF {
			return nil, station.Errorf("generate key", station.KindInternal, "the agent made a key without a storage or a usable CSR")
		}
		return EncodeGeneratedKey(g), nil
	}
	cfg.Commands[CmdWriteCertChain] = func(ctx context.Context, p []byte) ([]byte, error) {
		chain, err := DecodeCertChain(p)
		if err != nil {
			return nil, disagree(CmdWriteCertChain, err)
		}
		return nil, id.WriteCertChain(ctx, chain)
	}
	cfg.Commands[CmdWriteSymKey] = func(ctx context.Context, p []byte) ([]byte, error) {
		regID, key, err := DecodeSymmetricKey(p)
		if err != nil {
			return nil, disagree(CmdWriteSymKey, err)
		}
		return nil, id.WriteSymmetricKey(ctx, regID, key)
	}
	cfg.Commands[CmdReadIdentity] = func(ctx context.Context, _ []byte) ([]byte, error) {
		v, err := id.ReadIdentity(ctx)
		if err != nil {
			return nil, err
		}
		return EncodeIdentity(v), nil
	}
}
