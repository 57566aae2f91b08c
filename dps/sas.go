package dps

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// sasPrefix starts every SAS token.
const sasPrefix = "SharedAccessSignature "

// A Signer computes HMAC-SHA256 over data with a device key: in memory
// (KeySigner) or inside a TPM (hsm.TPM.HMAC has this signature).
type Signer func(ctx context.Context, data []byte) ([]byte, error)

// KeySigner returns a Signer for a key held in memory.
func KeySigner(key []byte) Signer {
	key = append([]byte(nil), key...)
	return func(_ context.Context, data []byte) ([]byte, error) { return sign(key, data), nil }
}

func sign(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

// DecodeKey decodes a key as DPS and IoT Hub write them: standard base64.
// Kinds: Invalid (the message does not repeat the key).
func DecodeKey(s string) ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(k) == 0 {
		return nil, station.Errorf("decode key", station.KindInvalid,
			"the key is not base64 (%d characters): copy it again from the enrollment or connection string", len(s))
	}
	return k, nil
}

// EncodeKey encodes a key as DPS and IoT Hub write them: standard base64.
func EncodeKey(key []byte) string { return base64.StdEncoding.EncodeToString(key) }

// DeriveDeviceKey returns the key of a device in a symmetric-key enrollment
// group: HMAC-SHA256 keyed with the group key over the registration ID
// (§5.2). Encode it with EncodeKey for the device and the hub.
func DeriveDeviceKey(groupKey []byte, registrationID string) []byte {
	return sign(groupKey, []byte(registrationID))
}

// DeviceResource returns the resource a device's DPS token covers:
// {idScope}/registrations/{registrationId} (§4.7, §5.1), not encoded.
func DeviceResource(idScope, registrationID string) string {
	return idScope + "/registrations/" + registrationID
}

// HubDeviceResource returns the resource of a device's IoT Hub token:
// {hub}/devices/{deviceId} (§9), not encoded.
func HubDeviceResource(hub, deviceID string) string {
	return hub + "/devices/" + deviceID
}

// BuildSAS makes a SAS token for resource (not encoded) that expires at
// expiry: SharedAccessSignature sr=…&sig=…&se=…, with &skn=keyName when
// keyName is not empty. The resource is percent-encoded like JavaScript's
// encodeURIComponent (so / becomes %2F), and the signature is sign over the
// encoded resource, a newline and the expiry in Unix seconds.
// Kinds: those of sign.
func BuildSAS(ctx context.Context, resource string, expiry time.Time, keyName string, sign Signer) (string, error) {
	sr := escape(resource)
	se := strconv.FormatInt(expiry.Unix(), 10)
	sig, err := sign(ctx, []byte(sr+"\n"+se))
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(sasPrefix)
	b.WriteString("sr=")
	b.WriteString(sr)
	b.WriteString("&sig=")
	b.WriteString(escape(base64.StdEncoding.EncodeToString(sig)))
	b.WriteString("&se=")
	b.WriteString(se)
	if keyName != "" {
		b.WriteString("&skn=")
		b.WriteString(escape(keyName))
	}
	return b.String(), nil
}

// NewSAS is BuildSAS with a key held in memory.
func NewSAS(resource string, key []byte, expiry time.Time, keyName string) string {
	tok, _ := BuildSAS(context.Background(), resource, expiry, keyName, KeySigner(key))
	return tok
}

// NewDeviceSAS makes a device's DPS token: resource
// {idScope}/registrations/{registrationId}, key name "registration".
func NewDeviceSAS(idScope, registrationID string, key []byte, expiry time.Time) string {
	return NewSAS(DeviceResource(idScope, registrationID), key, expiry, RegistrationKeyName)
}

// NewServiceSAS makes a service API token for the DPS host name with the
// key of the shared access policy named policy (§7.5).
func NewServiceSAS(host, policy string, key []byte, expiry time.Time) string {
	return NewSAS(strings.ToLower(host), key, expiry, policy)
}

