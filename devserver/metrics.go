package devserver

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// metricsContentType is the media type of the Prometheus text exposition
// format that GET /metrics answers with.
const metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

// Label values of kiln_dps_registrations_total, in the order they are
// exposed.
var (
	registrationResults = []string{"assigned", "failed", "disabled", "unauthorized", "error"}
	attestationLabels   = []string{"tpm", "symmetricKey", "x509"}
	transportLabels     = []string{"https", "mqtt"}
)

// registrationBuckets are the upper bounds, in seconds, of the buckets of
// kiln_dps_registration_duration_seconds.
var registrationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// opDeviceRegister is the device API's one billable operation.
const opDeviceRegister = "device.register"

// billableOperations is DPS's table of billable operations ("Billable
// service operations and pricing" in "What is Azure IoT Hub Device
// Provisioning Service?" on Microsoft Learn), kept here and nowhere else.
// Of the device API (runtime registration) only Register Device is
// billable: the Device Registration Status Lookup and the Operation Status
// Lookup (the polls) are not. Every operation of the service APIs for
// device registration states, enrollment groups and individual enrollments
// is billable (create or update, get, delete, query, attestation
// mechanism, bulk). The DPS Certificate API (certificates.go) and the
// resource API are not. Kiln counts an operation when it succeeds: a
// service answer of 2xx, a register answered 202 (not the TPM challenge,
// which starts no registration; whether DPS bills that 401 is not
// documented).
var billableOperations = []string{
	opDeviceRegister,
	"enrollment.attestationMechanism",
	"enrollment.bulk",
	"enrollment.createOrUpdate",
	"enrollment.delete",
	"enrollment.get",
	"enrollment.query",
	"enrollmentGroup.attestationMechanism",
	"enrollmentGroup.bulk",
	"enrollmentGroup.createOrUpdate",
	"enrollmentGroup.delete",
	"enrollmentGroup.get",
	"enrollmentGroup.query",
	"registrationState.delete",
	"registrationState.get",
	"registrationState.query",
}

// maxPendingRegistrations bounds how many registration IDs whose first
// register request (the TPM challenge) is remembered for the duration
// histogram; beyond it, durations start at the authenticated register.
const maxPendingRegistrations = 10000

// metrics holds the server's Prometheus counters. Its zero value is ready;
// mu guards every field.
type metrics struct {
	mu            sync.Mutex
	registrations [5][3][2]uint64 // result × attestation × transport
	histograms    [3]histogram    // by attestation
	service       map[serviceKey]uint64
	throttled     uint64
	billable      map[string]uint64
	telemetry     uint64
	firstRequest  map[string]time.Time     // lower-case registration ID → first register request
	operations    map[string]operationInfo // operation ID → what the result is counted under
}

type serviceKey struct {
	operation string
	code      int
}

type histogram struct {
	counts [14]uint64 // registrationBuckets, then +Inf
	sum    float64
	count  uint64
}

// operationInfo is what an accepted registration is counted under when its
// assignment ends.
type operationInfo struct {
	attestation, transport int
	start                  time.Time
}

func (h *histogram) observe(v float64) {
	i, _ := slices.BinarySearch(registrationBuckets, v) // first bound ≥ v
	h.counts[i]++
	h.sum += v
	h.count++
}

// attestationIndex is the attestation label of a device request: the
// enrollment's type when the request found one, else what the request
// looks like (a client certificate without SAS: X.509; a TPM body, or no
// credentials at all as in a TPM challenge: TPM; else symmetric key).
func attestationIndex(d *deviceRequest) int {
	if d.enrollment != nil {
		switch strings.ToLower(d.enrollment.Attestation.Type) {
		case strings.ToLower(dps.AttestationTPM):
			return 0
		case strings.ToLower(dps.AttestationX509):
			return 2
		default:
			return 1
		}
	}
	switch {
	case d.x509 != nil || d.authorization == "" && len(d.clientChain()) > 0:
		return 2
	case d.body != nil && d.body.TPM != nil || d.authorization == "":
		return 0
	}
	return 1
}

func transportIndex(d *deviceRequest) int {
	if d.transport == "mqtt" {
		return 1
	}
	return 0
}

// noteRegisterRequest remembers when the first register request of d's
// registration came (a TPM device's challenge, or the authenticated
// register), where the duration histogram starts.
func (s *Server) noteRegisterRequest(d *deviceRequest) {
	m := &s.metrics
	now := s.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.firstRequest == nil {
		m.firstRequest = map[string]time.Time{}
	}
	id := strings.ToLower(d.registrationID)
	if _, ok := m.firstRequest[id]; !ok && len(m.firstRequest) < maxPendingRegistrations {
		m.firstRequest[id] = now
	}
}

