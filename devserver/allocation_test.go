package devserver_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

const hub3 = "hub3.kiln.test"

// registerBody runs a symmetric-key registration whose register body is
// body, to its final answer.
func (e *env) registerBody(t *testing.T, regID, token string, body any) (dps.RegistrationOperationStatus, []byte) {
	t.Helper()
	scope := e.srv.IDScope()
	r := e.do(t, http.MethodPut, registerPath(scope, regID), token, body)
	if r.status != http.StatusAccepted {
		t.Fatalf("register %s: %d %s", regID, r.status, r.body)
	}
	var op dps.RegistrationOperationStatus
	r.decode(t, &op)
	deadline := time.Now().Add(20 * time.Second)
	for {
		p := e.do(t, http.MethodGet, pollPath(scope, regID, op.OperationID), token, nil)
		if p.status == http.StatusOK {
			var final dps.RegistrationOperationStatus
			p.decode(t, &final)
			return final, p.body
		}
		if p.status != http.StatusAccepted || time.Now().After(deadline) {
			t.Fatalf("poll %s: %d %s", regID, p.status, p.body)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// enrollAndRegister enrolls regID with symmetric keys (edited by edit) and
// registers it with body.
func (e *env) enrollAndRegister(t *testing.T, regID string, body any, edit ...func(*dps.IndividualEnrollment)) (dps.RegistrationOperationStatus, []byte) {
	t.Helper()
	_, primary, _ := e.enrollSymmetricKey(t, regID, edit...)
	return e.registerBody(t, regID, dps.NewDeviceSAS(e.srv.IDScope(), regID, primary, time.Now().Add(time.Hour)), dps.DeviceRegistration{RegistrationID: regID})
}

func geoLatency(en *dps.IndividualEnrollment) { en.AllocationPolicy = dps.AllocationGeoLatency }

func TestAllocationGeoLatency(t *testing.T) {
	hubs := []devserver.LinkedHub{
		{Name: hub1, Weight: 1, ApplyAllocationPolicy: true},
		{Name: hub2, Weight: 1, ApplyAllocationPolicy: true},
		{Name: hub3, Weight: 1000, ApplyAllocationPolicy: true},
	}
	loopback := netip.MustParsePrefix("127.0.0.0/8")
	t.Run("lowest latency wins, most specific network first", func(t *testing.T) {
		e := start(t, devserver.Config{Hubs: hubs, Latencies: devserver.Latencies{
			{Network: loopback, Hub: hub1, Latency: 20 * time.Millisecond},
			{Network: loopback, Hub: hub2, Latency: 5 * time.Millisecond},
			{Network: netip.MustParsePrefix("127.0.0.1/32"), Hub: hub1, Latency: time.Millisecond},
			{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: hub3, Latency: 0},
		}})
		for i := range 6 {
			final, raw := e.enrollAndRegister(t, fmt.Sprint("geo-", i), nil, geoLatency)
			if final.RegistrationState == nil || final.RegistrationState.AssignedHub != hub1 {
				t.Errorf("device %d: %s, want %s (1 ms from 127.0.0.1/32)", i, raw, hub1)
			}
		}
		// hashed enrollments ignore latency: the heavy hub3 takes most.
		final, raw := e.enrollAndRegister(t, "geo-hashed", nil)
		if final.RegistrationState == nil || final.RegistrationState.AssignedHub == "" {
			t.Errorf("hashed: %s", raw)
		}
	})
	t.Run("ties are hashed by weight among the nearest", func(t *testing.T) {
		e := start(t, devserver.Config{Hubs: hubs, Latencies: devserver.Latencies{
			{Network: loopback, Hub: hub1, Latency: 5 * time.Millisecond},
			{Network: loopback, Hub: hub2, Latency: 5 * time.Millisecond},
		}})
		counts := map[string]int{}
		for i := range 16 {
			final, raw := e.enrollAndRegister(t, fmt.Sprint("tie-", i), nil, geoLatency)
			if final.RegistrationState == nil {
				t.Fatalf("%s", raw)
			}
			counts[final.RegistrationState.AssignedHub]++
		}
		if counts[hub3] != 0 || counts[hub1] == 0 || counts[hub2] == 0 {
			t.Errorf("16 devices at equal latency to hub1 and hub2, unknown to hub3 (weight 1000): %v", counts)
		}
	})
	t.Run("no latency known: hashed by weight", func(t *testing.T) {
		e := start(t, devserver.Config{Hubs: hubs, Latencies: devserver.Latencies{
			{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: hub1, Latency: time.Millisecond},
		}})
		counts := map[string]int{}
		for i := range 8 {
			final, _ := e.enrollAndRegister(t, fmt.Sprint("far-", i), nil, geoLatency)
			counts[final.RegistrationState.AssignedHub]++
		}
		if counts[hub3] < 6 {
			t.Errorf("8 devices of unknown latency over weights 1:1:1000: %v, want nearly all on hub3", counts)
		}
	})
	t.Run("a map naming an unlinked hub is refused", func(t *testing.T) {
		_, err := devserver.New(devserver.Config{DataDir: t.TempDir(), Hubs: hubs,
			Latencies: devserver.Latencies{{Network: loopback, Hub: "elsewhere.kiln.test", Latency: time.Millisecond}}})
		if station.KindOf(err) != station.KindInvalid {
			t.Errorf("New: %v, want Invalid", err)
		}
	})
}

// webhook is a custom allocation webhook on a real TLS listener; answer
// decides each answer.
type webhook struct {
	srv    *httptest.Server
	mu     sync.Mutex
	got    []devserver.AllocationRequest
	raw    [][]byte
	query  []string
	answer func(req devserver.AllocationRequest) (status int, body string)
}

func newWebhook(t *testing.T, answer func(devserver.AllocationRequest) (int, string)) *webhook {
	w := &webhook{answer: answer}
	w.srv = httptest.NewTLSServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var req devserver.AllocationRequest
		if r.Method != http.MethodPost || json.Unmarshal(b, &req) != nil {
			http.Error(rw, "bad request", http.StatusBadRequest)
			return
		}
		w.mu.Lock()
		w.got, w.raw, w.query = append(w.got, req), append(w.raw, b), append(w.query, r.URL.RawQuery)
		w.mu.Unlock()
		status, body := w.answer(req)
		rw.Header().Set("Content-Type", "application/json")
		rw.WriteHeader(status)
		io.WriteString(rw, body)
	}))
	t.Cleanup(w.srv.Close)
	return w
}

