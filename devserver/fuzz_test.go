package devserver_test

import (
	"strings"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/station"
)

// FuzzDecodeDeviceRegistration feeds register bodies as devices send them
// (seeds in testdata/fuzz): the decoder never panics, refuses with
// KindInvalid only, and never lets a body's registrationId differ from the
// URL's.
func FuzzDecodeDeviceRegistration(f *testing.F) {
	f.Add([]byte(`{"registrationId":"unit-1","tpm":{"endorsementKey":"AToAAQALAAMAsgAg","storageRootKey":"ARgAAQALAAMAcgAA"}}`), "unit-1")
	f.Add([]byte(""), "unit-1")
	f.Add([]byte(" "), "unit-1")
	f.Add([]byte(`{}`), "x")
	f.Add([]byte(`{"registrationId":"UNIT-1","payload":{"a":[1,2,{"b":null}]}}`), "unit-1")
	f.Add([]byte(`{"registrationId":"other"}`), "unit-1")
	f.Add([]byte(`{"registrationId":"unit-1"} trailing`), "unit-1")
	f.Fuzz(func(t *testing.T, body []byte, regID string) {
		reg, err := devserver.DecodeDeviceRegistration(body, regID)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		if reg.RegistrationID != "" && !strings.EqualFold(reg.RegistrationID, regID) {
			t.Fatalf("accepted body registrationId %q for URL %q", reg.RegistrationID, regID)
		}
	})
}

// FuzzDecodeEnrollment feeds service API enrollment bodies: no panic,
// KindInvalid only, and an accepted enrollment is for the URL's ID with a
// known attestation type and provisioning status.
func FuzzDecodeEnrollment(f *testing.F) {
	f.Add([]byte(`{"registrationId":"u1","attestation":{"type":"tpm","tpm":{"endorsementKey":"AToAAQALAAMAsgAg"}}}`), "u1")
	f.Add([]byte(`{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"AAAAAAAAAAAAAAAAAAAAAA=="}},"provisioningStatus":"Disabled"}`), "u2")
	f.Add([]byte(`{"attestation":{"type":"x509","x509":{}},"allocationPolicy":"static","iotHubs":["h"]}`), "u3")
	f.Add([]byte(`{"registrationState":{"status":"assigned"},"initialTwin":{"properties":{"desired":{"a":1}}}}`), "u4")
	f.Fuzz(func(t *testing.T, body []byte, regID string) {
		e, err := devserver.DecodeEnrollment(body, regID)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		if !strings.EqualFold(e.RegistrationID, regID) || e.RegistrationState != nil {
			t.Fatalf("accepted %+v for URL %q", e, regID)
		}
		switch e.Attestation.Type {
		case "tpm", "symmetricKey", "x509":
		default:
			t.Fatalf("accepted attestation type %q", e.Attestation.Type)
		}
		if e.ProvisioningStatus != "enabled" && e.ProvisioningStatus != "disabled" {
			t.Fatalf("accepted provisioningStatus %q", e.ProvisioningStatus)
		}
	})
}
