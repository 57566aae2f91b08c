package dps_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

var (
	sasKey = []byte("0123456789abcdef0123456789abcdef")
	sasNow = time.Unix(1767225600, 0)
)

// signRaw signs a string to sign with sasKey, independently of dps.
func signRaw(s string) string {
	m := hmac.New(sha256.New, sasKey)
	m.Write([]byte(s))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

func urlEscapeB64(s string) string {
	return strings.NewReplacer("+", "%2B", "/", "%2F", "=", "%3D").Replace(s)
}

func TestNewDeviceSAS(t *testing.T) {
	got := dps.NewDeviceSAS("0ne00AB12CD", "device-1", sasKey, sasNow.Add(time.Hour))
	sr := "0ne00AB12CD%2Fregistrations%2Fdevice-1"
	want := "SharedAccessSignature sr=" + sr + "&sig=" + urlEscapeB64(signRaw(sr+"\n1767229200")) + "&se=1767229200&skn=registration"
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestParseSASAnyOrder(t *testing.T) {
	sr := "0ne00AB12CD%2Fregistrations%2Fdevice-1"
	sig := urlEscapeB64(signRaw(sr + "\n1767229200"))
	tokens := []string{
		"SharedAccessSignature sr=" + sr + "&sig=" + sig + "&se=1767229200&skn=registration",
		"SharedAccessSignature sig=" + sig + "&se=1767229200&skn=registration&sr=" + sr,
		"SharedAccessSignature se=1767229200&sr=" + sr + "&sig=" + sig + "&skn=registration&extra=1",
	}
	for _, tok := range tokens {
		s, err := dps.ParseSAS(tok)
		if err != nil {
			t.Errorf("ParseSAS(%s): %v", tok, err)
			continue
		}
		if s.Resource != sr || s.KeyName != "registration" || !s.ExpiresAt().Equal(sasNow.Add(time.Hour)) {
			t.Errorf("ParseSAS(%s) = %+v", tok, s)
		}
		if err := s.Verify(sasKey, sasNow); err != nil {
			t.Errorf("Verify(%s): %v", tok, err)
		}
		if err := s.MatchResource("0NE00AB12CD/registrations/DEVICE-1"); err != nil {
			t.Errorf("MatchResource ignoring case: %v", err)
		}
	}
}

// The signature covers sr as sent: Embedded C writes a lower-case %2f.
func TestVerifyRawResource(t *testing.T) {
	sr := "0ne00AB12CD%2fregistrations%2fdevice-1"
	tok := "SharedAccessSignature sr=" + sr + "&sig=" + urlEscapeB64(signRaw(sr+"\n1767229200")) + "&se=1767229200&skn=registration"
	s, err := dps.ParseSAS(tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(sasKey, sasNow); err != nil {
		t.Errorf("lower-case %%2f: %v", err)
	}
	if got := s.DecodedResource(); got != "0ne00AB12CD/registrations/device-1" {
		t.Errorf("DecodedResource() = %q", got)
	}
	// The same token with the resource re-encoded upper case must fail.
	up := strings.Replace(tok, "%2f", "%2F", 2)
	s, err = dps.ParseSAS(up)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(sasKey, sasNow); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("re-encoded resource verified: %v", err)
	}
}

func TestVerifyRefuses(t *testing.T) {
	tok := dps.NewDeviceSAS("scope", "device-1", sasKey, sasNow.Add(time.Minute))
	s, err := dps.ParseSAS(tok)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		key  []byte
		now  time.Time
	}{
		{"other key", []byte("another key, also 32 bytes long."), sasNow},
		{"expired", sasKey, sasNow.Add(time.Minute)},
		{"long expired", sasKey, sasNow.Add(48 * time.Hour)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Verify(tt.key, tt.now)
			if station.KindOf(err) != station.KindUnauthorized {
				t.Fatalf("error %v, want Unauthorized", err)
			}
			msg := err.Error()
			for _, secret := range []string{s.Signature, dps.EncodeKey(tt.key), string(tt.key)} {
				if strings.Contains(msg, secret) {
					t.Errorf("the error shows a secret: %s", msg)
				}
			}
		})
	}
	// A changed expiry breaks the signature.
	s2, err := dps.ParseSAS(strings.Replace(tok, "se=1767225660", "se=1767229999", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Verify(sasKey, sasNow); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("extended expiry verified: %v", err)
	}
	if err := s.MatchResource("scope/registrations/device-2"); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("other registration matched: %v", err)
	}
	if err := s.Verify(nil, sasNow); station.KindOf(err) != station.KindInvalid {
		t.Errorf("no key: %v", err)
	}
}

