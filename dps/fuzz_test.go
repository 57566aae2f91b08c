package dps_test

import (
	"bytes"
	"encoding/json"
	"os"
	"testing"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// FuzzParseSAS feeds Authorization headers and MQTT passwords, as devices
// and service clients send them, to the parser and the verifier: no panic,
// every error Invalid (parse) or Unauthorized (verify), and a token that
// parses keeps its fields as sent.
func FuzzParseSAS(f *testing.F) {
	f.Add(dps.NewDeviceSAS("0ne00AB12CD", "device-1", sasKey, sasNow))
	f.Add(dps.NewServiceSAS("mydps.azure-devices-provisioning.net", "provisioningserviceowner", sasKey, sasNow))
	f.Add("SharedAccessSignature sig=AAAA&se=1&skn=registration&sr=a%2fb")
	f.Add("SharedAccessSignature sr=&sig=&se=&skn=")
	f.Fuzz(func(t *testing.T, token string) {
		s, err := dps.ParseSAS(token)
		if err != nil {
			if station.KindOf(err) != station.KindInvalid {
				t.Fatalf("parse error of kind %v: %v", station.KindOf(err), err)
			}
			return
		}
		if s.Resource == "" || s.Signature == "" || s.Expiry == "" {
			t.Fatalf("accepted a token without sr, sig or se: %+v", s)
		}
		err = s.Verify(sasKey, sasNow)
		if k := station.KindOf(err); err != nil && k != station.KindUnauthorized {
			t.Fatalf("verify error of kind %v: %v", k, err)
		}
		_ = s.DecodedResource()
		_ = s.MatchResource("0ne00AB12CD/registrations/device-1")
		_ = s.CoversResource("mydps.azure-devices-provisioning.net/enrollments/x")
	})
}

// FuzzParseActivationBlob feeds activation blobs, as a DPS server sends them
// in authenticationKey, to the device's parser: no panic, every error
// Invalid, and what parses marshals back to the bytes it was read from.
func FuzzParseActivationBlob(f *testing.F) {
	f.Add(newActivation(f).Blob)
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0, 34, 0, 32})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := hsm.ParseActivationBlob(b)
		if err != nil {
			if station.KindOf(err) != station.KindInvalid {
				t.Fatalf("error of kind %v: %v", station.KindOf(err), err)
			}
			return
		}
		m := a.Marshal()
		if !bytes.HasPrefix(b, m) {
			t.Fatalf("Marshal gives %x, not a prefix of the input %x", m, b)
		}
	})
}

// FuzzDecodeRegistration feeds register bodies to the model: no panic, and
// what decodes encodes.
func FuzzDecodeRegistration(f *testing.F) {
	for _, name := range []string{"device-registration-tpm.json", "poll-assigned-tpm.json", "enrollment-tpm.json"} {
		b, err := os.ReadFile("testdata/" + name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, v := range []any{new(dps.DeviceRegistration), new(dps.RegistrationOperationStatus), new(dps.IndividualEnrollment)} {
			if err := dps.Decode(b, v); err != nil {
				if station.KindOf(err) != station.KindInvalid {
					t.Fatalf("error of kind %v: %v", station.KindOf(err), err)
				}
				continue
			}
			if _, err := json.Marshal(v); err != nil {
				t.Fatalf("decoded %T does not encode: %v", v, err)
			}
		}
	})
}