// syncBuffer is a log sink for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestAllocationCustomWebhook(t *testing.T) {
	hook := newWebhook(t, func(req devserver.AllocationRequest) (int, string) {
		switch req.DeviceRuntimeContext.RegistrationID {
		case "wh-ok":
			return 200, `{"iotHubHostName":"` + strings.ToUpper(hub2) + `","initialTwin":{"tags":{"line":"7"},"properties":{"desired":{"fw":"2.0"}}},"payload":{"hello":"device"}}`
		case "wh-500":
			return 500, `{"oops":true}`
		case "wh-badjson":
			return 200, `{"iotHubHostName":`
		case "wh-nohub":
			return 200, `{"payload":{}}`
		case "wh-otherhub":
			return 200, `{"iotHubHostName":"` + hub3 + `"}`
		}
		return 404, ""
	})
	logs := &syncBuffer{}
	e := start(t, devserver.Config{
		WebhookClient: hook.srv.Client(),
		Logger:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	custom := func(url string) func(*dps.IndividualEnrollment) {
		return func(en *dps.IndividualEnrollment) {
			en.AllocationPolicy = dps.AllocationCustom
			en.CustomAllocationDefinition = &dps.CustomAllocationDefinition{WebhookURL: url, APIVersion: "2021-10-01"}
		}
	}
	const secret = "c2VjcmV0LWZ1bmN0aW9uLWtleQ"
	url := hook.srv.URL + "/api/allocate?code=" + secret

	t.Run("the webhook picks the hub, twin and payload", func(t *testing.T) {
		_, primary, _ := e.enrollSymmetricKey(t, "wh-ok", custom(url), func(en *dps.IndividualEnrollment) {
			en.InitialTwin = &dps.InitialTwin{Properties: &dps.InitialTwinProperties{Desired: json.RawMessage(`{"fw":"1.0"}`)}}
		})
		tok := dps.NewDeviceSAS(e.srv.IDScope(), "wh-ok", primary, time.Now().Add(time.Hour))
		final, raw := e.registerBody(t, "wh-ok", tok, json.RawMessage(`{"registrationId":"wh-ok","payload":{"model":"k7","rev":3}}`))
		st := final.RegistrationState
		if final.Status != dps.StatusAssigned || st == nil || st.AssignedHub != hub2 {
			t.Fatalf("final %s, want assigned to %s", raw, hub2)
		}
		if string(st.Payload) != `{"hello":"device"}` {
			t.Errorf("registrationState.payload %s, want the webhook's", st.Payload)
		}
		hd, err := e.srv.HubDevice(t.Context(), hub2, "wh-ok")
		if err != nil {
			t.Fatal(err)
		}
		if string(hd.Twin) != `{"fw":"2.0"}` {
			t.Errorf("hub twin %s, want the webhook's initialTwin over the enrollment's", hd.Twin)
		}

		hook.mu.Lock()
		req, body, query := hook.got[len(hook.got)-1], hook.raw[len(hook.raw)-1], hook.query[len(hook.query)-1]
		hook.mu.Unlock()
		rc := req.DeviceRuntimeContext
		if rc.RegistrationID != "wh-ok" || string(rc.Payload) != `{"model":"k7","rev":3}` || rc.SymmetricKey == nil || rc.X509 != nil || rc.TPM != nil {
			t.Errorf("deviceRuntimeContext %s", body)
		}
		if req.IndividualEnrollment == nil || req.EnrollmentGroup != nil || req.IndividualEnrollment.RegistrationID != "wh-ok" ||
			req.IndividualEnrollment.AllocationPolicy != dps.AllocationCustom || req.IndividualEnrollment.Attestation.Type != dps.AttestationSymmetricKey {
			t.Errorf("individualEnrollment %s", body)
		}
		// No secrets leave: the attestation is reduced to its type.
		if bytes.Contains(body, []byte(primaryKeyB64(primary))) || bytes.Contains(body, []byte("primaryKey")) {
			t.Errorf("the webhook request carries the enrollment's keys: %s", body)
		}
		if strings.Join(req.LinkedHubs, ",") != hub1+","+hub2 {
			t.Errorf("linkedHubs %v, want the hubs applying the policy", req.LinkedHubs)
		}
		if query != "code="+secret {
			t.Errorf("webhook query %q, want the URL's function key", query)
		}
		if rc.CurrentIoTHubHostName != "" || rc.CurrentDeviceID != "" {
			t.Errorf("first registration: current hub %q device %q, want none", rc.CurrentIoTHubHostName, rc.CurrentDeviceID)
		}
		// Registering again: the webhook is told where the device is.
		if final, raw := e.registerBody(t, "wh-ok", tok, nil); final.Status != dps.StatusAssigned {
			t.Fatalf("second registration: %s", raw)
		}
		hook.mu.Lock()
		rc = hook.got[len(hook.got)-1].DeviceRuntimeContext
		hook.mu.Unlock()
		if rc.CurrentIoTHubHostName != hub2 || rc.CurrentDeviceID != "wh-ok" || rc.Payload != nil {
			t.Errorf("re-registration: current hub %q device %q payload %s, want %s, wh-ok and none", rc.CurrentIoTHubHostName, rc.CurrentDeviceID, rc.Payload, hub2)
		}
	})

	failures := []struct {
		id, url, message string
	}{
		{"wh-500", url, "Custom allocation failed with status code: 500"},
		{"wh-badjson", url, "Custom allocation failed:"},
		{"wh-nohub", url, "no iotHubHostName"},
		{"wh-otherhub", url, "not one of the linked hubs"},
		{"wh-down", "https://127.0.0.1:1/api/allocate?code=" + secret, "could not be reached"},
	}
	for _, f := range failures {
		t.Run(f.id, func(t *testing.T) {
			final, raw := e.enrollAndRegister(t, f.id, nil, custom(f.url))
			st := final.RegistrationState
			if final.Status != dps.StatusFailed || st == nil || st.ErrorCode != dps.CodeAllocationFailed || !strings.Contains(st.ErrorMessage, f.message) {
				t.Errorf("final %s, want failed with 400209 and %q", raw, f.message)
			}
			if _, err := e.srv.HubDevice(t.Context(), hub1, f.id); station.KindOf(err) != station.KindNotFound {
				t.Errorf("a failed custom allocation left a hub device: %v", err)
			}
		})
	}
	t.Run("no webhook URL", func(t *testing.T) {
		final, raw := e.enrollAndRegister(t, "wh-none", nil, func(en *dps.IndividualEnrollment) { en.AllocationPolicy = dps.AllocationCustom })
		if final.Status != dps.StatusFailed || final.RegistrationState.ErrorCode != dps.CodeAllocationFailed {
			t.Errorf("final %s, want failed with 400209", raw)
		}
	})
	if strings.Contains(logs.String(), secret) {
		t.Error("the log holds the webhook's function key")
	}
}

func primaryKeyB64(k []byte) string { return dps.EncodeKey(k) }

// A device of an X.509 enrollment group: the webhook gets the group,
// without its certificates, and an x509 runtime context; the group's
// iotHubs are the hubs offered.
func TestAllocationCustomWebhookGroup(t *testing.T) {
	hook := newWebhook(t, func(req devserver.AllocationRequest) (int, string) {
		return 200, `{"iotHubHostName":"` + req.LinkedHubs[len(req.LinkedHubs)-1] + `"}`
	})
	e := start(t, devserver.Config{WebhookClient: hook.srv.Client(), Hubs: []devserver.LinkedHub{
		{Name: hub1, ApplyAllocationPolicy: true}, {Name: hub2}, {Name: hub3, ApplyAllocationPolicy: true}}})
	root := newTestRoot(t, "webhook group root")
	e.putGroup(t, x509Group("grp-hook", root.Cert, func(g *dps.EnrollmentGroup) {
		g.AllocationPolicy = dps.AllocationCustom
		g.IoTHubs = []string{hub1, hub2}
		g.CustomAllocationDefinition = &dps.CustomAllocationDefinition{WebhookURL: hook.srv.URL + "/alloc", APIVersion: "2021-10-01"}
	}))
	dev := issueDevice(t, root, "hook-dev-1")
	final, raw := e.registerX509(t, &dev.cert, "hook-dev-1")
	if st := final.RegistrationState; final.Status != dps.StatusAssigned || st.AssignedHub != hub2 || st.X509 == nil || st.X509.EnrollmentGroupID != "grp-hook" {
		t.Fatalf("final %s, want assigned to %s through grp-hook", raw, hub2)
	}
	hook.mu.Lock()
	defer hook.mu.Unlock()
	if len(hook.got) != 1 {
		t.Fatalf("%d webhook calls, want 1", len(hook.got))
	}
	req, body := hook.got[0], hook.raw[0]
	if req.EnrollmentGroup == nil || req.IndividualEnrollment != nil || req.EnrollmentGroup.EnrollmentGroupID != "grp-hook" ||
		req.EnrollmentGroup.Attestation.Type != dps.AttestationX509 || req.EnrollmentGroup.Attestation.X509 != nil {
		t.Errorf("enrollmentGroup in %s: want the group, its attestation reduced to the type", body)
	}
	if bytes.Contains(body, []byte("BEGIN CERTIFICATE")) {
		t.Errorf("the webhook request carries the group's certificate: %s", body)
	}
	if rc := req.DeviceRuntimeContext; rc.RegistrationID != "hook-dev-1" || rc.X509 == nil || rc.SymmetricKey != nil {
		t.Errorf("deviceRuntimeContext in %s", body)
	}
	if strings.Join(req.LinkedHubs, ",") != hub1+","+hub2 {
		t.Errorf("linkedHubs %v, want the group's iotHubs", req.LinkedHubs)
	}
}
