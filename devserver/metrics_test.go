package devserver_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// sample lines: name{label="value",...} value
var (
	metricName  = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*`)
	labelName   = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*`)
	metricTypes = []string{"counter", "gauge", "histogram", "summary", "untyped"}
)

// parseExposition parses the Prometheus text format 0.0.4 line by line and
// returns the samples by series (name{labels sorted by name}). It fails t
// on any line that is not a HELP, TYPE, blank or sample line, on a sample
// of a family without a TYPE line before it, on duplicate series, HELP or
// TYPE, and on a histogram whose buckets are not cumulative.
func parseExposition(t *testing.T, text string) map[string]float64 {
	t.Helper()
	samples := map[string]float64{}
	types := map[string]string{}
	helps := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("line %d %q: %s", n, line, fmt.Sprintf(format, args...))
		}
		switch {
		case line == "":
			continue
		case strings.HasPrefix(line, "# HELP "):
			name, _, _ := strings.Cut(strings.TrimPrefix(line, "# HELP "), " ")
			if metricName.FindString(name) != name || helps[name] {
				fail("a bad or repeated HELP")
			}
			helps[name] = true
			continue
		case strings.HasPrefix(line, "# TYPE "):
			f := strings.Fields(strings.TrimPrefix(line, "# TYPE "))
			if len(f) != 2 || metricName.FindString(f[0]) != f[0] || !slices.Contains(metricTypes, f[1]) || types[f[0]] != "" {
				fail("a bad or repeated TYPE")
			}
			types[f[0]] = f[1]
			continue
		case strings.HasPrefix(line, "#"):
			continue // a comment
		}
		name := metricName.FindString(line)
		if name == "" {
			fail("no metric name")
		}
		rest := line[len(name):]
		var labels []string
		if strings.HasPrefix(rest, "{") {
			rest = rest[1:]
			for !strings.HasPrefix(rest, "}") {
				ln := labelName.FindString(rest)
				if ln == "" || !strings.HasPrefix(rest[len(ln):], `="`) {
					fail("a bad label at %q", rest)
				}
				rest = rest[len(ln)+2:]
				var val strings.Builder
				for {
					if rest == "" {
						fail("an unterminated label value")
					}
					c := rest[0]
					rest = rest[1:]
					if c == '"' {
						break
					}
					if c == '\\' {
						if rest == "" || !strings.ContainsRune(`\"n`, rune(rest[0])) {
							fail("a bad escape")
						}
						c, rest = rest[0], rest[1:]
						if c == 'n' {
							c = '\n'
						}
					}
					val.WriteByte(c)
				}
				labels = append(labels, ln+"="+strconv.Quote(val.String()))
				rest = strings.TrimPrefix(rest, ",")
			}
			rest = rest[1:]
		}
		f := strings.Fields(rest)
		if !strings.HasPrefix(rest, " ") || len(f) < 1 || len(f) > 2 {
			fail("want one space, a value and an optional timestamp")
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			fail("value: %v", err)
		}
		family := name
		if typ := types[name]; typ == "" {
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(name, suf); ok && types[base] == "histogram" {
					family = base
				}
			}
		}
		if types[family] == "" {
			fail("no TYPE line for %s before its samples", family)
		}
		slices.Sort(labels)
		key := name + "{" + strings.Join(labels, ",") + "}"
		if _, dup := samples[key]; dup {
			fail("a duplicate series")
		}
		samples[key] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	// Histogram buckets are cumulative and end with +Inf = _count.
	for key, v := range samples {
		if !strings.Contains(key, `_bucket{`) || !strings.Contains(key, `le="+Inf"`) {
			continue
		}
		count := strings.Replace(strings.Replace(key, "_bucket{", "_count{", 1), `,le="+Inf"`, "", 1)
		count = strings.Replace(count, `le="+Inf",`, "", 1)
		if c, ok := samples[count]; !ok || c != v {
			t.Errorf("%s = %v, but %s = %v", key, v, count, c)
		}
	}
	return samples
}

// series names a sample as parseExposition keys it; labels are name,
// value pairs in any order.
func series(name string, labels ...string) string {
	var l []string
	for i := 0; i+1 < len(labels); i += 2 {
		l = append(l, labels[i]+"="+strconv.Quote(labels[i+1]))
	}
	slices.Sort(l)
	return name + "{" + strings.Join(l, ",") + "}"
}

