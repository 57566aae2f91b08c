package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/qa"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

func runQA(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("give a subcommand: run SCENARIO... or check SCENARIO...")
	}
	switch args[0] {
	case "run":
		return runQARun(ctx, e, args[1:])
	case "check":
		return runQACheck(e, args[1:])
	}
	return usagef("unknown qa subcommand %q: use run or check", args[0])
}

// runQACheck parses scenarios and says what each one does.
func runQACheck(e *env, args []string) error {
	fs := newFlags(e, "qa check")
	if err := parse(fs, args, true); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usagef("give scenario files or folders")
	}
	scs, err := qa.Load(fs.Args()...)
	if err != nil {
		return usagef("%v", err)
	}
	for _, s := range scs {
		fmt.Fprintf(e.stdout, "%-28s %-6s units %d × %d, slots %d, faults [%s], expect [%s]\n", s.Name, s.Method, s.UnitsPerRepeat(), s.Repeat, s.Slots,
			joinStrings(s.Faults), joinStrings(s.Expect))
	}
	return nil
}

func joinStrings[T fmt.Stringer](v []T) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = x.String()
	}
	return strings.Join(s, "; ")
}

func runQARun(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "qa run")
	out := fs.String("out", "", "folder for the reports, the SQLite record of the runs and the DPS data (default $KILN_HOME/qa/TIMESTAMP)")
	junit := fs.String("junit", "", "JUnit XML report (default OUT/junit.xml)")
	html := fs.String("html", "", "HTML report (default OUT/report.html)")
	slots := fs.Int("slots", 0, "provision this many units in parallel in every scenario (0: as each scenario says)")
	allow := fs.Bool("allow-unavailable", false, "exit 0 when scenarios could not run because the station lacks their method or fault (they are still reported)")
	operator := fs.String("operator", e.getenv("USER"), "operator name written on the records")
	if err := parse(fs, args, true); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usagef("give scenario files or folders (docs/qa holds the built-in ones)")
	}
	if *slots < 0 || *slots > 64 {
		return usagef("--slots must be from 0 to 64")
	}
	scs, err := qa.Load(fs.Args()...)
	if err != nil {
		return usagef("%v", err)
	}
	if *out == "" {
		*out = filepath.Join(c.Home, "qa", time.Now().UTC().Format("20060102T150405Z"))
	}
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return fmt.Errorf("create the QA folder: %w", err)
	}
	if *junit == "" {
		*junit = filepath.Join(*out, "junit.xml")
	}
	if *html == "" {
		*html = filepath.Join(*out, "report.html")
	}
	b, err := newQABench(ctx, e, c, *out)
	if err != nil {
		return err
	}
	defer b.Close()

	fmt.Fprintf(e.stdout, "kiln qa: %d scenarios, records in %s\n", len(scs), b.store.Path())
	var mu sync.Mutex
	r := &qa.Runner{Bench: b, Station: c.Station, Operator: *operator, Slots: *slots, Logger: e.logger(),
		OnUnit: func(sc *qa.Scenario, u *qa.UnitResult) {
			mu.Lock()
			defer mu.Unlock()
			got := "pass"
			switch {
			case u.Run == nil:
				got = "not run"
			case !u.Passed():
				got = fmt.Sprintf("fail at %s (%s)", u.Step, u.Kind)
			}
			line := fmt.Sprintf("  %-28s %-7s slot %-2d %-22s %-32s %7.2f s  %s", sc.Name, u.Name(), u.Slot, u.Serial, got, u.Duration.Seconds(), u.Outcome)
			if u.Why != "" {
				line += ": " + u.Why
			}
			fmt.Fprintln(e.stdout, line)
		}}
	rep := r.Run(ctx, scs)
	for _, s := range rep.Scenarios {
		p, t := s.Yield()
		fmt.Fprintf(e.stdout, "%-13s %-28s %d/%d passed, %d slot(s), %.1f s", strings.ToUpper(string(s.Outcome)), s.Name, p, t, s.Slots, s.Duration.Seconds())
		if s.Reason != "" {
			fmt.Fprintf(e.stdout, "  %s", s.Reason)
		}
		fmt.Fprintln(e.stdout)
	}
	if err := writeFile(*junit, func(w io.Writer) error { return qa.WriteJUnit(w, rep) }); err != nil {
		return err
	}
	if err := writeFile(*html, func(w io.Writer) error { return qa.WriteHTML(w, rep) }); err != nil {
		return err
	}
	cnt := rep.Count()
	fmt.Fprintf(e.stdout, "%d met, %d not met, %d not available; JUnit %s; HTML %s\n", cnt[qa.Met], cnt[qa.NotMet], cnt[qa.NotAvailable], *junit, *html)
	if !rep.OK(*allow) {
		return errFailed
	}
	return nil
}

