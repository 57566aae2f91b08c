package dps_test

import (
	"encoding/base64"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// serviceEnv is Kiln's devserver behind a real TLS listener, and a service
// client made from its connection string.
func serviceEnv(t *testing.T) (*dps.ServiceClient, *devserver.Server, *httptest.Server) {
	t.Helper()
	srv, err := devserver.New(devserver.Config{DataDir: t.TempDir(), HostName: "kiln-test.azure-devices-provisioning.net"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	ts := httptest.NewTLSServer(srv.Handler())
	t.Cleanup(ts.Close)
	c, err := dps.NewServiceClient(srv.ServiceConnectionString(), dps.ServiceOptions{HTTP: ts.Client(), BaseURL: ts.URL})
	if err != nil {
		t.Fatal(err)
	}
	return c, srv, ts
}

func TestServiceClientEnrollments(t *testing.T) {
	c, _, _ := serviceEnv(t)
	ctx := t.Context()
	ek := base64.StdEncoding.EncodeToString(testEK(t))
	in := &dps.IndividualEnrollment{
		RegistrationID:     "sn-000001",
		Attestation:        dps.AttestationMechanism{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: ek}},
		ProvisioningStatus: "enabled",
	}
	created, err := c.PutEnrollment(ctx, in, "")
	if err != nil {
		t.Fatal(err)
	}
	if created.ETag == "" || created.CreatedDateTimeUTC.IsZero() || created.Attestation.Type != dps.AttestationTPM {
		t.Errorf("created enrollment lacks service fields: %+v", created)
	}
	got, err := c.GetEnrollment(ctx, "SN-000001") // registration IDs are case-insensitive
	if err != nil {
		t.Fatal(err)
	}
	if got.RegistrationID != "sn-000001" || got.ETag != created.ETag {
		t.Errorf("get: %q etag %q, want sn-000001 etag %q", got.RegistrationID, got.ETag, created.ETag)
	}

	// A stale ETag is a conflict; the right one replaces.
	in.ProvisioningStatus = "disabled"
	if _, err := c.PutEnrollment(ctx, in, `"stale"`); station.KindOf(err) != station.KindConflict {
		t.Errorf("put with a stale If-Match: %v, want a Conflict", err)
	}
	updated, err := c.PutEnrollment(ctx, in, created.ETag)
	if err != nil {
		t.Fatal(err)
	}
	if updated.ProvisioningStatus != "disabled" || updated.ETag == created.ETag {
		t.Errorf("update: status %q etag %q (was %q)", updated.ProvisioningStatus, updated.ETag, created.ETag)
	}

	if _, err := c.RegistrationState(ctx, "sn-000001"); station.KindOf(err) != station.KindNotFound {
		t.Errorf("registration state of a device that never registered: %v, want NotFound", err)
	}
	if err := c.DeleteEnrollment(ctx, "sn-000001", ""); err != nil {
		t.Fatal(err)
	}
	_, err = c.GetEnrollment(ctx, "sn-000001")
	if station.KindOf(err) != station.KindNotFound || !strings.Contains(err.Error(), "404") {
		t.Errorf("get after delete: %v, want NotFound carrying the DPS error", err)
	}
}

func TestServiceClientRefused(t *testing.T) {
	_, srv, ts := serviceEnv(t)
	cs, err := dps.ParseConnectionString(srv.ServiceConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	wrong := "HostName=" + cs.HostName + ";SharedAccessKeyName=" + cs.SharedAccessKeyName +
		";SharedAccessKey=" + base64.StdEncoding.EncodeToString([]byte("not the policy's key, 32 bytes.."))
	bad, err := dps.NewServiceClient(wrong, dps.ServiceOptions{HTTP: ts.Client(), BaseURL: ts.URL})
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.GetEnrollment(t.Context(), "sn-1")
	if station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("a wrong key: %v, want Unauthorized", err)
	}
	if strings.Contains(err.Error(), "sig=") {
		t.Errorf("the error leaks the SAS: %v", err)
	}
	if _, err := dps.NewServiceClient("HostName=h;DeviceId=d;SharedAccessKey=AAAA", dps.ServiceOptions{}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a device connection string: %v, want Invalid", err)
	}
}

// testEK returns the EK TPM2B_PUBLIC of a fresh simulated TPM.
func testEK(t *testing.T) []byte {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	ek, err := hsm.New(sim).EK(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return ek.Public
}