// countRegistrationRefused counts a register request refused before an
// operation started: unauthorized, or error for any other reason. A nil d
// (the body could not be read) is not counted.
func (s *Server) countRegistrationRefused(d *deviceRequest, err error) {
	if d == nil {
		return
	}
	s.noteRefusal(d, err)
	result := 4
	if station.KindOf(err) == station.KindUnauthorized {
		result = 3
	}
	m := &s.metrics
	m.mu.Lock()
	defer m.mu.Unlock()
	m.registrations[result][attestationIndex(d)][transportIndex(d)]++
	delete(m.firstRequest, strings.ToLower(d.registrationID))
}

// countRegistrationAccepted records operation opID of d, started now, so
// that countRegistrationDone can count its result, and counts the billable
// register. Call it before the assignment starts.
func (s *Server) countRegistrationAccepted(opID string, d *deviceRequest) {
	m := &s.metrics
	now := s.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	id := strings.ToLower(d.registrationID)
	start, ok := m.firstRequest[id]
	if !ok {
		start = now
	}
	delete(m.firstRequest, id)
	if m.operations == nil {
		m.operations = map[string]operationInfo{}
	}
	m.operations[opID] = operationInfo{attestation: attestationIndex(d), transport: transportIndex(d), start: start}
	m.addBillable(opDeviceRegister)
}

// countRegistrationDone counts the final state of operation opID
// (dps.StatusAssigned, StatusFailed, StatusDisabled, or "error" when the
// assignment could not run) and its duration from the first register
// request. Operations this process did not accept (resumed at New) are
// not counted.
func (s *Server) countRegistrationDone(opID, status string) {
	m := &s.metrics
	now := s.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.operations[opID]
	if !ok {
		return
	}
	delete(m.operations, opID)
	result := 4
	switch status {
	case dps.StatusAssigned:
		result = 0
	case dps.StatusFailed:
		result = 1
	case dps.StatusDisabled:
		result = 2
	}
	m.registrations[result][o.attestation][o.transport]++
	m.histograms[o.attestation].observe(max(now.Sub(o.start), 0).Seconds())
}

// countThrottled counts a request refused with 429 by a rate quota
// (Server.throttle).
func (s *Server) countThrottled() {
	s.metrics.mu.Lock()
	s.metrics.throttled++
	s.metrics.mu.Unlock()
}

func (m *metrics) addBillable(operation string) {
	if !slices.Contains(billableOperations, operation) {
		return
	}
	if m.billable == nil {
		m.billable = map[string]uint64{}
	}
	m.billable[operation]++
}

// countHubTelemetry counts one telemetry message received by a hub whose
// directory is this server.
func (s *Server) countHubTelemetry() {
	s.metrics.mu.Lock()
	s.metrics.telemetry++
	s.metrics.mu.Unlock()
}

// countTelemetry counts a telemetry message in the metrics of the hub's
// directory, when that is a Server (as StartEmbedded wires them).
func (h *Hub) countTelemetry() {
	if c, ok := h.cfg.Directory.(interface{ countHubTelemetry() }); ok {
		c.countHubTelemetry()
	}
}

// countServiceRequest wraps *w to see the status of a service API request
// with path segments segs, and returns the function that counts it (by
// operation and status code, and as billable when it succeeded). Device
// API and /metrics requests are left alone. Use it as
//
//	defer s.countServiceRequest(&w, r.Method, segs, trackingID)()
func (s *Server) countServiceRequest(w *http.ResponseWriter, method string, segs []string, trackingID string) func() {
	op := serviceOperation(method, segs)
	if op == "" {
		return func() {}
	}
	sw := &statusWriter{ResponseWriter: *w}
	*w = sw
	start := s.now()
	return func() {
		code := sw.code
		if code == 0 {
			code = http.StatusOK
		}
		// One line per service operation, like DPS's ServiceOperations
		// log; the trackingId is the one of the error body, if any.
		s.log.Info("service operation", "trackingId", trackingID, "operation", op, "method", method,
			"status", code, "durationMs", s.now().Sub(start).Milliseconds())
		m := &s.metrics
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.service == nil {
			m.service = map[serviceKey]uint64{}
		}
		m.service[serviceKey{op, code}]++
		if code >= 200 && code < 300 {
			m.addBillable(op)
		}
	}
}