func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// qaBench is the QA bench of this station: one store for every run of a
// QA session, and per scenario its own embedded DPS and hub (so that a
// scenario's faults stay in it), with simulated DUTs as `kiln simulate`
// child processes (one reference TPM simulator per process).
type qaBench struct {
	e       *env
	c       *config
	out     string
	store   *sqlite.Store
	simHome string   // KILN_HOME of the DUT processes: their EK roots
	roots   *qaRoots // the EK roots of the simulated DUTs
	self    []string // how to start kiln
}

func newQABench(ctx context.Context, e *env, c *config, out string) (*qaBench, error) {
	store, err := sqlite.Open(ctx, filepath.Join(out, "kiln.db"))
	if err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		store.Close()
		return nil, err
	}
	simHome := filepath.Join(out, "sim")
	roots := &qaRoots{dirs: []string{filepath.Join(simHome, "simulator", "ek-roots")}}
	return &qaBench{e: e, c: c, out: out, store: store, simHome: simHome, roots: roots, self: []string{exe}}, nil
}

func (b *qaBench) Close() error { return b.store.Close() }

// Open builds the station of one scenario.
func (b *qaBench) Open(ctx context.Context, sc *qa.Scenario) (qa.Station, error) {
	log := b.e.logger()
	st := &qaStation{bench: b, sc: sc}
	var skew time.Duration
	if f, ok := sc.Fault(qa.FaultClockSkew); ok {
		skew = f.Skew
	}
	dpsNow := func() time.Time { return time.Now().Add(skew) }
	// The DPS's log (refusals with their reasons, assignments) is evidence;
	// the devserver logs no keys, tokens or blobs.
	st.dpsLog = &lockedWriter{}
	dpsLog := slog.New(slog.NewTextHandler(st.dpsLog, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var quotas devserver.Quotas
	if f, ok := sc.Fault(qa.FaultThrottle); ok && f.Quota > 0 {
		// The DPS's own quota (as kiln serve holds DPS's), not the front.
		quotas.RegistrationsPerMinute = f.Quota
		st.quota = f.Quota
	}
	emb, err := startQADPS(ctx, filepath.Join(b.out, "dps", sc.Name), dpsNow, dpsLog, quotas)
	if err != nil {
		return nil, fmt.Errorf("start the scenario's DPS: %w", err)
	}
	st.dps = emb
	svc, err := serviceClient(emb, dpsNow)
	if err != nil {
		st.Close()
		return nil, err
	}
	endpoint := emb.DPS.Endpoint()
	if f, ok := sc.Fault(qa.FaultThrottle); ok && f.Quota == 0 {
		st.throttle = &throttle{next: emb.DPS.Handler(), count: f.Count, seen: map[string]int{}}
		if endpoint, err = st.serveFront(emb.tls); err != nil {
			st.Close()
			return nil, err
		}
	}
	check := &dpsCheck{svc: svc, hub: emb.Hub, dps: emb.DPS}
	enr := &qaEnroller{dpsCheck: check}
	if _, ok := sc.Fault(qa.FaultWrongEK); ok {
		if enr.wrongEK, err = otherEK(); err != nil {
			st.Close()
			return nil, err
		}
	}
	_, enr.disabled = sc.Fault(qa.FaultDisabled)
	_, enr.disableGroup = sc.Fault(qa.FaultDisabledGroup)
	st.enroller = enr
	issuer, symKey, err := st.openMethod(ctx)
	if err != nil {
		st.Close()
		return nil, err
	}
	verify := station.DeviceConfig{IDScope: emb.DPS.IDScope(), GlobalEndpoint: endpoint, TrustBundle: string(emb.TrustPEM), Method: sc.Method}
	if _, ok := sc.Fault(qa.FaultWrongIDScope); ok {
		verify.IDScope = "0ne00QA0000"
		if verify.IDScope == emb.DPS.IDScope() {
			verify.IDScope = "0ne00QA0001"
		}
	}
	st.idScope = verify.IDScope
	var roots station.Verifier = b.roots
	if len(sc.Ports) > 0 {
		roots = &qaRoots{dirs: []string{b.c.EKRoots}}
	}
	st.p = &station.Provisioner{
		Store: b.store,
		Dial: func(ctx context.Context, port string) (station.Link, error) {
			return link.Open(ctx, port, link.Config{BaudRate: b.c.Baud, Logger: log})
		},
		Endorser: hsm.Endorser{},
		Verifier: roots,
		Profile:  station.Profile{Station: b.c.Station, Method: sc.Method, RegID: station.RegIDFromEK, EKCertPolicy: sc.EKCertPolicy, KeyType: b.c.DeviceKeyType},
		Logger:   log,
		EndToEnd: &station.EndToEnd{Enroller: enr, Observer: check, Verify: verify, Timeout: sc.Timeout, X509Group: b.c.X509Group},
		Batches:  b.store,
		Issuer:   issuer,
		SymKey:   symKey,
	}
	if !sc.Verify {
		st.p.EndToEnd = nil
	}
	return st, nil
}

// expiredBackdate and expiredValidity make the leaves of a scenario with
// the expired-certificate fault: its CA's clock runs 30 days behind and
// leaves are valid 7 days, so each leaf expired 23 days before it is
// issued.
const (
	expiredBackdate = 30 * 24 * time.Hour
	expiredValidity = 7 * 24 * time.Hour
)

// openMethod opens what the scenario's method needs, as newProvisioner
// does for the station: for x509 a station CA, for symkey a group key. Each
// scenario has its own, in OUT/station/NAME (sealed with the station's CA
// passphrase, or a passphrase file made there), so that a back-dated CA
// stays in its scenario. The station's remote CA or PKCS#11 token is not
// used: QA issues from throwaway CAs only.
func (s *qaStation) openMethod(ctx context.Context) (station.Issuer, *station.SymKeyGroup, error) {
	if s.sc.Method != station.MethodX509 && s.sc.Method != station.MethodSymKey {
		return nil, nil, nil
	}
	c := *s.bench.c
	c.Home = filepath.Join(s.bench.out, "station", s.sc.Name)
	c.CA.Remote, c.CA.PKCS11 = nil, ""
	if err := os.MkdirAll(c.Home, 0o700); err != nil {
		return nil, nil, fmt.Errorf("create the scenario's station folder: %w", err)
	}
	if s.sc.Method == station.MethodSymKey {
		g, err := openSymKeyGroup(ctx, s.bench.e, &c)
		return nil, g, err
	}
	now := time.Now
	if _, ok := s.sc.Fault(qa.FaultExpiredCert); ok {
		now = func() time.Time { return time.Now().Add(-expiredBackdate) }
		c.CA.ValidityDays = int(expiredValidity / (24 * time.Hour))
	}
	keys, closeKeys, err := caKeys(ctx, s.bench.e, &c)
	if err != nil {
		return nil, nil, err
	}
	cfg, err := c.pkiConfig(keys, s.bench.e)
	if err != nil {
		closeKeys()
		return nil, nil, err
	}
	cfg.Now = now
	ca, err := pki.Open(ctx, cfg)
	if err != nil {
		closeKeys()
		return nil, nil, fmt.Errorf("open the scenario's station CA in %s: %w", c.caDir(), err)
	}
	s.closeCA = func() { ca.Close(); closeKeys() }
	days := c.CA.ValidityDays
	if days == 0 {
		days = 365
	}
	s.caInfo = fmt.Sprintf("the scenario's station CA: %s in %s, leaves valid %d days", ca.Intermediate().Subject.CommonName, c.caDir(), days)
	if _, ok := s.sc.Fault(qa.FaultExpiredCert); ok {
		s.caInfo += fmt.Sprintf("; its clock ran %s behind, so every leaf expired %s before it was issued", expiredBackdate, expiredBackdate-expiredValidity)
	}
	return &stationIssuer{ca: ca, signing: ca.Intermediate(), now: now}, nil, nil
}

// qaDPS is a scenario's DPS and hub, and the TLS configuration they serve.
type qaDPS struct {
	*devserver.Embedded
	tls *tls.Config
}

// startQADPS starts a DPS and its hub like devserver.StartEmbedded, with
// the DPS's clock (the clock-skew fault) and quotas (the throttle fault's
// quota=) given.
func startQADPS(ctx context.Context, dir string, now func() time.Time, log *slog.Logger, quotas devserver.Quotas) (*qaDPS, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	caPEM, cert, err := devserver.NewTLSIdentity()
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	hubAddr := l.Addr().String()
	l.Close()
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	srv, err := devserver.New(devserver.Config{Addr: "127.0.0.1:0", TLS: tc, DataDir: dir, Now: now, Logger: log, RetryAfter: time.Second, Quotas: quotas,
		Hubs: []devserver.LinkedHub{{Name: hubAddr, Weight: 1, ApplyAllocationPolicy: true}}})
	if err != nil {
		return nil, err
	}
	hub, err := devserver.NewHub(devserver.HubConfig{Addr: hubAddr, TLS: tc.Clone(), Hosts: []string{hubAddr}, Directory: srv, Logger: log})
	if err != nil {
		srv.Close()
		return nil, err
	}
	if err := srv.Start(ctx); err != nil {
		srv.Close()
		return nil, err
	}
	if err := hub.Start(ctx); err != nil {
		srv.Close()
		return nil, err
	}
	return &qaDPS{Embedded: &devserver.Embedded{DPS: srv, Hub: hub, TrustPEM: caPEM}, tls: tc}, nil
}

// serviceClient is the station's client of the DPS service API, signing
// its tokens with the DPS's clock: the station and its DPS agree on the
// time, the DUT is the one that is off.
func serviceClient(d *qaDPS, now func() time.Time) (*dps.ServiceClient, error) {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(d.TrustPEM)
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	return dps.NewServiceClient(d.DPS.ServiceConnectionString(), dps.ServiceOptions{HTTP: hc, BaseURL: "https://" + d.DPS.Addr(), Now: now})
}

// qaStation is the station of one scenario.
type qaStation struct {
	bench    *qaBench
	sc       *qa.Scenario
	p        *station.Provisioner
	dps      *qaDPS
	enroller *qaEnroller
	throttle *throttle
	front    *http.Server
	idScope  string
	quota    int // the DPS's registrations per minute; 0: not throttled
	dpsLog   *lockedWriter
	closeCA  func() // the scenario's CA, when it has one
	caInfo   string // what the report says of it

	closeOnce sync.Once
}

// Provision provisions a unit. When the DPS refused the unit's
// registration, the station's reason already carries the DPS's account
// (station.RefusalExplainer), so the report says why.
func (s *qaStation) Provision(ctx context.Context, req station.Request) (*station.Run, error) {
	return s.p.Provision(ctx, req)
}

func (s *qaStation) StartDUT(ctx context.Context, spec qa.DUTSpec) (qa.DUT, error) {
	return s.bench.startDUT(ctx, spec)
}

func (s *qaStation) Evidence(ctx context.Context) []qa.Evidence {
	var ev []qa.Evidence
	var f []string
	if s.p.EndToEnd == nil {
		f = append(f, "no end-to-end check (verify: off): the units were not proven against a DPS")
	} else {
		f = append(f, fmt.Sprintf("DPS %s, ID scope %s; the DUTs were given ID scope %s and endpoint %s", s.dps.DPS.Addr(), s.dps.DPS.IDScope(), s.idScope, s.p.EndToEnd.Verify.GlobalEndpoint))
	}
	if fl, ok := s.sc.Fault(qa.FaultClockSkew); ok {
		f = append(f, fmt.Sprintf("the DPS clock ran %s ahead of the DUTs' clocks", fl.Skew))
	}
	if s.throttle != nil {
		f = append(f, fmt.Sprintf("the DPS front answered 429 (retry-after 1) to %d of %d device requests", s.throttle.throttled.Load(), s.throttle.requests.Load()))
	}
	if s.quota > 0 {
		f = append(f, fmt.Sprintf("the DPS held a quota of %d device registrations per minute (its own throttle: 429 with the retry-after of its sliding window; kiln_dps_throttled_total below)", s.quota))
	}
	if n := s.enroller.wrong.Load(); n > 0 {
		f = append(f, fmt.Sprintf("%d enrollments were written with another TPM's EK", n))
	}
	if n := s.enroller.disabledN.Load(); n > 0 {
		f = append(f, fmt.Sprintf("%d enrollments were written disabled", n))
	}
	if s.caInfo != "" {
		f = append(f, s.caInfo)
	}
	if g := s.enroller.groupDisabled.Load(); g != nil {
		f = append(f, fmt.Sprintf("enrollment group %s was disabled through the DPS service API after the station ensured it", *g))
	}
	ev = append(ev, qa.Evidence{Name: "station and faults", Text: strings.Join(f, "\n")})
	// The DPS's own counters, read from its /metrics as Prometheus would.
	rec := httptest.NewRecorder()
	req := httptest.NewRequestWithContext(ctx, http.MethodGet, "/metrics", nil)
	s.dps.DPS.Handler().ServeHTTP(rec, req)
	if rec.Code == http.StatusOK {
		var lines []string
		for _, l := range strings.Split(rec.Body.String(), "\n") {
			if strings.HasPrefix(l, "kiln_dps_registrations_total") || strings.HasPrefix(l, "kiln_dps_throttled_total") || strings.HasPrefix(l, "kiln_hub_") {
				lines = append(lines, l)
			}
		}
		ev = append(ev, qa.Evidence{Name: "DPS metrics", Text: strings.Join(lines, "\n")})
	}
	if s.dpsLog != nil {
		lines := strings.Split(strings.TrimSpace(s.dpsLog.String()), "\n")
		const keep = 300
		if len(lines) > keep {
			lines = append([]string{fmt.Sprintf("(%d earlier lines left out)", len(lines)-keep)}, lines[len(lines)-keep:]...)
		}
		ev = append(ev, qa.Evidence{Name: "DPS and hub log", Text: strings.Join(lines, "\n")})
	}
	return ev
}

func (s *qaStation) Close() error {
	s.closeOnce.Do(func() {
		if s.front != nil {
			s.front.Close()
		}
		if s.dps != nil {
			s.dps.Close()
		}
		if s.closeCA != nil {
			s.closeCA()
		}
	})
	return nil
}

// serveFront serves the DPS's device API through the throttle on its own
// TLS listener with the DPS's certificate, and returns its address: the
// endpoint the DUTs are given.
func (s *qaStation) serveFront(tc *tls.Config) (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	c := tc.Clone()
	c.ClientAuth = tls.RequestClientCert
	s.front = &http.Server{Handler: s.throttle, TLSConfig: c, ReadHeaderTimeout: 10 * time.Second}
	go s.front.ServeTLS(l, "", "")
	return l.Addr().String(), nil
}

// throttle answers 429 Too Many Requests with retry-after 1 to the first
// count device API requests of each registration ID (every one when count
// is negative), as DPS does when a quota is exceeded; the rest go through.
type throttle struct {
	next  http.Handler
	count int

	mu        sync.Mutex
	seen      map[string]int
	requests  atomic.Int64
	throttled atomic.Int64
}

func (t *throttle) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	if len(parts) >= 3 && parts[1] == "registrations" {
		t.requests.Add(1)
		t.mu.Lock()
		n := t.seen[parts[2]]
		t.seen[parts[2]] = n + 1
		t.mu.Unlock()
		if t.count < 0 || n < t.count {
			t.throttled.Add(1)
			w.Header().Set("retry-after", "1")
			w.Header().Set("content-type", "application/json; charset=utf-8")
			w.WriteHeader(http.StatusTooManyRequests)
			fmt.Fprint(w, `{"errorCode":429001,"trackingId":"","message":"Operations are being throttled for this tenant."}`)
			return
		}
	}
	t.next.ServeHTTP(w, r)
}

// qaEnroller creates the units' enrollments and ensures the enrollment
// groups through the DPS service API as the station's end-to-end check does
// (dpsCheck, whose other methods it keeps), with the enrollment faults done
// to them: wrong-ek and disabled-enrollment to TPM enrollments,
// disabled-group to the X.509 and symmetric-key groups.
type qaEnroller struct {
	*dpsCheck
	wrongEK      []byte // non-nil: enrol this EK instead of the unit's
	disabled     bool
	disableGroup bool // disable the enrollment group once the station ensured it
	wrong        atomic.Int64
	disabledN    atomic.Int64

	groupMu       sync.Mutex
	groupDisabled atomic.Pointer[string] // the group disabled, once it is
}

func (q *qaEnroller) EnrollTPM(ctx context.Context, regID string, ekPublic []byte) error {
	if q.wrongEK != nil {
		ekPublic = q.wrongEK
		q.wrong.Add(1)
	}
	en := dps.NewTPMEnrollment(regID, ekPublic)
	if q.disabled {
		en.ProvisioningStatus = "disabled"
		q.disabledN.Add(1)
	}
	_, err := q.dpsCheck.svc.PutEnrollment(ctx, en, "")
	return err
}

// EnsureX509Group ensures the group as the station does; with the
// disabled-group fault it then disables it (see disableAfter).
func (q *qaEnroller) EnsureX509Group(ctx context.Context, groupID string, signingCert []byte) error {
	return q.disableAfter(ctx, groupID, func() error { return q.dpsCheck.EnsureX509Group(ctx, groupID, signingCert) })
}

// EnsureSymKeyGroup ensures the group as the station does; with the
// disabled-group fault it then disables it (see disableAfter).
func (q *qaEnroller) EnsureSymKeyGroup(ctx context.Context, g *station.SymKeyGroup) error {
	return q.disableAfter(ctx, g.ID, func() error { return q.dpsCheck.EnsureSymKeyGroup(ctx, g) })
}

// disableAfter runs the station's ensure; with the disabled-group fault it
// then disables the group through the DPS service API, as an operator or a
// cloud job would between the station's enroll step and the DUT's
// registration. The first unit does it; later units find the group
// disabled and keep it so (the station's ensure would enable it again,
// and a neighbour slot could register in between).
func (q *qaEnroller) disableAfter(ctx context.Context, groupID string, ensure func() error) error {
	if !q.disableGroup {
		return ensure()
	}
	q.groupMu.Lock()
	defer q.groupMu.Unlock()
	if q.groupDisabled.Load() != nil {
		return nil
	}
	if err := ensure(); err != nil {
		return err
	}
	g, err := q.svc.GetEnrollmentGroup(ctx, groupID)
	if err != nil {
		return err
	}
	g.ProvisioningStatus = dps.ProvisioningDisabled
	if _, err := q.svc.PutEnrollmentGroup(ctx, g, g.ETag); err != nil {
		return err
	}
	q.groupDisabled.Store(&groupID)
	return nil
}

// otherEK returns the EK TPM2B_PUBLIC of a TPM no DUT has: the reference
// RSA EK template with a fresh RSA-2048 modulus.
func otherEK() ([]byte, error) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	pub := tpm2.RSAEKTemplate
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(pub)), nil
}

