package agent_test

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/agent"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

func TestProvisionWithoutTPM(t *testing.T) {
	a, err := agent.New(agent.Config{Info: station.DeviceInfo{Serial: "SN-1"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.WriteConfig(t.Context(), goodConfig); err != nil {
		t.Fatal(err)
	}
	_, err = a.Provision(t.Context(), nil)
	if k := station.KindOf(err); k != station.KindNotFound || !strings.Contains(err.Error(), "--tpm") {
		t.Errorf("Provision without a TPM = kind %v (%v), want not found telling to start with --tpm", k, err)
	}
}

func TestProvisionWithoutConfig(t *testing.T) {
	a, err := agent.New(agent.Config{TPM: &fakeTPM{}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.Provision(t.Context(), nil)
	if k := station.KindOf(err); k != station.KindNotFound || !strings.Contains(err.Error(), "WRITE CONFIG") {
		t.Errorf("Provision without config = kind %v (%v), want not found naming WRITE CONFIG", k, err)
	}
	if err := a.WriteConfig(t.Context(), station.DeviceConfig{IDScope: "s"}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("WriteConfig of an incomplete config = %v, want Invalid", err)
	}
}

// TestProvisionEndToEnd is the whole chain: the station's link client on a
// pty writes the config to a simulated DUT (the agent with a simulator
// TPM), tells it to provision, and the DUT registers with the real
// devserver by TPM attestation, connects to its embedded hub with the
// TPM-held key and sends telemetry that the hub records.
func TestProvisionEndToEnd(t *testing.T) {
	env := startDevserver(t)
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	if err := fixtures.Manufacture(ctx, sim, nil); err != nil {
		t.Fatal(err)
	}
	dut, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{
		Info:     station.DeviceInfo{Serial: "SN-E2E-1", Model: "Widget", Firmware: "1.0"},
		TPM:      sim,
		LineRate: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dut.Close() })
	c, err := link.Open(ctx, dut.Path(), link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// The station reads the EK through passthrough and enrolls the unit.
	e, err := hsm.Endorser{}.Endorsement(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	regID := station.RegistrationIDFromEK(e.EKPublic)
	env.enroll(t, regID, e.EKPublic)

	cfg := station.DeviceConfig{IDScope: env.dps.IDScope(), GlobalEndpoint: env.dps.Addr(), RegistrationID: regID, TrustBundle: env.pem}
	if err := c.WriteConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if got, err := c.ReadConfig(ctx); err != nil || got != cfg {
		t.Fatalf("ReadConfig = %+v, %v; want what was written", got, err)
	}
	var stages []string
	rep, err := c.ProvisionNow(ctx, func(p station.ProvisionProgress) { stages = append(stages, p.Stage) })
	if err != nil {
		t.Fatalf("ProvisionNow: %v (stages %v)", err, stages)
	}
	if rep.Status != dps.StatusAssigned || rep.AssignedHub != env.hubName || rep.DeviceID == "" || rep.MessageID == "" || rep.TelemetrySent.IsZero() {
		t.Fatalf("report = %+v, want assigned to %s with telemetry sent", rep, env.hubName)
	}
	want := []string{link.StageStart, "register", "challenge", "activated", "assigned", "hub-connect", "hub-connected", "telemetry"}
	if got := slices.DeleteFunc(slices.Clone(stages), func(s string) bool { return s == "assigning" }); !slices.Equal(got, want) {
		t.Errorf("stages = %v, want %v with any number of assigning", stages, want)
	}
	tel, err := env.hub.WaitTelemetry(ctx, rep.AssignedHub, rep.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if tel.Properties["$.mid"] != rep.MessageID {
		t.Errorf("hub recorded message %q, report says %q", tel.Properties["$.mid"], rep.MessageID)
	}
	var body map[string]string
	if err := json.Unmarshal(tel.Body, &body); err != nil || body["serial"] != "SN-E2E-1" || body["kiln"] != "end-to-end check" {
		t.Errorf("hub recorded body %s (%v)", tel.Body, err)
	}
	// Passthrough still works after provisioning (the TPM lock was released).
	if _, err := (hsm.Endorser{}).Endorsement(ctx, c); err != nil {
		t.Errorf("TPM passthrough after provisioning: %v", err)
	}
}

// devEnv is a running devserver with its embedded hub, certificates from a
// throwaway CA.
type devEnv struct {
	emb     *devserver.Embedded
	dps     *devserver.Server
	hub     *devserver.Hub
	hubName string
	roots   *x509.CertPool
	pem     string
}

func startDevserver(t *testing.T) *devEnv {
	t.Helper()
	emb, err := devserver.StartEmbedded(t.Context(), devserver.EmbeddedConfig{DataDir: t.TempDir(), RetryAfter: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	env := &devEnv{emb: emb, dps: emb.DPS, hub: emb.Hub, hubName: emb.Hub.Addr(), roots: x509.NewCertPool(), pem: string(emb.TrustPEM)}
	if !env.roots.AppendCertsFromPEM(emb.TrustPEM) {
		t.Fatal("the embedded DPS's trust bundle holds no certificate")
	}
	return env
}

// enroll creates an individual TPM enrollment through the service API.
func (env *devEnv) enroll(t *testing.T, regID string, ekPublic []byte) {
	t.Helper()
	svc, err := env.emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.PutEnrollment(t.Context(), dps.NewTPMEnrollment(regID, ekPublic), ""); err != nil {
		t.Fatal(err)
	}
}