// scrape gets /metrics over TLS, without authentication, and parses it.
func (e *env) scrape(t *testing.T) map[string]float64 {
	t.Helper()
	r := e.do(t, http.MethodGet, "/metrics", "", nil)
	if r.status != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", r.status, r.body)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type %q, want text/plain; version=0.0.4", ct)
	}
	return parseExposition(t, string(r.body))
}

// checkDeltas compares the change of each series between before and
// after with want; series absent count as 0.
func checkDeltas(t *testing.T, before, after map[string]float64, want map[string]float64) {
	t.Helper()
	for key, d := range want {
		if _, ok := after[key]; !ok {
			t.Errorf("%s is missing from /metrics", key)
			continue
		}
		if got := after[key] - before[key]; got != d {
			t.Errorf("%s went up by %v, want %v", key, got, d)
		}
	}
}

const (
	regTotal = "kiln_dps_registrations_total"
	durCount = "kiln_dps_registration_duration_seconds_count"
	svcTotal = "kiln_dps_service_requests_total"
	billable = "kiln_dps_billable_operations_total"
)

func TestMetricsSymmetricKeyAndService(t *testing.T) {
	e := start(t, devserver.Config{})
	scope := e.srv.IDScope()
	const regID = "metrics-sym-1"

	m0 := e.scrape(t)
	_, primary, _ := e.enrollSymmetricKey(t, regID) // a service PUT
	m1 := e.scrape(t)
	checkDeltas(t, m0, m1, map[string]float64{
		series(svcTotal, "operation", "enrollment.createOrUpdate", "code", "200"): 1,
		series(billable, "operation", "enrollment.createOrUpdate"):                1,
		series(billable, "operation", "device.register"):                          0,
	})

	reg := e.registerSAS(t, regID, dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
	if reg.final.Status != dps.StatusAssigned {
		t.Fatalf("final %s, want assigned", reg.finalRaw)
	}
	bad := e.do(t, http.MethodPut, registerPath(scope, regID), dps.NewDeviceSAS(scope, regID, []byte("wrong key"), time.Now().Add(time.Hour)),
		dps.DeviceRegistration{RegistrationID: regID})
	if bad.status != http.StatusUnauthorized {
		t.Fatalf("register with a wrong key: %d %s", bad.status, bad.body)
	}
	m2 := e.scrape(t)
	checkDeltas(t, m1, m2, map[string]float64{
		series(regTotal, "result", "assigned", "attestation", "symmetricKey", "transport", "https"):     1,
		series(regTotal, "result", "unauthorized", "attestation", "symmetricKey", "transport", "https"): 1,
		series(regTotal, "result", "assigned", "attestation", "tpm", "transport", "https"):              0,
		series(durCount, "attestation", "symmetricKey"):                                                 1,
		series(billable, "operation", "device.register"):                                                1,
		series(billable, "operation", "enrollment.createOrUpdate"):                                      0,
		series(svcTotal, "operation", "enrollment.createOrUpdate", "code", "200"):                       0, // polls are no service requests
	})

	// A service request refused counts by its code and is not billed.
	r := e.do(t, http.MethodGet, "/enrollments/"+regID+"?api-version=2021-10-01", "", nil)
	if r.status != http.StatusUnauthorized {
		t.Fatalf("GET without a token: %d", r.status)
	}
	m3 := e.scrape(t)
	checkDeltas(t, m2, m3, map[string]float64{
		series(svcTotal, "operation", "enrollment.get", "code", "401"): 1,
		series(billable, "operation", "enrollment.get"):                0,
		"kiln_dps_throttled_total{}":                                   0,
		"kiln_hub_telemetry_messages_total{}":                          0,
	})
}

func TestMetricsTPM(t *testing.T) {
	e := start(t, devserver.Config{})
	d := newSoftDevice(t, false)
	ek, _ := d.keys()
	const regID = "metrics-tpm-1"
	e.enroll(t, regID, ek)
	m0 := e.scrape(t)
	reg := e.register(t.Context(), t, regID, d) // the challenge, then the authenticated register
	if reg.final.Status != dps.StatusAssigned {
		t.Fatalf("final %s, want assigned", reg.finalRaw)
	}
	m1 := e.scrape(t)
	checkDeltas(t, m0, m1, map[string]float64{
		series(regTotal, "result", "assigned", "attestation", "tpm", "transport", "https"):     1,
		series(regTotal, "result", "unauthorized", "attestation", "tpm", "transport", "https"): 0, // the challenge is no refusal
		series(durCount, "attestation", "tpm"):                                                 1,
		series(billable, "operation", "device.register"):                                       1,
	})
}

func TestMetricsConcurrentRegistrations(t *testing.T) {
	e := start(t, devserver.Config{})
	scope := e.srv.IDScope()
	const n = 24
	tokens := make([]string, n)
	for i := range n {
		id := fmt.Sprintf("metrics-conc-%d", i)
		_, primary, _ := e.enrollSymmetricKey(t, id)
		tokens[i] = dps.NewDeviceSAS(scope, id, primary, time.Now().Add(time.Hour))
	}
	m0 := e.scrape(t)
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		id := fmt.Sprintf("metrics-conc-%d", i)
		wg.Go(func() { errs <- registerUntilFinal(e, scope, id, tokens[i]) })
		wg.Go(func() { // a refusal for each: a token with the wrong key
			st, _, err := send(e, http.MethodPut, registerPath(scope, id), dps.NewDeviceSAS(scope, id, []byte("no"), time.Now().Add(time.Hour)), dps.DeviceRegistration{RegistrationID: id})
			if err == nil && st != http.StatusUnauthorized {
				err = fmt.Errorf("%s with a wrong key: %d, want 401", id, st)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	m1 := e.scrape(t)
	checkDeltas(t, m0, m1, map[string]float64{
		series(regTotal, "result", "assigned", "attestation", "symmetricKey", "transport", "https"):     n,
		series(regTotal, "result", "unauthorized", "attestation", "symmetricKey", "transport", "https"): n,
		series(durCount, "attestation", "symmetricKey"):                                                 n,
		series(billable, "operation", "device.register"):                                                n,
	})
}

// send makes one request without t, for goroutines.
func send(e *env, method, path, auth string, body any) (int, []byte, error) {
	j, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	req, err := http.NewRequest(method, e.base+path, bytes.NewReader(j))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("Authorization", auth)
	rsp, err := e.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer rsp.Body.Close()
	b, err := io.ReadAll(rsp.Body)
	return rsp.StatusCode, b, err
}

// registerUntilFinal is registerSAS for goroutines: it returns an error
// unless the device ends assigned.
func registerUntilFinal(e *env, scope, regID, token string) error {
	st, b, err := send(e, http.MethodPut, registerPath(scope, regID), token, dps.DeviceRegistration{RegistrationID: regID})
	if err != nil || st != http.StatusAccepted {
		return fmt.Errorf("register %s: %d %s %v", regID, st, b, err)
	}
	var op dps.RegistrationOperationStatus
	if err := json.Unmarshal(b, &op); err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		st, b, err := send(e, http.MethodGet, pollPath(scope, regID, op.OperationID), token, struct{}{})
		if err != nil {
			return err
		}
		if st == http.StatusOK {
			if err := json.Unmarshal(b, &op); err != nil || op.Status != dps.StatusAssigned {
				return fmt.Errorf("%s final %s, want assigned", regID, b)
			}
			return nil
		}
		if st != http.StatusAccepted {
			return fmt.Errorf("poll %s: %d %s", regID, st, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("%s still assigning after 20 s", regID)
}

func TestMetricsMethod(t *testing.T) {
	e := start(t, devserver.Config{})
	if r := e.do(t, http.MethodPost, "/metrics", "", nil); r.status != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics: %d, want 405", r.status)
	}
}

// TestMetricsBillableTable follows DPS's table of billable operations: a
// register is billed, its polls and a registration status lookup are not
// (and have no series), service API calls are, and the CA certificate API
// is not.
func TestMetricsBillableTable(t *testing.T) {
	e := start(t, devserver.Config{})
	scope := e.srv.IDScope()
	const regID = "metrics-billable-1"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	tok := dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour))
	m0 := e.scrape(t)
	reg := e.registerSAS(t, regID, tok) // one register, one or more polls
	if reg.final.Status != dps.StatusAssigned {
		t.Fatalf("final %s, want assigned", reg.finalRaw)
	}
	for range 3 {
		if r := e.do(t, http.MethodPost, "/"+scope+"/registrations/"+regID+"?api-version=2019-03-31", tok, dps.DeviceRegistration{RegistrationID: regID}); r.status != http.StatusOK {
			t.Fatalf("registration status lookup: %d %s", r.status, r.body)
		}
	}
	e.service(t, http.MethodGet, "/registrations/"+regID, nil)
	ca := newTestCA(t, "Billable test CA")
	caPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}))
	if r := e.service(t, http.MethodPut, "/certificates/billable-ca", map[string]any{"properties": map[string]any{"certificate": caPEM}}); r.status != http.StatusOK {
		t.Fatalf("upload CA: %d %s", r.status, r.body)
	}
	m1 := e.scrape(t)
	checkDeltas(t, m0, m1, map[string]float64{
		series(billable, "operation", "device.register"):                           1,
		series(billable, "operation", "registrationState.get"):                     1,
		series(svcTotal, "operation", "certificate.createOrUpdate", "code", "200"): 1,
	})
	var sum0, sum1 float64
	for k, v := range m0 {
		if strings.HasPrefix(k, billable+"{") {
			sum0 += v
		}
	}
	for k, v := range m1 {
		if strings.HasPrefix(k, billable+"{") {
			sum1 += v
		}
		if strings.HasPrefix(k, billable+"{") && (strings.Contains(k, "device.") && !strings.Contains(k, `"device.register"`) || strings.Contains(k, "certificate")) {
			t.Errorf("%s is billed; DPS bills no lookup, poll or certificate operation", k)
		}
	}
	if sum1-sum0 != 2 {
		t.Errorf("%v billable operations, want 2 (the register and the registration state read)", sum1-sum0)
	}
}