// qaRoots is an EK root store read at each validation: simulated DUTs add
// their maker's root as they start (to the simulator's folder, or a folder
// of their swtpm's own).
type qaRoots struct {
	mu   sync.Mutex
	dirs []string
}

func (r *qaRoots) add(dir string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Contains(r.dirs, dir) {
		r.dirs = append(r.dirs, dir)
	}
}

func (r *qaRoots) VerifyEKCert(ctx context.Context, e *station.Endorsement) error {
	r.mu.Lock()
	dirs := slices.Clone(r.dirs)
	r.mu.Unlock()
	var last error
	for _, dir := range dirs {
		if _, err := os.Stat(dir); err != nil {
			last = station.Errorf("validate EK certificate", station.KindNotFound, "no EK root store at %s: put the TPM makers' roots there", dir)
			continue
		}
		roots, err := hsm.LoadRoots(dir)
		if err != nil {
			return err
		}
		if last = roots.VerifyEKCert(ctx, e); last == nil {
			return nil
		}
	}
	return last
}

// simChild is a simulated DUT in its own `kiln simulate` process.
type simChild struct {
	cmd  *exec.Cmd
	port string
	done chan struct{}
	once sync.Once
}

func (d *simChild) Port() string { return d.port }

// Close stops the DUT process (SIGINT, then SIGKILL after a grace period);
// it is idempotent.
func (d *simChild) Close() error {
	d.once.Do(func() {
		_ = d.cmd.Process.Signal(os.Interrupt)
		select {
		case <-d.done:
		case <-time.After(5 * time.Second):
			_ = d.cmd.Process.Kill()
			<-d.done
		}
	})
	return nil
}

