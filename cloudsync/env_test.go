package cloudsync_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// throttle stands in front of the real devserver's service API. It counts,
// per registration ID, the bulk items the DPS accepted, so that a test can
// tell a duplicate write from a retry; it can fail requests with 503 and
// stop a bulk operation before or after the DPS applies it (hook).
//
// With ops > 0 it also enforces a quota of its own: at most ops requests
// per fixed window, the rest answered 429 with a retry-after of the rest
// of the window, in whole seconds as DPS sends it. Most tests leave that
// to the devserver's own quota (startQuotaTarget: operations per minute in
// a sliding window, 429 + retry-after, as DPS). Only the tests that must
// see pacing or throttling within a few seconds use this one, because a
// window can be a second here while the devserver's, like DPS's, is a
// minute: a push that overruns the devserver's quota waits up to a minute
// for its retry-after.
type throttle struct {
	next   http.Handler
	ops    int // 0: no quota of its own
	window time.Duration
	// fail5xx, when > 0, answers 503 (without retry-after) to every
	// fail5xx-th request that the quota lets through.
	fail5xx int
	// hook, when set, is called around each bulk operation the quota lets
	// through: with "before" when it reaches the DPS, "after" when the
	// DPS has applied it and before the answer leaves.
	hook func(stage string)

	mu        sync.Mutex
	start     time.Time
	first     time.Time
	count     int
	seen      int
	throttled int
	failed    int
	passed    int
	writes    map[string]int // lower-case registration ID → accepted writes
}