func TestParseSASInvalid(t *testing.T) {
	ok := "sig=AAAA&se=1"
	tests := map[string]string{
		"empty":            "",
		"bearer":           "Bearer abc",
		"no fields":        "SharedAccessSignature ",
		"no sr":            "SharedAccessSignature " + ok,
		"no sig":           "SharedAccessSignature sr=a&se=1",
		"no se":            "SharedAccessSignature sr=a&sig=AAAA",
		"empty sr":         "SharedAccessSignature sr=&" + ok,
		"twice sr":         "SharedAccessSignature sr=a&sr=b&" + ok,
		"se not a number":  "SharedAccessSignature sr=a&sig=AAAA&se=soon",
		"se negative":      "SharedAccessSignature sr=a&sig=AAAA&se=-5",
		"se plus":          "SharedAccessSignature sr=a&sig=AAAA&se=+5",
		"sig not base64":   "SharedAccessSignature sr=a&sig=!!!&se=1",
		"sig bad escape":   "SharedAccessSignature sr=a&sig=%zz&se=1",
		"sr bad escape":    "SharedAccessSignature sr=%G1&" + ok,
		"skn bad escape":   "SharedAccessSignature sr=a&" + ok + "&skn=%",
		"empty signature":  "SharedAccessSignature sr=a&sig=&se=1",
		"lower-case label": "sharedaccesssignature sr=a&" + ok,
	}
	for name, tok := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := dps.ParseSAS(tok); station.KindOf(err) != station.KindInvalid {
				t.Errorf("ParseSAS(%q) error %v, want Invalid", tok, err)
			}
		})
	}
}

func TestCoversResource(t *testing.T) {
	tests := []struct {
		sr, resource string
		want         bool
	}{
		{"mydps.azure-devices-provisioning.net", "mydps.azure-devices-provisioning.net", true},
		{"mydps.azure-devices-provisioning.net", "MyDPS.azure-devices-provisioning.net/enrollments/d1", true},
		{"mydps.azure-devices-provisioning.net%2Fenrollments", "mydps.azure-devices-provisioning.net/enrollments/d1", true},
		{"mydps.azure-devices-provisioning.net%2Fenrollments%2F", "mydps.azure-devices-provisioning.net/enrollments/d1", true},
		{"mydps.azure-devices-provisioning.net%2Fenrollments", "mydps.azure-devices-provisioning.net/enrollmentGroups/g", false},
		{"mydps.azure-devices-provisioning.net", "mydps.azure-devices-provisioning.network/x", false},
		{"other.azure-devices-provisioning.net", "mydps.azure-devices-provisioning.net", false},
	}
	for _, tt := range tests {
		s, err := dps.ParseSAS("SharedAccessSignature sr=" + tt.sr + "&sig=AAAA&se=1&skn=p")
		if err != nil {
			t.Fatal(err)
		}
		err = s.CoversResource(tt.resource)
		if (err == nil) != tt.want {
			t.Errorf("sr %s covers %s: %v, want %v", tt.sr, tt.resource, err, tt.want)
		}
		if err != nil && station.KindOf(err) != station.KindUnauthorized {
			t.Errorf("kind %v, want Unauthorized", station.KindOf(err))
		}
	}
}

func TestBuildSASSignerError(t *testing.T) {
	boom := errors.New("TPM gone")
	_, err := dps.BuildSAS(context.Background(), "r", sasNow, "", func(context.Context, []byte) ([]byte, error) { return nil, boom })
	if !errors.Is(err, boom) {
		t.Errorf("error %v, want the signer's", err)
	}
	tok, err := dps.BuildSAS(context.Background(), "hub.azure-devices.net/devices/d 1", sasNow, "", dps.KeySigner(sasKey))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(tok, "skn=") || !strings.Contains(tok, "sr=hub.azure-devices.net%2Fdevices%2Fd%201&") {
		t.Errorf("hub token %s: want no skn and an encoded resource", tok)
	}
}

func TestDeriveDeviceKey(t *testing.T) {
	group := []byte("group key of the line, 32 bytes!")
	m := hmac.New(sha256.New, group)
	m.Write([]byte("device-1"))
	if got := dps.DeriveDeviceKey(group, "device-1"); !bytes.Equal(got, m.Sum(nil)) {
		t.Error("derived key is not HMAC-SHA256(group key, registration ID)")
	}
	if bytes.Equal(dps.DeriveDeviceKey(group, "device-1"), dps.DeriveDeviceKey(group, "device-2")) {
		t.Error("two devices derive the same key")
	}
}

func TestDecodeKey(t *testing.T) {
	if k, err := dps.DecodeKey(dps.EncodeKey(sasKey)); err != nil || !bytes.Equal(k, sasKey) {
		t.Errorf("round trip: %v", err)
	}
	for _, s := range []string{"", "not base64!", "QUJD="} {
		if _, err := dps.DecodeKey(s); station.KindOf(err) != station.KindInvalid {
			t.Errorf("DecodeKey(%q) error %v, want Invalid", s, err)
		}
	}
}