// startDUT starts one simulated DUT process and waits for its port.
func (b *qaBench) startDUT(ctx context.Context, spec qa.DUTSpec) (*simChild, error) {
	tpm := spec.TPM
	if tpm == "" {
		tpm = "sim"
	}
	args := append(slices.Clone(b.self[1:]), "simulate", "--count", "1", "--tpm", tpm, "--serial", spec.Serial,
		"--line-rate", strconv.Itoa(spec.LineRate))
	if spec.Faults.DropAfter > 0 {
		args = append(args, "--drop-after", strconv.Itoa(spec.Faults.DropAfter))
	}
	if spec.Faults.Garbage {
		args = append(args, "--garbage")
	}
	if spec.Faults.Delay > 0 {
		args = append(args, "--delay", spec.Faults.Delay.String())
	}
	if spec.Faults.CorruptEvery > 0 {
		return nil, fmt.Errorf("corrupting answers: %w: kiln simulate has no flag for it", qa.ErrNotAvailable)
	}
	cmd := exec.Command(b.self[0], args...)
	cmd.Env = append(os.Environ(), "KILN_HOME="+b.simHome)
	errb := &lockedWriter{}
	cmd.Stderr = errb
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, station.Errorf("start simulated DUT", station.KindUnavailable, "%w: check that %s runs", err, b.self[0])
	}
	d := &simChild{cmd: cmd, done: make(chan struct{})}
	got := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			got <- sc.Text()
		}
		close(got)
		io.Copy(io.Discard, out)
		_ = cmd.Wait()
		close(d.done)
	}()
	select {
	case p, ok := <-got:
		if ok && strings.HasPrefix(p, "/") {
			d.port = p
			if tpm == "swtpm" {
				// Its EK certificate's root: swtpm_setup's own CA, named on
				// the DUT's stderr line after the port.
				dir, err := waitRoots(ctx, errb)
				if err != nil {
					d.Close()
					return nil, err
				}
				b.roots.add(dir)
			}
			return d, nil
		}
		d.Close()
		return nil, station.Errorf("start simulated DUT", station.KindUnavailable, "the DUT process printed no port: %s", strings.TrimSpace(errb.String()))
	case <-ctx.Done():
		d.Close()
		return nil, station.E("start simulated DUT", station.KindUnavailable, ctx.Err())
	}
}

