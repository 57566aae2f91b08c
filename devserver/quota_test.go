package devserver_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// clock is a time source the test moves by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// checkThrottled checks that r is a 429 with errorCode code and a
// retry-after header of retryAfter seconds.
func checkThrottled(t *testing.T, r *reply, code int, retryAfter string) {
	t.Helper()
	body := r.errorBody(t, http.StatusTooManyRequests)
	if body.ErrorCode != code {
		t.Errorf("errorCode %d, want %d", body.ErrorCode, code)
	}
	if got := r.header.Get("retry-after"); got != retryAfter {
		t.Errorf("retry-after %q, want %q", got, retryAfter)
	}
	if !strings.Contains(body.Message, "retry after") {
		t.Errorf("message %q: want it to say when to retry", body.Message)
	}
}

func TestQuotaPollFloodHTTPS(t *testing.T) {
	clk := newClock()
	e := start(t, devserver.Config{Now: clk.Now, AssignmentDelay: time.Hour, // stays assigning
		Quotas: devserver.Quotas{PollsPerDevice: 5, PollWindow: 10 * time.Second}})
	scope := e.srv.IDScope()
	tokens := map[string]string{}
	ops := map[string]string{}
	for _, id := range []string{"poll-a", "poll-b"} {
		_, primary, _ := e.enrollSymmetricKey(t, id)
		tokens[id] = dps.NewDeviceSAS(scope, id, primary, time.Now().Add(time.Hour))
		r := e.do(t, http.MethodPut, registerPath(scope, id), tokens[id], dps.DeviceRegistration{RegistrationID: id})
		if r.status != http.StatusAccepted {
			t.Fatalf("register %s: %d %s", id, r.status, r.body)
		}
		var op dps.RegistrationOperationStatus
		r.decode(t, &op)
		ops[id] = op.OperationID
	}
	poll := func(id string) *reply { return e.do(t, http.MethodGet, pollPath(scope, id, ops[id]), tokens[id], "{}") }
	m0 := e.scrape(t)

	// Polls with a forged token are refused before they spend the
	// device's budget.
	forged := dps.NewDeviceSAS(scope, "poll-a", []byte("not the device's key, not at all"), time.Now().Add(time.Hour))
	for range 8 {
		e.do(t, http.MethodGet, pollPath(scope, "poll-a", ops["poll-a"]), forged, nil).errorBody(t, http.StatusUnauthorized)
	}
	for i := range 5 {
		if r := poll("poll-a"); r.status != http.StatusAccepted {
			t.Fatalf("poll %d: %d %s, want 202", i+1, r.status, r.body)
		}
	}
	// The sixth in the same 10 s: 429, retry when the first poll leaves the window.
	checkThrottled(t, poll("poll-a"), 429003, "10")
	// Another device has its own budget.
	if r := poll("poll-b"); r.status != http.StatusAccepted {
		t.Errorf("another device's poll: %d %s, want 202", r.status, r.body)
	}
	clk.advance(4 * time.Second)
	checkThrottled(t, poll("poll-a"), 429003, "6")
	clk.advance(6 * time.Second)
	if r := poll("poll-a"); r.status != http.StatusAccepted {
		t.Errorf("poll after the window: %d %s, want 202", r.status, r.body)
	}
	checkDeltas(t, m0, e.scrape(t), map[string]float64{"kiln_dps_throttled_total{}": 2})
}