// escape percent-encodes s like encodeURIComponent: everything but
// A-Z a-z 0-9 - _ . ! ~ * ' ( ) becomes %XX.
func escape(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-_.!~*'()", c) >= 0 {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

// SAS is a parsed SAS token. Resource and Signature are kept exactly as they
// appear in the token, because the signature covers the encoded resource as
// the device encoded it (encoders differ: %2F, %2f).
type SAS struct {
	Resource  string // sr as sent: percent-encoded
	Signature string // sig as sent: percent-encoded base64
	Expiry    string // se as sent: Unix seconds in decimal
	KeyName   string // skn, decoded; empty when the token has none
	expiry    int64
}

// ParseSAS parses "SharedAccessSignature sr=…&sig=…&se=…[&skn=…]" with its
// fields in any order. sr, sig and se are required; unknown fields are
// ignored; a repeated field is an error. The signature is not checked: call
// Verify. Kinds: Invalid.
func ParseSAS(token string) (*SAS, error) {
	const op = "parse SAS token"
	rest, ok := strings.CutPrefix(strings.TrimSpace(token), sasPrefix)
	if !ok {
		return nil, station.Errorf(op, station.KindInvalid,
			`the token does not start with "SharedAccessSignature ": send a SAS token in the Authorization header or as the MQTT password`)
	}
	var s SAS
	seen := map[string]bool{}
	for part := range strings.SplitSeq(strings.TrimSpace(rest), "&") {
		k, v, _ := strings.Cut(part, "=")
		var dst *string
		switch k {
		case "sr":
			dst = &s.Resource
		case "sig":
			dst = &s.Signature
		case "se":
			dst = &s.Expiry
		case "skn":
			dst = &s.KeyName
		default:
			continue
		}
		if seen[k] {
			return nil, station.Errorf(op, station.KindInvalid, "the token has field %s twice", k)
		}
		seen[k] = true
		*dst = v
	}
	for _, k := range []string{"sr", "sig", "se"} {
		if !seen[k] {
			return nil, station.Errorf(op, station.KindInvalid, "the token has no %s field: it needs sr, sig and se", k)
		}
	}
	if s.Resource == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the token's resource (sr) is empty")
	}
	if _, err := url.PathUnescape(s.Resource); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the token's resource (sr) is not percent-encoded correctly")
	}
	if _, err := s.signature(); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	se, err := strconv.ParseInt(s.Expiry, 10, 64)
	if err != nil || se < 0 || s.Expiry[0] == '+' {
		return nil, station.Errorf(op, station.KindInvalid, "the token's expiry (se) %.24q is not a Unix time in seconds", s.Expiry)
	}
	s.expiry = se
	if s.KeyName != "" {
		kn, err := url.PathUnescape(s.KeyName)
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "the token's key name (skn) is not percent-encoded correctly")
		}
		s.KeyName = kn
	}
	return &s, nil
}

// signature decodes sig: percent-decoding, then base64.
func (s *SAS) signature() ([]byte, error) {
	v, err := url.PathUnescape(s.Signature)
	if err != nil {
		return nil, station.Errorf("", station.KindInvalid, "the token's signature (sig) is not percent-encoded correctly")
	}
	sig, err := base64.StdEncoding.DecodeString(v)
	if err != nil || len(sig) == 0 {
		return nil, station.Errorf("", station.KindInvalid, "the token's signature (sig) is not base64")
	}
	return sig, nil
}

// ExpiresAt returns the expiry of the token.
func (s *SAS) ExpiresAt() time.Time { return time.Unix(s.expiry, 0).UTC() }

// DecodedResource returns the token's resource percent-decoded.
func (s *SAS) DecodedResource() string {
	r, _ := url.PathUnescape(s.Resource) // checked by ParseSAS
	return r
}

