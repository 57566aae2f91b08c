package devserver_test

import (
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// TestTPMDeviceReachesHub registers a TPM device on the simulator through
// DPS and then connects it to the embedded hub, which asks the DPS Server
// (its DeviceDirectory) who the device is: the hub token is signed inside
// the TPM with the key of the final activation blob.
func TestTPMDeviceReachesHub(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	dev := newSimDevice(t)
	const regID = "kiln-unit-hub"
	e.enroll(t, regID, dev.ek)
	reg := e.register(ctx, t, regID, dev)
	if st := reg.final.RegistrationState; reg.final.Status != "assigned" || st.AssignedHub != hubA {
		t.Fatalf("registration: %s", reg.finalRaw)
	}

	h := startHub(t, func(c *devserver.HubConfig) {
		c.Directory = e.srv
		c.Now = time.Now
	})
	pass, err := dps.BuildSAS(ctx, dps.HubDeviceResource(hubA, regID), time.Now().Add(time.Hour), "", dev.sign)
	if err != nil {
		t.Fatal(err)
	}
	c := h.mustDial(t, dialer{id: regID, username: hubUsername(hubA, regID), password: pass})
	wait(t, c.Publish("devices/"+regID+"/messages/events/", 1, false, []byte(`{"t":21.5}`)))
	got, err := h.hub.WaitTelemetry(ctx, hubA, regID)
	if err != nil {
		t.Fatal(err)
	}
	if string(got.Body) != `{"t":21.5}` {
		t.Errorf("telemetry %q", got.Body)
	}
}
