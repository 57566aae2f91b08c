package devserver

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// DPS's limits (dps-protocol.md §10, "IoT Hub DPS limits" on Microsoft
// Learn), the values of DPSQuotas.
const (
	DPSRegistrationsPerMinute = 1000
	DPSOperationsPerMinute    = 1000
	DPSPollsPerDevice         = 5
	DPSPollWindow             = 10 * time.Second
	DPSMaxEnrollments         = 1_000_000
	DPSMaxRegistrations       = 1_000_000
	DPSMaxLinkedHubs          = 50
	DPSMaxMessageBytes        = 96 << 10
)

// Quotas are the limits and throttles of a Server, as DPS's (§10).
//
// The rate quotas throttle: a request over one is refused with HTTP 429
// (over MQTT res/429) and a retry-after of the whole seconds until the
// quota admits it again; the SDKs wait that long and resend. Their zero
// value throttles nothing, which keeps the station's embedded DPS at line
// speed; DPSQuotas sets DPS's own. Each is a sliding window: at most N
// requests in any window of the given length.
//
// The count limits refuse a create that would go over them with 409 and
// errorCode 409001 (retrying does not help until something is deleted);
// too many linked hubs make New fail, and a message over the limit is
// refused with 400 (HTTPS) or ends the connection (MQTT). Their zero
// value is DPS's limit; a negative value removes the limit (NoQuotas).
type Quotas struct {
	// RegistrationsPerMinute throttles the device register requests of
	// the whole service (every transport; a TPM device's challenge is a
	// register request too), and the registration status lookups.
	// DPS: 1,000. Zero: not throttled.
	RegistrationsPerMinute int
	// OperationsPerMinute throttles the service API requests (enrollments,
	// groups, registration states, bulk, queries). DPS: 1,000. Zero: not
	// throttled.
	OperationsPerMinute int
	// PollsPerDevice is how many operation status polls one device (by
	// registration ID) may send in PollWindow. DPS: 5 per 10 s. Zero: not
	// throttled.
	PollsPerDevice int
	// PollWindow is the window of PollsPerDevice; zero means 10 s.
	PollWindow time.Duration

	// MaxEnrollments is the most individual enrollments the service
	// holds. DPS: 1,000,000.
	MaxEnrollments int
	// MaxRegistrations is the most device registration states the service
	// holds (a device's first register makes one). DPS: 1,000,000.
	MaxRegistrations int
	// MaxSymmetricKeyGroups and MaxX509Groups are the most enrollment
	// groups of each attestation type. DPS: 100 each.
	MaxSymmetricKeyGroups int
	MaxX509Groups         int
	// MaxLinkedHubs is the most linked hubs Config.Hubs may list. DPS: 50.
	MaxLinkedHubs int
	// MaxMessageBytes is the largest request body (HTTPS) or publish
	// payload (MQTT) accepted. DPS: 96 KB. Zero or negative: 96 KB (a
	// message limit cannot be removed).
	MaxMessageBytes int
	// MaxBulkItems is the most enrollments or groups one bulk operation
	// may carry. DPS: 10. Zero: DPS's; negative: no count limit (the
	// message limit still applies).
	MaxBulkItems int
}

// DPSQuotas returns DPS's limits and throttles, as `kiln serve` applies
// them by default.
func DPSQuotas() Quotas {
	return Quotas{
		RegistrationsPerMinute: DPSRegistrationsPerMinute,
		OperationsPerMinute:    DPSOperationsPerMinute,
		PollsPerDevice:         DPSPollsPerDevice,
		PollWindow:             DPSPollWindow,
	}
}

// NoQuotas returns quotas that neither throttle nor limit counts (the
// message limit stays DPS's): the station's embedded DPS, which must keep
// line speed and in which an enrollment accumulates for every unit made.
func NoQuotas() Quotas {
	return Quotas{MaxEnrollments: -1, MaxRegistrations: -1, MaxSymmetricKeyGroups: -1, MaxX509Groups: -1, MaxLinkedHubs: -1}
}

