package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

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

// startStation starts a simulated DUT on a pty (with tpm, or without a TPM
// when tpm is nil) and opens the station's link to it.
func startStation(t *testing.T, ctx context.Context, serial string, tpm transport.TPM) *link.Client {
	t.Helper()
	dut, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{
		Info:     station.DeviceInfo{Serial: serial, Model: "Widget", Firmware: "1.0"},
		TPM:      tpm,
		DataDir:  t.TempDir(),
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
	return c
}

// provisionAndCheck writes cfg, provisions and checks that the hub
// recorded the DUT's telemetry; it returns the stages reported.
func (env *devEnv) provisionAndCheck(t *testing.T, ctx context.Context, c *link.Client, cfg station.DeviceConfig, serial string) []string {
	t.Helper()
	if err := c.WriteConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	var stages []string
	rep, err := c.ProvisionNow(ctx, func(p station.ProvisionProgress) { stages = append(stages, p.Stage) })
	if err != nil {
		t.Fatalf("ProvisionNow: %v (stages %v)", err, stages)
	}
	if rep.Status != dps.StatusAssigned || rep.AssignedHub != env.hubName || rep.DeviceID == "" || rep.MessageID == "" {
		t.Fatalf("report = %+v, want assigned to %s with telemetry sent", rep, env.hubName)
	}
	tel, err := env.hub.WaitTelemetry(ctx, rep.AssignedHub, rep.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	var body map[string]string
	if tel.Properties["$.mid"] != rep.MessageID || json.Unmarshal(tel.Body, &body) != nil || body["serial"] != serial {
		t.Errorf("hub recorded %s with properties %v; report says message %s", tel.Body, tel.Properties, rep.MessageID)
	}
	return slices.DeleteFunc(stages, func(s string) bool { return s == "assigning" })
}

// TestProvisionX509EndToEnd: the station has the DUT generate a key (in
// its TPM, or in software without one), signs a leaf from the CSR with a
// test CA, writes the chain back, enrolls the leaf by its thumbprint and
// tells the DUT to provision: it registers with the devserver by X.509,
// presenting the chain with the key it holds, and sends telemetry to the
// hub over MQTT/TLS with the same client certificate.
func TestProvisionX509EndToEnd(t *testing.T) {
	for _, tc := range []struct {
		name    string
		withTPM bool
		keyType string
	}{
		{"tpm", true, ""},
		{"tpm-rsa", true, hsm.KeyRSA2048}, // TLS 1.3 signs RSA-PSS inside the TPM
		{"software", false, ""},
	} {
		name, withTPM := tc.name, tc.withTPM
		t.Run(name, func(t *testing.T) {
			env := startDevserver(t)
			ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
			defer cancel()
			var tpm *recTPM
			var tr transport.TPM
			if withTPM {
				tpm = openSimTPM(t)
				tr = tpm
			}
			serial := "SN-X509-" + name
			c := startStation(t, ctx, serial, tr)
			regID := "x509-" + name + "-1"
			g, err := c.GenerateKey(ctx, station.KeyRequest{CommonName: regID, Type: tc.keyType})
			if err != nil {
				t.Fatal(err)
			}
			if want := map[bool]station.KeyStorage{true: station.KeyInTPM, false: station.KeyInSoftware}[withTPM]; g.Storage != want {
				t.Fatalf("storage %q, want %q", g.Storage, want)
			}
			ca := newCA(t, "x509 e2e root")
			inter, err := ca.NewIntermediate("x509 e2e intermediate")
			if err != nil {
				t.Fatal(err)
			}
			leaf := issue(t, inter, g.CSR)
			if _, isRSA := leaf.PublicKey.(*rsa.PublicKey); isRSA != (tc.keyType == hsm.KeyRSA2048) {
				t.Fatalf("asked for a %q key, got a %T", tc.keyType, leaf.PublicKey)
			}
			if err := c.WriteCertChain(ctx, [][]byte{leaf.Raw, inter.Cert.Raw}); err != nil {
				t.Fatal(err)
			}
			id, err := c.ReadIdentity(ctx)
			if err != nil || len(id.CertChain) != 2 || !bytes.Equal(id.CertChain[0], leaf.Raw) {
				t.Fatalf("ReadIdentity = %+v, %v", id, err)
			}
			thumb := sha256.Sum256(leaf.Raw)
			svc, err := env.emb.ServiceClient()
			if err != nil {
				t.Fatal(err)
			}
			en := &dps.IndividualEnrollment{
				RegistrationID:     regID,
				ProvisioningStatus: "enabled",
				Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
					ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{
						Info: &dps.X509CertificateInfo{SHA256Thumbprint: strings.ToUpper(hex.EncodeToString(thumb[:]))}}},
				}},
			}
			if _, err := svc.PutEnrollment(ctx, en, ""); err != nil {
				t.Fatal(err)
			}
			signsBefore := 0
			if tpm != nil {
				signsBefore = tpm.count(tpm2.TPMCCSign)
			}
			cfg := station.DeviceConfig{IDScope: env.dps.IDScope(), GlobalEndpoint: env.dps.Addr(), RegistrationID: regID, Method: station.MethodX509, TrustBundle: env.pem}
			stages := env.provisionAndCheck(t, ctx, c, cfg, serial)
			want := []string{link.StageStart, "register", "assigned", "hub-connect", "hub-connected", "telemetry"}
			if !slices.Equal(stages, want) {
				t.Errorf("stages = %v, want %v with any number of assigning", stages, want)
			}
			// With a TPM, every TLS handshake (DPS register, polls, hub) was
			// signed inside it.
			if tpm != nil {
				n := tpm.count(tpm2.TPMCCSign) - signsBefore
				t.Logf("%d TPM2_Sign during provisioning", n)
				if n < 2 {
					t.Errorf("%d TPM2_Sign during provisioning, want one per TLS handshake (at least DPS and the hub)", n)
				}
			}
		})
	}
}