var rootsRE = regexp.MustCompile(`roots=(\S+)`)

// waitRoots waits for the roots= of a swtpm DUT's stderr line.
func waitRoots(ctx context.Context, errb *lockedWriter) (string, error) {
	for range 100 {
		if m := rootsRE.FindStringSubmatch(errb.String()); m != nil {
			return m[1], nil
		}
		select {
		case <-ctx.Done():
			return "", station.E("start simulated DUT", station.KindUnavailable, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return "", station.Errorf("start simulated DUT", station.KindUnavailable, "the swtpm DUT did not name its EK roots: %s", strings.TrimSpace(errb.String()))
}

// lockedWriter keeps what a child writes, safe to read while it writes.
type lockedWriter struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// portList is a repeatable --port flag; each value may be a comma-separated
// list.
type portList []string

func (p *portList) String() string { return strings.Join(*p, ",") }

func (p *portList) Set(v string) error {
	for _, x := range strings.Split(v, ",") {
		if x = strings.TrimSpace(x); x == "" {
			return fmt.Errorf("an empty port in %q", v)
		}
		if slices.Contains(*p, x) {
			return fmt.Errorf("port %s is given twice: one slot per port", x)
		}
		*p = append(*p, x)
	}
	return nil
}

// provisionSlots provisions the DUTs on ports in parallel, one slot each,
// with one provisioner (one store, CA and DPS). Text output prefixes each
// step with its port; JSON output is one record per line, in port order.
func provisionSlots(ctx context.Context, e *env, c *config, ports []string, operator string, asJSON bool) error {
	p, closeFn, err := newProvisioner(ctx, e, c)
	if err != nil {
		return err
	}
	defer closeFn()
	var mu sync.Mutex
	if !asJSON {
		fmt.Fprintf(e.stdout, "provisioning %d DUTs in parallel on %s (station %s, operator %s, method %s)\n", len(ports), strings.Join(ports, ", "), c.Station, operator, c.Method)
		p.OnStep = func(ev station.StepEvent) {
			if !ev.Done {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			fmt.Fprintf(e.stdout, "%s ", ev.Port)
			printStep(e.stdout, ev.Step)
		}
	}
	runs := make([]*station.Run, len(ports))
	errs := make([]error, len(ports))
	var wg sync.WaitGroup
	for i, port := range ports {
		wg.Go(func() {
			runs[i], errs[i] = p.Provision(ctx, station.Request{Port: port, Operator: operator})
		})
	}
	wg.Wait()
	failed := false
	for i, r := range runs {
		if r == nil {
			fmt.Fprintf(e.stderr, "kiln provision: %s: %v\n", ports[i], errs[i])
			failed = true
			continue
		}
		failed = failed || errs[i] != nil
		if asJSON {
			b, err := json.Marshal(runJSON(r))
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%s\n", b)
		} else {
			fmt.Fprintf(e.stdout, "%s ", ports[i])
			printVerdict(e.stdout, r)
		}
	}
	if failed {
		return errFailed
	}
	return nil
}