// TestServiceOperationLog: every service API request is logged once, as a
// structured "service operation" line with its operation, status and
// tracking ID (the one of its error body when it fails); no line holds a
// key or a token.
func TestServiceOperationLog(t *testing.T) {
	logs := &syncBuffer{}
	e := start(t, devserver.Config{Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	_, primary, _ := e.enrollSymmetricKey(t, "oplog-1")
	e.service(t, http.MethodGet, "/enrollments/oplog-1", nil)
	missing := e.service(t, http.MethodGet, "/enrollments/oplog-none", nil).errorBody(t, http.StatusNotFound)

	type line struct {
		Msg        string `json:"msg"`
		TrackingID string `json:"trackingId"`
		Operation  string `json:"operation"`
		Status     int    `json:"status"`
	}
	var ops []line
	for _, raw := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if strings.Contains(raw, dps.EncodeKey(primary)) || strings.Contains(raw, "SharedAccessSignature") {
			t.Errorf("a log line holds a secret: %s", raw)
		}
		var l line
		if err := json.Unmarshal([]byte(raw), &l); err != nil {
			t.Fatalf("not a JSON log line: %s", raw)
		}
		if l.Msg == "service operation" {
			ops = append(ops, l)
		}
	}
	want := []line{
		{"service operation", "", "enrollment.createOrUpdate", 200},
		{"service operation", "", "enrollment.get", 200},
		{"service operation", missing.TrackingID, "enrollment.get", 404},
	}
	if len(ops) != len(want) {
		t.Fatalf("service operation lines %+v, want %d", ops, len(want))
	}
	seen := map[string]bool{}
	for i, w := range want {
		got := ops[i]
		if got.Operation != w.Operation || got.Status != w.Status || len(got.TrackingID) != 36 || seen[got.TrackingID] {
			t.Errorf("line %d: %+v, want %s %d with a tracking ID of its own", i, got, w.Operation, w.Status)
		}
		if w.TrackingID != "" && got.TrackingID != w.TrackingID {
			t.Errorf("line %d: trackingId %s, the error body's is %s", i, got.TrackingID, w.TrackingID)
		}
		seen[got.TrackingID] = true
	}
}