func TestParseConnectionString(t *testing.T) {
	key := dps.EncodeKey(sasKey)
	tests := []struct {
		in   string
		want dps.ConnectionString
	}{
		{"HostName=mydps.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=" + key,
			dps.ConnectionString{HostName: "mydps.azure-devices-provisioning.net", SharedAccessKeyName: "provisioningserviceowner", Key: sasKey}},
		{"sharedaccesskey=" + key + "; hostname=hub.azure-devices.net ;DeviceId=kiln-1;GatewayHostName=gw;",
			dps.ConnectionString{HostName: "hub.azure-devices.net", DeviceID: "kiln-1", Key: sasKey}},
	}
	for _, tt := range tests {
		got, err := dps.ParseConnectionString(tt.in)
		if err != nil {
			t.Errorf("ParseConnectionString: %v", err)
			continue
		}
		if got.HostName != tt.want.HostName || got.SharedAccessKeyName != tt.want.SharedAccessKeyName ||
			got.DeviceID != tt.want.DeviceID || !bytes.Equal(got.Key, tt.want.Key) {
			t.Errorf("got %+v, want %+v", got, tt.want)
		}
		if s := got.String(); strings.Contains(s, key) || !strings.Contains(s, "SharedAccessKey=***") {
			t.Errorf("String() = %s: the key must be hidden", s)
		}
	}
	bad := []string{
		"",
		"HostName=h",
		"SharedAccessKey=" + key,
		"HostName=h;SharedAccessKey=!!!secret!!!",
		"HostName=h;HostName=i;SharedAccessKey=" + key,
		"HostName=h;garbage;SharedAccessKey=" + key,
	}
	for _, in := range bad {
		_, err := dps.ParseConnectionString(in)
		if station.KindOf(err) != station.KindInvalid {
			t.Errorf("ParseConnectionString(%q) error %v, want Invalid", in, err)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("the error shows the key: %v", err)
		}
	}
}

func TestConnectionStringSAS(t *testing.T) {
	c, err := dps.ParseConnectionString("HostName=MyDPS.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=" + dps.EncodeKey(sasKey))
	if err != nil {
		t.Fatal(err)
	}
	s, err := dps.ParseSAS(c.SAS(sasNow.Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if s.KeyName != "provisioningserviceowner" || s.Resource != "mydps.azure-devices-provisioning.net" {
		t.Errorf("service token has skn %q, sr %q", s.KeyName, s.Resource)
	}
	if err := s.Verify(sasKey, sasNow); err != nil {
		t.Error(err)
	}
	if err := s.CoversResource("mydps.azure-devices-provisioning.net/enrollments/device-1"); err != nil {
		t.Error(err)
	}

	hub, err := dps.ParseConnectionString("HostName=hub.azure-devices.net;DeviceId=kiln-1;SharedAccessKey=" + dps.EncodeKey(sasKey))
	if err != nil {
		t.Fatal(err)
	}
	s, err = dps.ParseSAS(hub.SAS(sasNow.Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if s.KeyName != "" || s.MatchResource("hub.azure-devices.net/devices/kiln-1") != nil || s.Verify(sasKey, sasNow) != nil {
		t.Errorf("hub device token %+v", s)
	}
}

func TestNormalizeRegistrationID(t *testing.T) {
	got, err := dps.NormalizeRegistrationID("Device-01.Line:3")
	if err != nil || got != "device-01.line:3" {
		t.Errorf("got %q, %v; want device-01.line:3", got, err)
	}
	for _, id := range []string{"", "a b", "dev/1", "dev.", strings.Repeat("a", 129)} {
		if _, err := dps.NormalizeRegistrationID(id); station.KindOf(err) != station.KindInvalid {
			t.Errorf("NormalizeRegistrationID(%q) error %v, want Invalid", id, err)
		}
	}
}

func TestNewOperationID(t *testing.T) {
	re := regexp.MustCompile(`^4\.[0-9a-f]{16}\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 100 {
		id, err := dps.NewOperationID(nil)
		if err != nil {
			t.Fatal(err)
		}
		if !re.MatchString(id) {
			t.Fatalf("operation ID %q is not 4.<16 hex>.<UUID v4>", id)
		}
		if seen[id] {
			t.Fatalf("operation ID %q twice", id)
		}
		seen[id] = true
	}
	if _, err := dps.NewOperationID(bytes.NewReader(nil)); station.KindOf(err) != station.KindInternal {
		t.Errorf("without randomness: %v, want Internal", err)
	}
}