// TestProvisionSymKeyEndToEnd: the station writes an individual
// enrollment's symmetric key to a DUT (without a TPM, and with one, which
// keeps the key sealed at rest), which registers with it and sends
// telemetry to the hub with a SAS token signed by it.
func TestProvisionSymKeyEndToEnd(t *testing.T) {
	for _, withTPM := range []bool{false, true} {
		name := map[bool]string{true: "tpm", false: "no-tpm"}[withTPM]
		t.Run(name, func(t *testing.T) {
			var tpm transport.TPM
			if withTPM {
				tpm = openSimTPM(t)
			}
			provisionSymKey(t, "SN-SYM-"+name, "sym-e2e-"+name, tpm)
		})
	}
}

func provisionSymKey(t *testing.T, serial, regID string, tpm transport.TPM) {
	env := startDevserver(t)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	c := startStation(t, ctx, serial, tpm)
	key := make([]byte, 32)
	rand.Read(key)
	svc, err := env.emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}
	en := &dps.IndividualEnrollment{
		RegistrationID:     regID,
		ProvisioningStatus: "enabled",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{
			PrimaryKey: dps.EncodeKey(key), SecondaryKey: dps.EncodeKey(bytes.Repeat([]byte{7}, 32)),
		}},
	}
	if _, err := svc.PutEnrollment(ctx, en, ""); err != nil {
		t.Fatal(err)
	}
	cfg := station.DeviceConfig{IDScope: env.dps.IDScope(), GlobalEndpoint: env.dps.Addr(), RegistrationID: regID, Method: station.MethodSymKey, TrustBundle: env.pem}
	if err := c.WriteConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	// No key yet: NotFound naming the command.
	if _, err := c.ProvisionNow(ctx, nil); station.KindOf(err) != station.KindNotFound || !strings.Contains(err.Error(), "WRITE SYMMETRIC KEY") {
		t.Errorf("symkey provisioning without a key: %v, want NotFound naming WRITE SYMMETRIC KEY", err)
	}
	// A key for another registration ID: Invalid.
	if err := c.WriteSymmetricKey(ctx, "another-id", key); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ProvisionNow(ctx, nil); station.KindOf(err) != station.KindInvalid {
		t.Errorf("symkey of another registration ID: %v, want Invalid", err)
	}
	if err := c.WriteSymmetricKey(ctx, regID, key); err != nil {
		t.Fatal(err)
	}
	stages := env.provisionAndCheck(t, ctx, c, cfg, serial)
	want := []string{link.StageStart, "register", "assigned", "hub-connect", "hub-connected", "telemetry"}
	if !slices.Equal(stages, want) {
		t.Errorf("stages = %v, want %v with any number of assigning", stages, want)
	}
	// A wrong key is refused by DPS.
	bad := bytes.Clone(key)
	bad[0] ^= 1
	if err := c.WriteSymmetricKey(ctx, regID, bad); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ProvisionNow(ctx, nil); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("a wrong symmetric key: %v, want Unauthorized", err)
	}
}