// Verify checks the token's signature with key, HMAC-SHA256 over the
// resource exactly as sent, a newline and the expiry as sent, and that the
// token has not expired at now (pass the server's clock: time.Now() or a
// test's). It does not check the resource: see MatchResource and
// CoversResource. Kinds: Unauthorized (bad signature, expired), Invalid.
func (s *SAS) Verify(key []byte, now time.Time) error {
	const op = "verify SAS token"
	sig, err := s.signature()
	if err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	if len(key) == 0 {
		return station.Errorf(op, station.KindInvalid, "no key to verify with")
	}
	want := sign(key, []byte(s.Resource+"\n"+s.Expiry))
	if !hmac.Equal(sig, want) {
		return station.Errorf(op, station.KindUnauthorized,
			"the signature does not match the enrolled key: check the device key (or the group key it was derived from)")
	}
	if now.Unix() >= s.expiry {
		return station.Errorf(op, station.KindUnauthorized,
			"the token expired at %s (now %s): make a new token, and check the device's clock",
			s.ExpiresAt().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return nil
}

// MatchResource checks that the token's resource, percent-decoded, is
// resource, ignoring case (a device token: §4.7, §5.1).
// Kinds: Unauthorized.
func (s *SAS) MatchResource(resource string) error {
	if got := s.DecodedResource(); !strings.EqualFold(got, resource) {
		return station.Errorf("check SAS token", station.KindUnauthorized,
			"the token is for %q, not %q: sign a token for this registration", got, resource)
	}
	return nil
}

// CoversResource checks that the token's resource, percent-decoded, is
// resource or a prefix of it that ends at a path segment, ignoring case and
// a trailing slash (a service token scoped to a host or a path: §7.5).
// Kinds: Unauthorized.
func (s *SAS) CoversResource(resource string) error {
	got := strings.TrimSuffix(strings.ToLower(s.DecodedResource()), "/")
	want := strings.ToLower(resource)
	if got != "" && (want == got || strings.HasPrefix(want, got+"/")) {
		return nil
	}
	return station.Errorf("check SAS token", station.KindUnauthorized,
		"the token is for %q, which does not cover %q: sign a token for this host", got, resource)
}

// ConnectionString is a parsed DPS service or IoT Hub connection string:
// HostName=…;SharedAccessKeyName=…;SharedAccessKey=… (service), or
// HostName=…;DeviceId=…;SharedAccessKey=… (a hub device). Its String method
// hides the key.
type ConnectionString struct {
	HostName            string
	SharedAccessKeyName string // the policy of a service string
	DeviceID            string // the device of a hub device string
	Key                 []byte // the decoded SharedAccessKey
}

// ParseConnectionString parses a connection string: fields separated by ';'
// in any order, names matched ignoring case, values taken up to the next
// ';' (keys end in '='). HostName and SharedAccessKey are required; unknown
// fields are ignored. Kinds: Invalid (the message never contains the key).
func ParseConnectionString(s string) (*ConnectionString, error) {
	const op = "parse connection string"
	var c ConnectionString
	var key string
	seen := map[string]bool{}
	for part := range strings.SplitSeq(strings.TrimSpace(s), ";") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return nil, station.Errorf(op, station.KindInvalid,
				"a field has no '=': write HostName=…;SharedAccessKeyName=…;SharedAccessKey=…")
		}
		k = strings.ToLower(strings.TrimSpace(k))
		var dst *string
		switch k {
		case "hostname":
			dst = &c.HostName
		case "sharedaccesskeyname":
			dst = &c.SharedAccessKeyName
		case "deviceid":
			dst = &c.DeviceID
		case "sharedaccesskey":
			dst = &key
		default:
			continue
		}
		if seen[k] {
			return nil, station.Errorf(op, station.KindInvalid, "the connection string has %s twice", k)
		}
		seen[k] = true
		*dst = strings.TrimSpace(v)
	}
	if c.HostName == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the connection string has no HostName: copy it again from the portal")
	}
	if key == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the connection string has no SharedAccessKey: copy it again from the portal")
	}
	k, err := DecodeKey(key)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the SharedAccessKey is not base64: copy it again from the portal")
	}
	c.Key = k
	return &c, nil
}

// String returns the connection string with the key replaced by "***", for
// logs and messages.
func (c *ConnectionString) String() string {
	var b strings.Builder
	b.WriteString("HostName=" + c.HostName)
	if c.DeviceID != "" {
		b.WriteString(";DeviceId=" + c.DeviceID)
	}
	if c.SharedAccessKeyName != "" {
		b.WriteString(";SharedAccessKeyName=" + c.SharedAccessKeyName)
	}
	b.WriteString(";SharedAccessKey=***")
	return b.String()
}

// SAS makes a token from the connection string that expires at expiry: for
// a hub device string, one for {HostName}/devices/{DeviceId} without a key
// name; otherwise a service token for the host with the policy as key name.
func (c *ConnectionString) SAS(expiry time.Time) string {
	if c.DeviceID != "" {
		return NewSAS(HubDeviceResource(c.HostName, c.DeviceID), c.Key, expiry, c.SharedAccessKeyName)
	}
	return NewServiceSAS(c.HostName, c.SharedAccessKeyName, c.Key, expiry)
}