func (t *throttle) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t.mu.Lock()
	now := time.Now()
	if t.start.IsZero() {
		t.start, t.first = now, now
	}
	if el := now.Sub(t.start); t.ops > 0 && el >= t.window {
		t.start = t.start.Add(el - el%t.window)
		t.count = 0
	}
	if t.ops > 0 && t.count >= t.ops {
		rest := t.window - now.Sub(t.start)
		t.throttled++
		t.mu.Unlock()
		w.Header().Set("Retry-After", fmt.Sprint(int(math.Ceil(rest.Seconds()))))
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusTooManyRequests)
		json.NewEncoder(w).Encode(dps.ErrorDetails{ErrorCode: dps.CodeThrottled, Message: "Operations quota exceeded: retry later"})
		return
	}
	t.count++
	t.seen++
	fail := t.fail5xx > 0 && t.seen%t.fail5xx == 0
	if fail {
		t.failed++
	} else {
		t.passed++
	}
	t.mu.Unlock()
	if fail {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"errorCode":503000,"message":"Service unavailable: retry"}`)
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/enrollments" {
		t.next.ServeHTTP(w, r)
		return
	}
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	t.mu.Lock()
	hook := t.hook
	t.mu.Unlock()
	if hook != nil {
		hook("before")
	}
	rec := httptest.NewRecorder()
	t.next.ServeHTTP(rec, r)
	if hook != nil {
		hook("after")
	}
	var op dps.BulkEnrollmentOperation
	var res dps.BulkEnrollmentOperationResult
	if rec.Code == http.StatusOK && json.Unmarshal(body, &op) == nil && json.Unmarshal(rec.Body.Bytes(), &res) == nil && op.Mode != dps.BulkDelete {
		refused := map[string]bool{}
		for _, e := range res.Errors {
			refused[strings.ToLower(e.RegistrationID)] = true
		}
		t.mu.Lock()
		for _, e := range op.Enrollments {
			if id := strings.ToLower(e.RegistrationID); !refused[id] {
				t.writes[id]++
			}
		}
		t.mu.Unlock()
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

// stats returns the answers 429 and 503 so far.
func (t *throttle) stats() (throttled, failed int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.throttled, t.failed
}

func (t *throttle) setHook(h func(stage string)) {
	t.mu.Lock()
	t.hook = h
	t.mu.Unlock()
}

// duplicated returns how many registration IDs the DPS accepted more than
// one write for, and how many it accepted at all.
func (t *throttle) duplicated() (dups, ids int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, n := range t.writes {
		if n > 1 {
			dups++
		}
	}
	return dups, len(t.writes)
}

// dpsTarget is a real devserver behind a throttle, on a real TLS listener.
type dpsTarget struct {
	srv    *devserver.Server
	th     *throttle
	ts     *httptest.Server
	target *station.Target // unsealed fields; seal with a Sealer
	conn   string
	skew   atomic.Int64 // how far the DPS's clock is ahead of time.Now (ns)
}

// skip moves the DPS's clock on by d: its quota windows see d pass.
func (d *dpsTarget) skip(by time.Duration) { d.skew.Add(int64(by)) }

const testHost = "dps.kiln.test"

// startTarget starts a devserver without quotas behind a throttle that
// admits ops requests per fixed window (see throttle for when a test
// needs that).
func startTarget(t testing.TB, ops int, window time.Duration) *dpsTarget {
	t.Helper()
	d := newTarget(t, devserver.Quotas{}, ops, window)
	d.target.OpsPerMinute = int(float64(ops) * float64(time.Minute) / float64(window))
	return d
}

// startQuotaTarget starts a devserver that throttles its service API
// itself, as DPS does: opsPerMinute operations in any minute (a sliding
// window), the rest refused with 429 and a retry-after.
func startQuotaTarget(t testing.TB, opsPerMinute int) *dpsTarget {
	t.Helper()
	d := newTarget(t, devserver.Quotas{OperationsPerMinute: opsPerMinute}, 0, 0)
	d.target.OpsPerMinute = opsPerMinute
	return d
}

func newTarget(t testing.TB, q devserver.Quotas, ops int, window time.Duration) *dpsTarget {
	d := &dpsTarget{}
	srv, err := devserver.New(devserver.Config{DataDir: t.TempDir(), HostName: testHost, Quotas: q,
		Now: func() time.Time { return time.Now().Add(time.Duration(d.skew.Load())) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	th := &throttle{next: srv.Handler(), ops: ops, window: window, writes: map[string]int{}}
	ts := httptest.NewUnstartedServer(th)
	ts.EnableHTTP2 = false
	ts.StartTLS()
	t.Cleanup(ts.Close)
	trust := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})
	d.srv, d.th, d.ts, d.conn = srv, th, ts, srv.ServiceConnectionString()
	d.target = &station.Target{Name: "test-dps", TrustPEM: trust, BaseURL: ts.URL}
	return d
}

// station is a station data directory: its store and sealer.
type stationDir struct {
	dir    string
	store  *sqlite.Store
	sealer *cloudsync.Sealer
}

func openStation(t testing.TB, dir string) *stationDir {
	t.Helper()
	st, err := sqlite.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	sl, err := cloudsync.LoadSealer(filepath.Join(dir, cloudsync.KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return &stationDir{dir: dir, store: st, sealer: sl}
}

// addTarget seals d's connection string into s's store.
func (s *stationDir) addTarget(t testing.TB, d *dpsTarget, conn string) *station.Target {
	t.Helper()
	tg := *d.target
	if err := s.sealer.SealTarget(&tg, conn); err != nil {
		t.Fatal(err)
	}
	if err := s.store.PutTarget(context.Background(), &tg); err != nil {
		t.Fatal(err)
	}
	return &tg
}

// fakeEK returns the TPM2B_PUBLIC of an RSA-2048 EK (the standard EK
// template) with a random modulus: distinct per unit, and parsed by DPS
// like any EK. Generating real RSA keys for thousands of units would take
// minutes and prove nothing more about a push.
func fakeEK(t testing.TB) []byte {
	n := make([]byte, 256)
	if _, err := rand.Read(n); err != nil {
		t.Fatal(err)
	}
	n[0] |= 0x80
	n[255] |= 1
	tmpl := tpm2.RSAEKTemplate
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: n})
	return tpm2.Marshal(tpm2.New2B(tmpl))
}

// sealedBatch records n TPM units in a new batch, seals it and binds it to
// target with template tmpl.
func (s *stationDir) sealedBatch(t testing.TB, name string, n int, target string, tmpl station.EnrollmentTemplate) *station.Batch {
	t.Helper()
	ctx := context.Background()
	b := &station.Batch{Name: name}
	if err := s.store.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		ek := fakeEK(t)
		u := &station.Unit{Serial: fmt.Sprintf("%s-%05d", name, i), RegistrationID: station.RegistrationIDFromEK(ek),
			Method: station.MethodTPM, Model: "KX-1", Firmware: "1.0.0", EKHash: station.EKHash(ek), EKPublic: ek,
			Station: "line-1", Operator: "ada"}
		if err := s.store.RecordUnit(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.store.AddUnit(ctx, b.ID, u.Serial); err != nil {
			t.Fatal(err)
		}
	}
	if target != "" {
		if err := s.store.SetBatchTarget(ctx, b.ID, target, tmpl); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.store.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	b, err := s.store.Batch(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pusher returns a pusher of s's batches to target tg.
func (s *stationDir) pusher(t testing.TB, tg *station.Target, q cloudsync.Quota) *cloudsync.Pusher {
	t.Helper()
	svc, err := cloudsync.NewServiceClient(tg, s.sealer)
	if err != nil {
		t.Fatal(err)
	}
	return &cloudsync.Pusher{Store: s.store, Service: svc, Quota: q}
}

// enrollments returns every individual enrollment the DPS holds, through
// its query API, straight to its handler (not through the throttle). The
// DPS's clock moves a minute on first, so that these reads find its
// quota's window empty and leave the next push a fresh one.
func (d *dpsTarget) enrollments(t testing.TB) map[string]dps.IndividualEnrollment {
	t.Helper()
	d.skip(time.Minute)
	ts := httptest.NewUnstartedServer(d.srv.Handler())
	ts.StartTLS()
	defer ts.Close()
	svc, err := dps.NewServiceClient(d.conn, dps.ServiceOptions{HTTP: ts.Client(), BaseURL: ts.URL})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]dps.IndividualEnrollment{}
	cont := ""
	for {
		page, next, err := svc.QueryEnrollments(context.Background(), "*", dps.QueryPage{Size: 1000, Continuation: cont})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range page {
			if _, dup := out[strings.ToLower(e.RegistrationID)]; dup {
				t.Errorf("the query lists %s twice", e.RegistrationID)
			}
			out[strings.ToLower(e.RegistrationID)] = e
		}
		if next == "" || len(page) == 0 {
			return out
		}
		cont = next
	}
}

// checkHoldsExactly fails unless the DPS holds exactly the units of batch
// id, each with its own EK, and accepted one write per unit.
func checkHoldsExactly(t testing.TB, s *stationDir, d *dpsTarget, id int64) {
	t.Helper()
	units, err := s.store.BatchUnits(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	held := d.enrollments(t)
	if len(held) != len(units) {
		t.Errorf("the DPS holds %d enrollments; the batch has %d units", len(held), len(units))
	}
	for _, u := range units {
		e, ok := held[strings.ToLower(u.RegistrationID)]
		if !ok {
			t.Errorf("unit %s (%s) is missing from the DPS", u.Serial, u.RegistrationID)
			continue
		}
		want := dps.NewTPMEnrollment(u.RegistrationID, u.EKPublic)
		if e.Attestation.TPM == nil || e.Attestation.TPM.EndorsementKey != want.Attestation.TPM.EndorsementKey {
			t.Errorf("unit %s: the DPS holds another EK", u.Serial)
		}
	}
	if dups, ids := d.th.duplicated(); dups != 0 || ids != len(units) {
		t.Errorf("the DPS accepted writes for %d registration IDs, %d of them more than once; want %d, 0", ids, dups, len(units))
	}
}