func TestQuotaPollFloodMQTT(t *testing.T) {
	clk := newClock()
	e := start(t, devserver.Config{Now: clk.Now, MQTTAddr: "127.0.0.1:0", AssignmentDelay: time.Hour,
		Quotas: devserver.Quotas{PollsPerDevice: 5, PollWindow: 10 * time.Second}})
	scope := e.srv.IDScope()
	const regID = "mqtt-poll"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	c, ch := e.mustDialDPS(t, regID, dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
	body, _ := json.Marshal(dps.DeviceRegistration{RegistrationID: regID})
	a := dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=1", "1", body)
	if a.status != http.StatusAccepted {
		t.Fatalf("register: %d %s", a.status, a.raw)
	}
	poll := func(rid string) dpsAnswer {
		return dpsRequest(t, c, ch, "$dps/registrations/GET/iotdps-get-operationstatus/?$rid="+rid+"&operationId="+a.op.OperationID, rid, []byte(" "))
	}
	for i := range 5 {
		if p := poll(fmt.Sprint(10 + i)); p.status != http.StatusAccepted {
			t.Fatalf("poll %d: %d %s", i+1, p.status, p.raw)
		}
	}
	clk.advance(3 * time.Second)
	p := poll("rid-6")
	var eb dps.ErrorDetails
	if err := json.Unmarshal(p.raw, &eb); err != nil || p.status != http.StatusTooManyRequests || eb.ErrorCode != 429003 || eb.TrackingID == "" {
		t.Fatalf("sixth poll: res/%d %s, want res/429 with errorCode 429003", p.status, p.raw)
	}
	if p.retryAfter != "7" {
		t.Errorf("sixth poll: retry-after=%q in the topic, want 7", p.retryAfter)
	}
	clk.advance(7 * time.Second)
	if p := poll("rid-7"); p.status != http.StatusAccepted {
		t.Errorf("poll after the window: %d %s, want 202", p.status, p.raw)
	}
}

func TestQuotaServiceOperations(t *testing.T) {
	clk := newClock()
	e := start(t, devserver.Config{Now: clk.Now, Quotas: devserver.Quotas{OperationsPerMinute: 3}})
	scope := e.srv.IDScope()
	_, primary, _ := e.enrollSymmetricKey(t, "svc-dev") // 1
	for range 2 {                                       // 2, 3
		if r := e.service(t, http.MethodGet, "/enrollments/svc-dev", nil); r.status != http.StatusOK {
			t.Fatalf("get: %d %s", r.status, r.body)
		}
	}
	m0 := e.scrape(t) // /metrics is no service operation
	checkThrottled(t, e.service(t, http.MethodGet, "/enrollments/svc-dev", nil), 429002, "60")
	checkThrottled(t, e.service(t, http.MethodPost, "/enrollments/query", `{"query":"*"}`), 429002, "60")

	// The device API does not count against service operations.
	reg := e.registerSAS(t, "svc-dev", dps.NewDeviceSAS(scope, "svc-dev", primary, time.Now().Add(time.Hour)))
	if reg.final.Status != dps.StatusAssigned {
		t.Errorf("registration while the service API is throttled: %s", reg.finalRaw)
	}
	clk.advance(45 * time.Second)
	checkThrottled(t, e.service(t, http.MethodGet, "/enrollments/svc-dev", nil), 429002, "15")
	clk.advance(15 * time.Second)
	if r := e.service(t, http.MethodGet, "/enrollments/svc-dev", nil); r.status != http.StatusOK {
		t.Errorf("get after a minute: %d %s", r.status, r.body)
	}
	checkDeltas(t, m0, e.scrape(t), map[string]float64{
		"kiln_dps_throttled_total{}": 3,
		series("kiln_dps_service_requests_total", "operation", "enrollment.get", "code", "429"):   2,
		series("kiln_dps_service_requests_total", "operation", "enrollment.query", "code", "429"): 1,
		series("kiln_dps_service_requests_total", "operation", "enrollment.get", "code", "200"):   1,
	})
}

func TestQuotaRegistrations(t *testing.T) {
	clk := newClock()
	e := start(t, devserver.Config{Now: clk.Now, MQTTAddr: "127.0.0.1:0", Quotas: devserver.Quotas{RegistrationsPerMinute: 2}})
	scope := e.srv.IDScope()
	_, primary, _ := e.enrollSymmetricKey(t, "reg-a")
	tok := dps.NewDeviceSAS(scope, "reg-a", primary, time.Now().Add(time.Hour))
	for range 2 {
		if r := e.do(t, http.MethodPut, registerPath(scope, "reg-a"), tok, dps.DeviceRegistration{RegistrationID: "reg-a"}); r.status != http.StatusAccepted {
			t.Fatalf("register: %d %s", r.status, r.body)
		}
	}
	clk.advance(20 * time.Second)
	checkThrottled(t, e.do(t, http.MethodPut, registerPath(scope, "reg-a"), tok, dps.DeviceRegistration{RegistrationID: "reg-a"}), 429001, "40")
	// The lookup is a device registration request too.
	checkThrottled(t, e.do(t, http.MethodPost, "/"+scope+"/registrations/reg-a?api-version=2019-03-31", tok, dps.DeviceRegistration{RegistrationID: "reg-a"}), 429001, "40")

	// Over MQTT: res/429 with the retry-after in the topic.
	c, ch := e.mustDialDPS(t, "reg-a", tok)
	body, _ := json.Marshal(dps.DeviceRegistration{RegistrationID: "reg-a"})
	a := dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=r1", "r1", body)
	var eb dps.ErrorDetails
	if err := json.Unmarshal(a.raw, &eb); err != nil || a.status != http.StatusTooManyRequests || eb.ErrorCode != 429001 || a.retryAfter != "40" {
		t.Errorf("MQTT register: res/%d retry-after=%q %s, want res/429 retry-after=40 errorCode 429001", a.status, a.retryAfter, a.raw)
	}
	clk.advance(40 * time.Second)
	a = dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=r2", "r2", body)
	if a.status != http.StatusAccepted {
		t.Errorf("MQTT register after a minute: %d %s", a.status, a.raw)
	}
}

// The zero Quotas, the station's, throttle nothing.
func TestQuotaZeroThrottlesNothing(t *testing.T) {
	e := start(t, devserver.Config{AssignmentDelay: time.Hour, Now: newClock().Now}) // time stands still
	scope := e.srv.IDScope()
	_, primary, _ := e.enrollSymmetricKey(t, "free")
	tok := dps.NewDeviceSAS(scope, "free", primary, time.Now().Add(time.Hour))
	r := e.do(t, http.MethodPut, registerPath(scope, "free"), tok, dps.DeviceRegistration{RegistrationID: "free"})
	var op dps.RegistrationOperationStatus
	r.decode(t, &op)
	for i := range 30 {
		if p := e.do(t, http.MethodGet, pollPath(scope, "free", op.OperationID), tok, nil); p.status != http.StatusAccepted {
			t.Fatalf("poll %d: %d %s", i+1, p.status, p.body)
		}
		if g := e.service(t, http.MethodGet, "/enrollments/free", nil); g.status != http.StatusOK {
			t.Fatalf("get %d: %d %s", i+1, g.status, g.body)
		}
	}
}

func TestQuotaEnrollmentLimit(t *testing.T) {
	e := start(t, devserver.Config{Quotas: devserver.Quotas{MaxEnrollments: 2}})
	e.enrollSymmetricKey(t, "lim-a")
	e.enrollSymmetricKey(t, "lim-b")
	sym := `{"attestation":{"type":"symmetricKey"}}`
	over := func(r *reply) {
		t.Helper()
		body := r.errorBody(t, http.StatusConflict)
		if body.ErrorCode != 409001 || !strings.Contains(body.Message, "2 individual enrollments") {
			t.Errorf("over the limit: %s, want errorCode 409001 naming the limit", r.body)
		}
	}
	over(e.service(t, http.MethodPut, "/enrollments/lim-c", sym))
	// Updating an existing enrollment is no new one.
	if r := e.service(t, http.MethodPut, "/enrollments/lim-a", `{"attestation":{"type":"symmetricKey"},"deviceId":"x"}`); r.status != http.StatusOK {
		t.Errorf("update at the limit: %d %s", r.status, r.body)
	}
	// Bulk: each new item fails on its own with the same code.
	r := e.service(t, http.MethodPost, "/enrollments", `{"mode":"create","enrollments":[{"registrationId":"lim-c","attestation":{"type":"symmetricKey"}},{"registrationId":"lim-d","attestation":{"type":"symmetricKey"}}]}`)
	var res dps.BulkEnrollmentOperationResult
	r.decode(t, &res)
	if r.status != http.StatusOK || res.IsSuccessful || len(res.Errors) != 2 || res.Errors[0].ErrorCode != 409001 || res.Errors[1].ErrorCode != 409001 {
		t.Errorf("bulk over the limit: %d %s", r.status, r.body)
	}
	// A delete makes room again.
	if r := e.service(t, http.MethodDelete, "/enrollments/lim-b", nil); r.status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	if r := e.service(t, http.MethodPut, "/enrollments/lim-c", sym); r.status != http.StatusOK {
		t.Errorf("create after a delete: %d %s", r.status, r.body)
	}
	// The limit holds across a restart, where the count starts unknown.
	e = e.restart(t)
	over(e.service(t, http.MethodPut, "/enrollments/lim-d", sym))

	// Negative: no limit.
	free := start(t, devserver.Config{Quotas: devserver.Quotas{MaxEnrollments: -1}})
	for i := range 3 {
		free.enrollSymmetricKey(t, fmt.Sprint("free-", i))
	}
}

func TestQuotaRegistrationLimit(t *testing.T) {
	e := start(t, devserver.Config{Quotas: devserver.Quotas{MaxRegistrations: 1}})
	scope := e.srv.IDScope()
	_, pa, _ := e.enrollSymmetricKey(t, "one-a")
	_, pb, _ := e.enrollSymmetricKey(t, "one-b")
	tokA := dps.NewDeviceSAS(scope, "one-a", pa, time.Now().Add(time.Hour))
	if reg := e.registerSAS(t, "one-a", tokA); reg.final.Status != dps.StatusAssigned {
		t.Fatalf("first device: %s", reg.finalRaw)
	}
	r := e.do(t, http.MethodPut, registerPath(scope, "one-b"), dps.NewDeviceSAS(scope, "one-b", pb, time.Now().Add(time.Hour)), dps.DeviceRegistration{RegistrationID: "one-b"})
	if body := r.errorBody(t, http.StatusConflict); body.ErrorCode != 409001 {
		t.Errorf("second device: %s, want 409001", r.body)
	}
	// The registered device registers again: its registration exists.
	if reg := e.registerSAS(t, "one-a", tokA); reg.final.Status != dps.StatusAssigned {
		t.Errorf("the first device again: %s", reg.finalRaw)
	}
}

func TestQuotaGroupLimit(t *testing.T) {
	e := start(t, devserver.Config{Quotas: devserver.Quotas{MaxSymmetricKeyGroups: 1}})
	grp := `{"attestation":{"type":"symmetricKey"},"iotHubs":["` + hub1 + `"]}`
	if r := e.service(t, http.MethodPut, "/enrollmentGroups/g1", grp); r.status != http.StatusOK {
		t.Fatalf("first group: %d %s", r.status, r.body)
	}
	r := e.service(t, http.MethodPut, "/enrollmentGroups/g2", grp)
	if body := r.errorBody(t, http.StatusConflict); body.ErrorCode != 409001 {
		t.Errorf("second group: %s, want 409001", r.body)
	}
}

func TestQuotaMessageSize(t *testing.T) {
	e := start(t, devserver.Config{Quotas: devserver.Quotas{MaxMessageBytes: 2048}})
	big := `{"attestation":{"type":"symmetricKey"},"deviceId":"` + strings.Repeat("x", 2100) + `"}`
	r := e.service(t, http.MethodPut, "/enrollments/big", big)
	if body := r.errorBody(t, http.StatusBadRequest); !strings.Contains(body.Message, "2048 bytes") {
		t.Errorf("a 2.1 KB body: %s, want 400 naming the 2048-byte limit", r.body)
	}
	// DPS's 96 KB by default: 2.1 KB passes (the deviceId itself is refused by nothing here).
	d := start(t, devserver.Config{})
	if r := d.service(t, http.MethodPut, "/enrollments/big", big); r.status != http.StatusOK {
		t.Errorf("a 2.1 KB body under the default limit: %d %s", r.status, r.body)
	}
}

func TestQuotaConfigRefused(t *testing.T) {
	many := make([]devserver.LinkedHub, devserver.DPSMaxLinkedHubs+1)
	for i := range many {
		many[i] = devserver.LinkedHub{Name: fmt.Sprintf("hub%d.kiln.test", i), ApplyAllocationPolicy: true}
	}
	tests := []struct {
		name string
		cfg  devserver.Config
	}{
		{"51 linked hubs", devserver.Config{Hubs: many}},
		{"3 hubs over a limit of 2", devserver.Config{Hubs: many[:3], Quotas: devserver.Quotas{MaxLinkedHubs: 2}}},
		{"negative rate", devserver.Config{Quotas: devserver.Quotas{PollsPerDevice: -1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.DataDir = t.TempDir()
			s, err := devserver.New(tt.cfg)
			if err == nil {
				s.Close()
				t.Fatal("New accepted it")
			}
			if station.KindOf(err) != station.KindInvalid {
				t.Errorf("error %v, want Invalid", err)
			}
		})
	}
	// With no limit, 51 hubs are fine.
	cfg := devserver.Config{DataDir: t.TempDir(), Hubs: many, Quotas: devserver.Quotas{MaxLinkedHubs: -1}}
	s, err := devserver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}

// LoadEnrollments, the benchmarks' set-up, writes enrollments as the
// service API does: they read back, register, and count against the limit.
func TestLoadEnrollments(t *testing.T) {
	e := start(t, devserver.Config{Quotas: devserver.Quotas{MaxEnrollments: 150}})
	key := []byte("0123456789abcdef0123456789abcdef")
	if err := devserver.LoadEnrollments(t.Context(), e.srv, "loaded", 150, 64, key); err != nil {
		t.Fatal(err)
	}
	r := e.service(t, http.MethodGet, "/enrollments/loaded-0000149", nil)
	var en dps.IndividualEnrollment
	r.decode(t, &en)
	if r.status != http.StatusOK || en.RegistrationID != "loaded-0000149" || en.ProvisioningStatus != dps.ProvisioningEnabled ||
		en.Attestation.SymmetricKey == nil || en.Attestation.SymmetricKey.PrimaryKey != dps.EncodeKey(key) || en.ETag == "" {
		t.Fatalf("loaded enrollment: %d %s", r.status, r.body)
	}
	if r := e.service(t, http.MethodGet, "/enrollments/loaded-0000150", nil); r.status != http.StatusNotFound {
		t.Errorf("enrollment 150 of 150: %d", r.status)
	}
	reg := e.registerSAS(t, "loaded-0000007", dps.NewDeviceSAS(e.srv.IDScope(), "loaded-0000007", key, time.Now().Add(time.Hour)))
	if reg.final.Status != dps.StatusAssigned {
		t.Errorf("registration of a loaded enrollment: %s", reg.finalRaw)
	}
	if r := e.service(t, http.MethodPut, "/enrollments/one-more", `{"attestation":{"type":"symmetricKey"}}`); r.status != http.StatusConflict {
		t.Errorf("create over a limit filled by the load: %d %s", r.status, r.body)
	}
	if err := devserver.LoadEnrollments(t.Context(), e.srv, "bad id", 1, 1, key); err == nil {
		t.Error("a prefix that is no registration ID was loaded")
	}
}

// The message limit holds over MQTT too: a publish over it ends the
// connection, one under it is served.
func TestQuotaMessageSizeMQTT(t *testing.T) {
	e := start(t, devserver.Config{MQTTAddr: "127.0.0.1:0", Quotas: devserver.Quotas{MaxMessageBytes: 2048}})
	scope := e.srv.IDScope()
	const regID = "mqtt-small-limit"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	tok := dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour))
	c, ch := e.mustDialDPS(t, regID, tok)
	under := `{"registrationId":"` + regID + `","payload":{"pad":"` + strings.Repeat("x", 1900) + `"}}`
	if a := dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=1", "1", []byte(under)); a.status != http.StatusAccepted {
		t.Fatalf("a %d-byte register: %d %s", len(under), a.status, a.raw)
	}
	c.Publish("$dps/registrations/PUT/iotdps-register/?$rid=2", 0, false, []byte(strings.Repeat(" ", 2100)))
	deadline := time.Now().Add(10 * time.Second)
	for c.IsConnectionOpen() {
		if time.Now().After(deadline) {
			t.Fatal("still connected 10 s after a 2,100-byte publish over a 2,048-byte limit")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// NoQuotas, the station's: no count limit either (an enrollment stays for
// every unit made).
func TestNoQuotas(t *testing.T) {
	q := devserver.NoQuotas()
	if q.RegistrationsPerMinute != 0 || q.OperationsPerMinute != 0 || q.PollsPerDevice != 0 {
		t.Errorf("NoQuotas throttles: %+v", q)
	}
	hubs := make([]devserver.LinkedHub, devserver.DPSMaxLinkedHubs+1)
	for i := range hubs {
		hubs[i] = devserver.LinkedHub{Name: fmt.Sprintf("hub%d.kiln.test", i), ApplyAllocationPolicy: true}
	}
	e := start(t, devserver.Config{Hubs: hubs, Quotas: q})
	for b := range devserver.MaxSymmetricKeyGroups/10 + 1 {
		var items []string
		for i := range 10 {
			items = append(items, fmt.Sprintf(`{"enrollmentGroupId":"g-%d-%d","attestation":{"type":"symmetricKey"}}`, b, i))
		}
		r := e.service(t, http.MethodPost, "/enrollmentGroups", `{"mode":"create","enrollmentGroups":[`+strings.Join(items, ",")+`]}`)
		if r.status != http.StatusOK || !strings.Contains(string(r.body), `"isSuccessful":true`) {
			t.Fatalf("bulk %d: %d %s", b, r.status, r.body)
		}
	}
}
