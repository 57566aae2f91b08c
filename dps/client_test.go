package dps_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// devEnv is a running devserver (DPS over HTTPS) with its embedded hub,
// both with certificates from a throwaway CA.
type devEnv struct {
	emb     *devserver.Embedded
	dps     *devserver.Server
	hub     *devserver.Hub
	hubName string // the linked hub's name: 127.0.0.1:port, dialled as it is
	roots   *x509.CertPool
	pem     string // the CA certificate, PEM
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

func (env *devEnv) httpClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: env.roots}}}
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

// simTPM opens a fresh simulator TPM with an EK and SRK, closed when the
// test ends. Only one simulator exists per process at a time.
func simTPM(t *testing.T) *hsm.TPM {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	if err := fixtures.Manufacture(t.Context(), sim, nil); err != nil {
		t.Fatal(err)
	}
	return hsm.New(sim)
}

// TestRegisterTPMEndToEnd registers a simulator TPM with the real
// devserver, connects to its embedded hub with the TPM-held key and checks
// that the hub recorded the telemetry.
func TestRegisterTPMEndToEnd(t *testing.T) {
	env := startDevserver(t)
	tpm := simTPM(t)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	e, err := tpm.Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	regID := station.RegistrationIDFromEK(e.EKPublic)
	env.enroll(t, regID, e.EKPublic)

	var stages []string
	dc := &dps.DeviceClient{
		Endpoint: env.dps.Addr(),
		IDScope:  env.dps.IDScope(),
		HTTP:     env.httpClient(),
		Progress: func(stage, detail string) { stages = append(stages, stage) },
	}
	st, err := dc.RegisterTPM(ctx, regID, tpm, json.RawMessage(`{"line":"A"}`))
	if err != nil {
		t.Fatalf("RegisterTPM: %v (stages %v)", err, stages)
	}
	if st.Status != dps.StatusAssigned || st.AssignedHub != env.hubName || st.DeviceID == "" {
		t.Fatalf("state = status %q hub %q device %q, want assigned to %s", st.Status, st.AssignedHub, st.DeviceID, env.hubName)
	}
	want := []string{"register", "challenge", "activated", "assigned"}
	if got := slices.DeleteFunc(slices.Clone(stages), func(s string) bool { return s == "assigning" }); !slices.Equal(got, want) {
		t.Errorf("stages = %v, want %v with any number of assigning", stages, want)
	}

	hub, err := dps.ConnectHub(ctx, dps.HubConfig{
		Addr: st.AssignedHub, DeviceID: st.DeviceID, Signer: tpm.HMAC, TLS: &tls.Config{RootCAs: env.roots},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer hub.Close()
	body := []byte(`{"kiln":"end-to-end check"}`)
	mid, err := hub.SendTelemetry(ctx, body, map[string]string{"serial": "SN 1/2"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := env.hub.WaitTelemetry(ctx, st.AssignedHub, st.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Properties["$.mid"] != mid || mid == "" {
		t.Errorf("hub recorded $.mid %q, client returned %q", got.Properties["$.mid"], mid)
	}
	if got.Properties["serial"] != "SN 1/2" {
		t.Errorf("hub recorded properties %v, want serial=SN 1/2", got.Properties)
	}
	if !bytes.Equal(got.Body, body) {
		t.Errorf("hub recorded body %q, want %q", got.Body, body)
	}
	if err := hub.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := hub.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	// The hub refuses a token signed with any other key.
	_, err = dps.ConnectHub(ctx, dps.HubConfig{
		Addr: st.AssignedHub, DeviceID: st.DeviceID, Key: []byte("not the device key"), TLS: &tls.Config{RootCAs: env.roots},
	})
	if k := station.KindOf(err); k != station.KindUnauthorized {
		t.Errorf("ConnectHub with a wrong key: kind %v (%v), want unauthorized", k, err)
	}
}

// TestRegisterTPMRefusals checks the errors of registrations the devserver
// refuses and of a server the device does not trust.
func TestRegisterTPMRefusals(t *testing.T) {
	env := startDevserver(t)
	tpm := simTPM(t)
	ctx := t.Context()
	e, err := tpm.Endorsement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	regID := station.RegistrationIDFromEK(e.EKPublic)
	dc := &dps.DeviceClient{Endpoint: env.dps.Addr(), IDScope: env.dps.IDScope(), HTTP: env.httpClient()}

	// Not enrolled.
	_, err = dc.RegisterTPM(ctx, regID, tpm, nil)
	if k := station.KindOf(err); k != station.KindUnauthorized && k != station.KindNotFound {
		t.Errorf("unenrolled: kind %v (%v), want unauthorized or not found", k, err)
	}
	if err != nil && !strings.Contains(err.Error(), "error 40") {
		t.Errorf("unenrolled: %q does not carry the DPS error code", err)
	}

	// Enrolled with another TPM's EK: the challenge is made for that EK,
	// so this TPM cannot activate it.
	other := append([]byte(nil), e.EKPublic...)
	other[len(other)-1] ^= 1 // another modulus
	env.enroll(t, regID, other)
	_, err = dc.RegisterTPM(ctx, regID, tpm, nil)
	if err == nil {
		t.Errorf("registration with an enrollment for another EK succeeded")
	}

	// A device that does not trust the server's CA.
	untrusting := &dps.DeviceClient{Endpoint: env.dps.Addr(), IDScope: env.dps.IDScope()}
	_, err = untrusting.RegisterTPM(ctx, regID, tpm, nil)
	if k := station.KindOf(err); k != station.KindUnauthorized || !strings.Contains(err.Error(), "trust bundle") {
		t.Errorf("untrusted server: kind %v (%v), want unauthorized naming the trust bundle", k, err)
	}
}

// fakeTPM is enough of a TPM for answers that stop before activation.
type fakeTPM struct{}

func (fakeTPM) Endorsement(context.Context) (*station.Endorsement, error) {
	return &station.Endorsement{EKPublic: []byte{0, 1, 2}, SRKPublic: []byte{3, 4}}, nil
}
func (fakeTPM) ActivateDPS(context.Context, []byte) error {
	return station.Errorf("activate", station.KindInternal, "fakeTPM cannot activate")
}
func (fakeTPM) HMAC(context.Context, []byte) ([]byte, error) { return make([]byte, 32), nil }

// TestRegisterTPMErrorKinds checks how DPS error answers to the first
// register become error kinds, with DPS's code and message in the text,
// and that the first request carries no Authorization.
func TestRegisterTPMErrorKinds(t *testing.T) {
	tests := []struct {
		status int
		want   station.Kind
	}{
		{http.StatusUnauthorized, station.KindUnauthorized},
		{http.StatusNotFound, station.KindNotFound},
		{http.StatusTooManyRequests, station.KindUnavailable},
		{http.StatusInternalServerError, station.KindUnavailable},
		{http.StatusServiceUnavailable, station.KindUnavailable},
		{http.StatusBadRequest, station.KindInvalid},
		{http.StatusOK, station.KindInvalid}, // a success where the challenge was due
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.status), func(t *testing.T) {
			var auth []string
			var path string
			srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				auth = append(auth, r.Header.Get("Authorization"))
				path = r.URL.Path + "?" + r.URL.RawQuery
				w.Header().Set("retry-after", "1")
				w.WriteHeader(tt.status)
				fmt.Fprintf(w, `{"errorCode":%d123,"trackingId":"t","message":"told you so","timestampUtc":"2026-01-01T00:00:00Z"}`, tt.status)
			}))
			defer srv.Close()
			dc := &dps.DeviceClient{Endpoint: strings.TrimPrefix(srv.URL, "https://"), IDScope: "0ne00TEST", HTTP: srv.Client()}
			_, err := dc.RegisterTPM(t.Context(), "dev-1", fakeTPM{}, nil)
			if k := station.KindOf(err); k != tt.want {
				t.Fatalf("kind %v (%v), want %v", k, err, tt.want)
			}
			if tt.status >= 300 && !strings.Contains(err.Error(), fmt.Sprintf("%d123: told you so", tt.status)) {
				t.Errorf("error %q does not carry DPS's code and message", err)
			}
			if want := "/0ne00TEST/registrations/dev-1/register?api-version=2019-03-31"; path != want {
				t.Errorf("path = %s, want %s", path, want)
			}
			// A throttled challenge is sent again after retry-after, three
			// times at most, like every other request.
			n := 1
			if tt.status == http.StatusTooManyRequests || tt.status == http.StatusServiceUnavailable {
				n = 4
			}
			if len(auth) != n || slices.ContainsFunc(auth, func(a string) bool { return a != "" }) {
				t.Errorf("Authorization headers = %q, want %d empty (the TPM challenge request)", auth, n)
			}
		})
	}
}

func TestTelemetryTopic(t *testing.T) {
	got := dps.TelemetryTopic("dev-1", "m 1", map[string]string{"b": "x&y+#", "a": "1", "$.mid": "ignored"})
	want := "devices/dev-1/messages/events/%24.mid=m%201&a=1&b=x%26y%2B%23"
	if got != want {
		t.Errorf("TelemetryTopic = %s, want %s", got, want)
	}
}