// limit resolves a count limit: zero is def, negative is none (0).
func limit(v, def int) int {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

func (q Quotas) enrollments() int   { return limit(q.MaxEnrollments, DPSMaxEnrollments) }
func (q Quotas) registrations() int { return limit(q.MaxRegistrations, DPSMaxRegistrations) }
func (q Quotas) linkedHubs() int    { return limit(q.MaxLinkedHubs, DPSMaxLinkedHubs) }
func (q Quotas) bulkItems() int     { return limit(q.MaxBulkItems, dps.MaxBulkItems) }

func (q Quotas) messageBytes() int {
	if q.MaxMessageBytes <= 0 {
		return DPSMaxMessageBytes
	}
	return q.MaxMessageBytes
}

// groups is the most groups of an attestation type.
func (q Quotas) groups(symmetricKey bool) int {
	if symmetricKey {
		return limit(q.MaxSymmetricKeyGroups, MaxSymmetricKeyGroups)
	}
	return limit(q.MaxX509Groups, MaxX509Groups)
}

// check validates the quotas. Kinds: Invalid.
func (q Quotas) check() error {
	const op = "check quotas"
	for _, v := range []struct {
		name string
		n    int
	}{{"registrations per minute", q.RegistrationsPerMinute}, {"service operations per minute", q.OperationsPerMinute}, {"polls per device", q.PollsPerDevice}} {
		if v.n < 0 {
			return station.Errorf(op, station.KindInvalid, "%s is %d: give 0 (no throttle) or more", v.name, v.n)
		}
	}
	if q.PollWindow < 0 {
		return station.Errorf(op, station.KindInvalid, "the poll window is %s: give a positive duration, or 0 for 10 s", q.PollWindow)
	}
	return nil
}

// ErrorCodes of throttled answers (HTTP 429), one per rate quota.
const (
	codeThrottledRegistrations = 429001
	codeThrottledOperations    = 429002
	codeThrottledPolls         = 429003
)

// throttled is the cause of a request refused by a rate quota: errorStatus
// answers it with 429 and code, writeError and the MQTT transport with a
// retry-after of wait.
type throttled struct {
	what string // "device registrations", ...
	n    int
	per  time.Duration
	code int
	wait time.Duration
}

func (t *throttled) Error() string {
	return fmt.Sprintf("too many %s: this service takes %d per %s; retry after %s s", t.what, t.n, perText(t.per), retryAfter(t.wait))
}

func perText(d time.Duration) string {
	if d == time.Minute {
		return "minute"
	}
	return d.String()
}

// throttleOf returns the throttle inside err, nil when there is none.
func throttleOf(err error) *throttled {
	var t *throttled
	if errors.As(err, &t) {
		return t
	}
	return nil
}

// window is a sliding-window log: the times of the last n requests it
// admitted, in a ring. It admits a request when fewer than n were admitted
// in the window before it.
type window struct {
	times []time.Time
	next  int // the oldest entry once the ring is full
}

// admit admits a request at now, or returns how long until it would be.
func (w *window) admit(now time.Time, n int, per time.Duration) (bool, time.Duration) {
	if len(w.times) < n {
		w.times = append(w.times, now)
		return true, 0
	}
	oldest := w.times[w.next]
	if wait := oldest.Add(per).Sub(now); wait > 0 {
		return false, wait
	}
	w.times[w.next] = now
	w.next = (w.next + 1) % n
	return true, 0
}

// newest is the time of the last admitted request.
func (w *window) newest() time.Time {
	if len(w.times) == 0 {
		return time.Time{}
	}
	return w.times[(w.next+len(w.times)-1)%len(w.times)]
}

// sweepEvery is how many new devices the poll throttle meets between two
// sweeps of the devices whose window has emptied.
const sweepEvery = 1024

// throttles holds the state of a Server's rate quotas. Its zero value is
// ready; mu guards every field.
type throttles struct {
	mu            sync.Mutex
	registrations window
	operations    window
	polls         map[string]*window // by lower-case registration ID
	added         int                // devices added to polls since the last sweep
}

// throttle admits a request of a rate quota at now or returns its
// throttled error (Kind Unavailable, a *throttled inside) and counts it in
// the metrics. n zero: no throttle.
func (s *Server) throttle(op string, w *window, t throttled) error {
	if t.n <= 0 {
		return nil
	}
	s.throttles.mu.Lock()
	ok, wait := w.admit(s.now(), t.n, t.per)
	s.throttles.mu.Unlock()
	if ok {
		return nil
	}
	s.countThrottled()
	t.wait = wait
	return station.E(op, station.KindUnavailable, &t)
}

// throttleRegistration applies RegistrationsPerMinute to a register or
// lookup request.
func (s *Server) throttleRegistration() error {
	return s.throttle("register device", &s.throttles.registrations, throttled{
		what: "device registrations", n: s.cfg.Quotas.RegistrationsPerMinute, per: time.Minute, code: codeThrottledRegistrations})
}

// throttleService applies OperationsPerMinute to a request of the service
// API; device API and /metrics requests pass.
func (s *Server) throttleService(method string, segs []string) error {
	if op := serviceOperation(method, segs); op == "" {
		return nil
	}
	return s.throttle("service operation", &s.throttles.operations, throttled{
		what: "service operations", n: s.cfg.Quotas.OperationsPerMinute, per: time.Minute, code: codeThrottledOperations})
}

// throttlePoll applies PollsPerDevice to an operation status poll of
// registrationID.
func (s *Server) throttlePoll(registrationID string) error {
	q := s.cfg.Quotas
	if q.PollsPerDevice <= 0 {
		return nil
	}
	per := q.PollWindow
	if per == 0 {
		per = DPSPollWindow
	}
	now := s.now()
	th := &s.throttles
	th.mu.Lock()
	id := strings.ToLower(registrationID)
	w, ok := th.polls[id]
	if !ok {
		if th.polls == nil {
			th.polls = map[string]*window{}
		}
		if th.added++; th.added >= sweepEvery {
			th.added = 0
			for k, v := range th.polls {
				if now.Sub(v.newest()) >= per {
					delete(th.polls, k)
				}
			}
		}
		w = &window{}
		th.polls[id] = w
	}
	th.mu.Unlock()
	return s.throttle("poll operation", w, throttled{
		what: "operation status polls of device " + registrationID, n: q.PollsPerDevice, per: per, code: codeThrottledPolls})
}

// writeRetryAfter sets the retry-after header of a throttled answer.
func writeRetryAfter(w http.ResponseWriter, err error) {
	if t := throttleOf(err); t != nil {
		w.Header()["retry-after"] = []string{retryAfter(t.wait)} // lower case, verbatim (§11.1)
	}
}