// serviceOperation names the service API operation of a request, in the
// order serveHTTP routes; "" for the device API and /metrics, "unknown"
// for paths that are no operation.
func serviceOperation(method string, segs []string) string {
	is := strings.EqualFold
	post := method == http.MethodPost
	crud := func(kind string) string {
		switch method {
		case http.MethodPut:
			return kind + ".createOrUpdate"
		case http.MethodGet:
			return kind + ".get"
		case http.MethodDelete:
			return kind + ".delete"
		}
		return kind + ".other"
	}
	kind := func(seg string) string {
		if is(seg, "enrollmentGroups") {
			return "enrollmentGroup"
		}
		return "enrollment"
	}
	n := len(segs)
	switch {
	case n == 1 && segs[0] == "metrics":
		return ""
	case n == 1 && is(segs[0], "certificates"):
		return "certificate.list"
	case n == 2 && is(segs[0], "certificates"):
		return crud("certificate")
	case n == 3 && is(segs[0], "certificates") && is(segs[2], "generateVerificationCode"):
		return "certificate.generateVerificationCode"
	case n == 3 && is(segs[0], "certificates") && is(segs[2], "verify"):
		return "certificate.verify"
	case n == 1 && (is(segs[0], "enrollments") || is(segs[0], "enrollmentGroups")):
		return kind(segs[0]) + ".bulk"
	case n == 2 && post && (is(segs[0], "enrollments") || is(segs[0], "enrollmentGroups")) && is(segs[1], "query"):
		return kind(segs[0]) + ".query"
	case n == 2 && is(segs[0], "enrollmentGroups"):
		return crud("enrollmentGroup")
	case n == 3 && is(segs[0], "enrollmentGroups") && is(segs[2], "attestationmechanism"):
		return "enrollmentGroup.attestationMechanism"
	case n == 3 && post && is(segs[0], "registrations") && is(segs[2], "query"),
		n == 4 && is(segs[0], "enrollmentGroups") && is(segs[2], "registrations") && is(segs[3], "query"):
		return "registrationState.query"
	case n == 4 && is(segs[1], "registrations") && is(segs[3], "register"),
		n == 5 && is(segs[1], "registrations") && is(segs[3], "operations"),
		n == 3 && is(segs[1], "registrations"):
		return "" // the device API
	case n == 2 && is(segs[0], "enrollments"):
		return crud("enrollment")
	case n == 3 && is(segs[0], "enrollments") && is(segs[2], "attestationmechanism"):
		return "enrollment.attestationMechanism"
	case n == 2 && is(segs[0], "registrations"):
		return crud("registrationState")
	}
	return "unknown"
}

// statusWriter records the status code of an answer.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// serveMetrics answers GET /metrics: the server's counters in the
// Prometheus text exposition format 0.0.4, without authentication, as
// Prometheus scrapes. Series come in a stable order.
func (s *Server) serveMetrics(w http.ResponseWriter, _ *http.Request) {
	var b strings.Builder
	s.writeMetrics(&b)
	w.Header().Set("Content-Type", metricsContentType)
	w.Header().Set("Cache-Control", "no-store")
	io.WriteString(w, b.String())
}

func (s *Server) writeMetrics(b *strings.Builder) {
	m := &s.metrics
	m.mu.Lock()
	defer m.mu.Unlock()

	header := func(name, typ, help string) {
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	header("kiln_dps_registrations_total", "counter",
		"Device registrations by result (assigned, failed, disabled: the final state; unauthorized, error: the register request was refused), attestation and transport.")
	for r, result := range registrationResults {
		for a, att := range attestationLabels {
			for t, tr := range transportLabels {
				fmt.Fprintf(b, "kiln_dps_registrations_total{result=%q,attestation=%q,transport=%q} %d\n",
					result, att, tr, m.registrations[r][a][t])
			}
		}
	}

	const hist = "kiln_dps_registration_duration_seconds"
	header(hist, "histogram", "Time from a device's first register request to the final state of its registration, by attestation.")
	for a, att := range attestationLabels {
		h := &m.histograms[a]
		var cum uint64
		for i, le := range registrationBuckets {
			cum += h.counts[i]
			fmt.Fprintf(b, "%s_bucket{attestation=%q,le=%q} %d\n", hist, att, formatFloat(le), cum)
		}
		cum += h.counts[len(registrationBuckets)]
		fmt.Fprintf(b, "%s_bucket{attestation=%q,le=\"+Inf\"} %d\n", hist, att, cum)
		fmt.Fprintf(b, "%s_sum{attestation=%q} %s\n", hist, att, formatFloat(h.sum))
		fmt.Fprintf(b, "%s_count{attestation=%q} %d\n", hist, att, h.count)
	}

	header("kiln_dps_service_requests_total", "counter", "Service API requests by operation and HTTP status code.")
	keys := make([]serviceKey, 0, len(m.service))
	for k := range m.service {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(x, y serviceKey) int {
		if c := strings.Compare(x.operation, y.operation); c != 0 {
			return c
		}
		return x.code - y.code
	})
	for _, k := range keys {
		fmt.Fprintf(b, "kiln_dps_service_requests_total{operation=%q,code=\"%d\"} %d\n", k.operation, k.code, m.service[k])
	}

	header("kiln_dps_throttled_total", "counter", "Requests refused with 429 by a quota.")
	fmt.Fprintf(b, "kiln_dps_throttled_total %d\n", m.throttled)

	header("kiln_dps_billable_operations_total", "counter", "Operations DPS would bill, following its table of billable operations.")
	for _, op := range billableOperations {
		fmt.Fprintf(b, "kiln_dps_billable_operations_total{operation=%q} %d\n", op, m.billable[op])
	}

	header("kiln_hub_telemetry_messages_total", "counter", "Telemetry messages received by the embedded hub.")
	fmt.Fprintf(b, "kiln_hub_telemetry_messages_total %d\n", m.telemetry)
}

// formatFloat writes a sample value or bucket bound as Prometheus does.
func formatFloat(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
