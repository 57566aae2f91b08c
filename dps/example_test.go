package dps_test

import (
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"log"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/hsm"
)

// A symmetric-key device signs a DPS token with its key; the server parses
// it, checks the signature and the expiry, and that it names the
// registration in the URL.
func ExampleNewDeviceSAS() {
	key, err := dps.DecodeKey("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
	if err != nil {
		log.Fatal(err)
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	token := dps.NewDeviceSAS("0ne00AB12CD", "device-1", key, now.Add(time.Hour))

	sas, err := dps.ParseSAS(token)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("resource:", sas.DecodedResource())
	fmt.Println("key name:", sas.KeyName)
	fmt.Println("expires:", sas.ExpiresAt())
	fmt.Println("valid now:", sas.Verify(key, now) == nil)
	fmt.Println("valid in two hours:", sas.Verify(key, now.Add(2*time.Hour)) == nil)
	fmt.Println("for device-1:", sas.MatchResource(dps.DeviceResource("0ne00AB12CD", "device-1")) == nil)
	// Output:
	// resource: 0ne00AB12CD/registrations/device-1
	// key name: registration
	// expires: 2026-01-01 01:00:00 +0000 UTC
	// valid now: true
	// valid in two hours: false
	// for device-1: true
}

// A device in a symmetric-key enrollment group gets its own key, derived
// from the group key and its registration ID.
func ExampleDeriveDeviceKey() {
	group, err := dps.DecodeKey("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(dps.EncodeKey(dps.DeriveDeviceKey(group, "device-1")))
	// Output:
	// RMt/vH6618dIqXOfPQmgeanMrOxw2/w49k23Foj+FWg=
}

// A service client reads its connection string and signs its requests.
func ExampleParseConnectionString() {
	c, err := dps.ParseConnectionString("HostName=mydps.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(c) // the key stays hidden
	sas, err := dps.ParseSAS(c.SAS(time.Now().Add(time.Hour)))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(sas.Resource, sas.KeyName)
	// Output:
	// HostName=mydps.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=***
	// mydps.azure-devices-provisioning.net provisioningserviceowner
}

// A server answers a TPM device's first register with a challenge carrying
// an activation blob for the device's EK and SRK, and keeps the key to
// verify the device's tokens with. (The EK and SRK are made in software
// here; hsm's ExampleTPM_ActivateDPS runs the device side in a TPM.)
func ExampleNewActivation() {
	public := func(template tpm2.TPMTPublic) []byte {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			log.Fatal(err)
		}
		template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
		return tpm2.Marshal(tpm2.New2B(template))
	}
	ek, srk := public(tpm2.RSAEKTemplate), public(tpm2.RSASRKTemplate)

	act, err := dps.NewActivation(nil, ek, srk)
	if err != nil {
		log.Fatal(err)
	}
	challenge := dps.NewTPMChallenge(act.AuthenticationKey())
	fmt.Println(challenge.Message)
	fmt.Println("key bytes:", len(act.Key))

	blob, err := hsm.ParseActivationBlob(act.Blob)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("credential, seed, duplicate, seed, public, data:",
		len(blob.Credential), len(blob.CredentialSeed), len(blob.Duplicate), len(blob.DuplicateSeed), len(blob.Public), len(blob.Data))
	// Output:
	// Authorization required, resend request using supplied key
	// key bytes: 32
	// credential, seed, duplicate, seed, public, data: 52 256 142 256 48 0
}
