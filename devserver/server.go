package devserver

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

var _ DeviceDirectory = (*Server)(nil)

// DefaultPolicy is the shared access policy of the service API that New
// creates when Config.ServiceKeys is empty (§7.5).
const DefaultPolicy = "provisioningserviceowner"

// Defaults of Config.
const (
	// DefaultRetryAfter is the poll interval asked of devices.
	DefaultRetryAfter = 2 * time.Second
	// DefaultOperationTTL is how long an operation can be polled.
	DefaultOperationTTL = 30 * time.Minute
)

// Config configures a Server. The zero value of every field but DataDir
// has a default.
type Config struct {
	// IDScope is the service's ID scope. Empty: one is generated
	// (0ne00XXXXXX) on first start and kept in the data directory.
	IDScope string
	// Addr is the address Start listens on; empty means 127.0.0.1:0.
	Addr string
	// TLS is the listener's TLS configuration (certificates); Start needs
	// it. Handler works without it.
	TLS *tls.Config
	// HostName is the service host name that service SAS tokens are signed
	// for (sr) and that ServiceConnectionString names. Empty: the
	// listener's address. Tokens for the Host a request was sent to are
	// accepted too.
	HostName string
	// DataDir holds devserver.db and the data key devserver.key. Required.
	DataDir string
	// Hubs are the linked IoT hubs devices are assigned to.
	Hubs []LinkedHub
	// ServiceKeys maps shared access policy names to their keys for the
	// service API. Every policy has all rights unless ServiceRights
	// restricts it. Empty: the
	// provisioningserviceowner policy with a key generated on first start
	// and kept (sealed) in the data directory.
	ServiceKeys map[string][]byte
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// Logger receives the server's log; nil discards it. Keys, SAS tokens
	// and activation blobs are never logged.
	Logger *slog.Logger
	// RetryAfter is the poll interval the server asks devices for (the
	// retry-after header, whole seconds, at least 1); zero means 2 s.
	RetryAfter time.Duration
	// AssignmentDelay holds each assignment back this long before it runs,
	// so that clients (and tests) see "assigning" for a while, as with real
	// DPS. Zero: assign at once.
	AssignmentDelay time.Duration
	// ServiceRights restricts service policies to rights (§7.5): policy
	// name → its rights. Policies not listed have every right. Each name
	// must be a policy of ServiceKeys (or DefaultPolicy).
	ServiceRights map[string][]Right
	// OperationTTL is how long a registration operation can be polled;
	// zero means 30 minutes.
	OperationTTL time.Duration
	// MQTTAddr is the address of the device API over MQTT 3.1.1 with TLS
	// (DPS's port 8883; "127.0.0.1:0" picks a free port, see MQTTAddr).
	// Empty: no MQTT listener (MQTT over WebSockets on the HTTPS listener
	// is served either way).
	MQTTAddr string
	// Issuer, when set, signs the CSRs devices send with their
	// registration (clientCertificateCsr); without one such a registration
	// is refused with DPS's "not configured" message.
	Issuer CertificateIssuer
	// Quotas are the service's limits and throttles (quota.go). The zero
	// value throttles nothing and holds DPS's count limits; DPSQuotas
	// throttles as DPS does.
	Quotas Quotas
	// Latencies is the geoLatency allocation's map of client networks to
	// linked hubs and latencies (allocation_geo.go). Empty: geoLatency
	// hashes by weight, as there is no geography.
	Latencies Latencies
	// WebhookClient calls custom allocation webhooks (§8); nil: a client
	// with DefaultWebhookTimeout that trusts the system's roots.
	WebhookClient *http.Client
}

// Server is Kiln's embedded DPS: the HTTPS device API with TPM attestation,
// the service API for individual enrollments, allocation to linked hubs and
// the device directory of the embedded hub. It is safe for concurrent use.
type Server struct {
	cfg         Config
	now         func() time.Time
	log         *slog.Logger
	db          *store
	idScope     string
	serviceKeys map[string][]byte
	attest      map[string]attestation // by enrollment attestation type (lower case)
	handler     http.Handler
	metrics     metrics       // the counters of GET /metrics (metrics.go)
	groupKeys   groupKeyCache // symmetric-key groups with decoded keys (symkey_group.go)
	csrs        pendingCSRs   // CSRs awaiting their assignment (issuance.go)
	refused     refusals      // the last refusal of recent devices (refusals.go)

	// The state of the rate quotas (quota.go), and what register requests
	// told for their assignments (allocation_custom.go).
	throttles          throttles
	allocationContexts allocationContexts

	// Assignment workers: one goroutine per pending operation, stopped by
	// cancel and awaited by Close.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	srv      *http.Server
	listener net.Listener
	mqtt     *dpsMQTT // the MQTT transport, made by Start

	closeOnce sync.Once
	closeErr  error
}

// New opens (or creates) the server's state in cfg.DataDir and returns a
// Server whose Handler is ready; Start listens. Operations a previous
// server left assigning are resumed. Kinds: Invalid (bad configuration),
// Unavailable (the data directory), Internal.
func New(cfg Config) (*Server, error) {
	const op = "start devserver"
	if cfg.DataDir == "" {
		return nil, station.Errorf(op, station.KindInvalid, "no data directory: set Config.DataDir")
	}
	if err := cfg.Quotas.check(); err != nil {
		return nil, err
	}
	if err := checkHubs(cfg.Hubs, cfg.Quotas.linkedHubs()); err != nil {
		return nil, err
	}
	if err := cfg.Latencies.check(cfg.Hubs); err != nil {
		return nil, err
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = DefaultRetryAfter
	}
	if cfg.OperationTTL <= 0 {
		cfg.OperationTTL = DefaultOperationTTL
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, now: now, log: log.With("component", "devserver")}

	ctx := context.Background()
	db, err := openStore(ctx, cfg.DataDir)
	if err != nil {
		return nil, err
	}
	s.db = db
	db.maxEnrollments, db.maxRegistrations = cfg.Quotas.enrollments(), cfg.Quotas.registrations()
	if err := s.loadIdentity(ctx); err != nil {
		db.close()
		return nil, err
	}
	if err := s.checkRights(); err != nil {
		db.close()
		return nil, err
	}
	s.attest = map[string]attestation{
		strings.ToLower(dps.AttestationTPM):          &tpmAttestation{db: db},
		strings.ToLower(dps.AttestationSymmetricKey): symmetricKeyAttestation{},
		strings.ToLower(dps.AttestationX509):         x509Attestation{},
	}
	s.handler = http.HandlerFunc(s.serveHTTP)
	s.ctx, s.cancel = context.WithCancel(context.Background())

	pending, err := db.pendingOperations(ctx, now())
	if err != nil {
		s.cancel()
		db.close()
		return nil, err
	}
	for _, id := range pending {
		s.startAssignment(id, "resumed")
	}
	return s, nil
}

// loadIdentity sets the ID scope and the service keys from the
// configuration, or from the data directory, generating them the first
// time.
func (s *Server) loadIdentity(ctx context.Context) error {
	const op = "start devserver"
	s.idScope = s.cfg.IDScope
	if s.idScope == "" {
		v, ok, err := s.db.setting(ctx, "id_scope")
		if err != nil {
			return err
		}
		if !ok {
			b := make([]byte, 3)
			if _, err := rand.Read(b); err != nil {
				return station.E(op, station.KindInternal, err)
			}
			v = []byte("0ne00" + strings.ToUpper(hex.EncodeToString(b)))
			if err := s.db.putSetting(ctx, "id_scope", v, false); err != nil {
				return err
			}
		}
		s.idScope = string(v)
	} else if strings.ContainsAny(s.idScope, "/?#% ") {
		return station.Errorf(op, station.KindInvalid, "ID scope %q: use letters and digits, like 0ne00AB12CD", s.idScope)
	}

	s.serviceKeys = map[string][]byte{}
	for name, key := range s.cfg.ServiceKeys {
		if name == "" || len(key) == 0 {
			return station.Errorf(op, station.KindInvalid, "service policy %q has no name or no key", name)
		}
		s.serviceKeys[strings.ToLower(name)] = append([]byte(nil), key...)
	}
	if len(s.serviceKeys) == 0 {
		key, ok, err := s.db.setting(ctx, "service_key:"+DefaultPolicy)
		if err != nil {
			return err
		}
		if !ok {
			key = make([]byte, 32)
			if _, err := rand.Read(key); err != nil {
				return station.E(op, station.KindInternal, err)
			}
			if err := s.db.putSetting(ctx, "service_key:"+DefaultPolicy, key, true); err != nil {
				return err
			}
		}
		s.serviceKeys[DefaultPolicy] = key
	}
	return nil
}

// Start listens on Config.Addr with Config.TLS and serves Handler until
// Close. ctx bounds only the start. Kinds: Invalid (no TLS configuration,
// started twice), Unavailable (the address cannot be listened on).
func (s *Server) Start(ctx context.Context) error {
	const op = "start devserver listener"
	if s.cfg.TLS == nil {
		return station.Errorf(op, station.KindInvalid, "no TLS configuration: set Config.TLS (DPS is HTTPS only)")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return station.Errorf(op, station.KindInvalid, "the server is started already")
	}
	if s.ctx.Err() != nil {
		return station.Errorf(op, station.KindInvalid, "the server is closed")
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return station.Errorf(op, station.KindUnavailable, "listen on %s: %w: choose a free address", s.cfg.Addr, err)
	}
	tc := s.cfg.TLS.Clone()
	if tc.MinVersion == 0 {
		tc.MinVersion = tls.VersionTLS12
	}
	if tc.ClientAuth == tls.NoClientCert {
		// X.509 devices present their certificate; TPM and symmetric-key
		// devices none. The device API checks it (attestX509): no CA list
		// is sent, so clients offer any certificate they have.
		tc.ClientAuth = tls.RequestClientCert
	}
	if err := s.startMQTT(ctx, tc); err != nil {
		_ = ln.Close()
		return err
	}
	s.listener = ln
	s.srv = &http.Server{
		Handler:           s.handler,
		TLSConfig:         tc,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
	}
	srv := s.srv
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("devserver listener stopped", "err", err)
		}
	}()
	s.log.Info("devserver listening", "addr", ln.Addr().String(), "idScope", s.idScope)
	return nil
}

// Addr returns the address the server listens on (host:port), or "" before
// Start.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.listener == nil {
		return ""
	}
	return s.listener.Addr().String()
}

// IDScope returns the service's ID scope.
func (s *Server) IDScope() string { return s.idScope }

// hostName is the service host name of connection strings and tokens:
// Config.HostName, else the endpoint.
func (s *Server) hostName() string {
	if s.cfg.HostName != "" {
		return s.cfg.HostName
	}
	return s.Endpoint()
}

// Endpoint is the DPS's global endpoint as clients name it: the listener's
// address, without the port when it is HTTPS's 443, since the Azure SDKs'
// DPS transports and service clients take it as a host name and always
// connect to 443 (Node resolves "127.0.0.1:443" as a name and fails).
func (s *Server) Endpoint() string {
	a := s.Addr()
	if host, port, err := net.SplitHostPort(a); err == nil && port == "443" {
		return host
	}
	return a
}

// ServiceConnectionString returns the service API connection string
// HostName=…;SharedAccessKeyName=…;SharedAccessKey=… for the default
// policy (or, with configured keys, the first policy by name). It holds a
// key: do not log it.
func (s *Server) ServiceConnectionString() string {
	name := DefaultPolicy
	if _, ok := s.serviceKeys[name]; !ok {
		name = ""
		for n := range s.serviceKeys {
			if name == "" || n < name {
				name = n
			}
		}
	}
	for n := range s.cfg.ServiceKeys { // keep the configured spelling
		if strings.EqualFold(n, name) {
			name = n
		}
	}
	return "HostName=" + s.hostName() + ";SharedAccessKeyName=" + name +
		";SharedAccessKey=" + dps.EncodeKey(s.serviceKeys[strings.ToLower(name)])
}

// Close stops the listener, the assignments in progress (they resume at
// the next New on the same data directory) and closes the database. It is
// idempotent and returns when every goroutine of the server has ended.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		srv := s.srv
		s.cancel() // also makes a later Start fail
		s.mu.Unlock()
		var errs []error
		if srv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if err := srv.Shutdown(ctx); err != nil {
				errs = append(errs, srv.Close())
			}
			cancel()
		}
		s.closeMQTT()
		s.wg.Wait()
		errs = append(errs, s.db.close())
		if err := errors.Join(errs...); err != nil {
			s.closeErr = station.E("close devserver", station.KindInternal, err)
		}
	})
	return s.closeErr
}

// Handler returns the HTTP handler of the device and service APIs, for
// mounting in a test server or another listener.
func (s *Server) Handler() http.Handler { return s.handler }

// HubDevice implements DeviceDirectory: the device deviceID as assigned to
// hub, with its SAS keys (TPM: the key sent in the activation blob;
// symmetric key: the enrollment's primary and secondary keys), the
// initial twin (desired properties, tags), its IoT Edge capability and
// what the hub needs to reset or migrate its data. Kinds: NotFound.
func (s *Server) HubDevice(ctx context.Context, hub, deviceID string) (*HubDevice, error) {
	r, err := s.db.hubDevice(ctx, hub, deviceID)
	if err != nil {
		return nil, err
	}
	d := &HubDevice{
		Hub:          r.Hub,
		DeviceID:     r.DeviceID,
		PrimaryKey:   r.Key,
		SecondaryKey: s.hubSecondaryKey(ctx, r),
		Thumbprints:  r.Thumbprints,
		Enabled:      r.Enabled,
	}
	for _, h := range s.cfg.Hubs { // the configured spelling
		if strings.EqualFold(h.Name, r.Hub) {
			d.Hub = h.Name
		}
	}
	if len(r.Twin) > 0 {
		d.Twin = r.Twin
	}
	d.Tags, d.IoTEdge, d.DataETag = r.Tags, r.IoTEdge, r.DataETag
	for _, h := range s.cfg.Hubs {
		if r.PreviousHub != "" && strings.EqualFold(h.Name, r.PreviousHub) {
			d.PreviousHub = h.Name
		}
	}
	return d, nil
}

// serveHTTP routes a request. Literal path segments match ignoring case;
// the other segments are percent-decoded (§1.1, §7):
//
//	PUT  /{idScope}/registrations/{regId}/register
//	GET  /{idScope}/registrations/{regId}/operations/{operationId}
//	POST /{idScope}/registrations/{regId}
//	PUT|GET|DELETE /enrollments/{regId}
//	POST /enrollments/{regId}/attestationmechanism
//	GET|DELETE /registrations/{regId}
//	POST /enrollments and /enrollmentGroups: bulk operations
//	POST /enrollments/query and /enrollmentGroups/query
//	PUT|GET|DELETE /enrollmentGroups/{id}
//	POST /enrollmentGroups/{id}/attestationmechanism
//	POST /registrations/{groupId}/query (also /enrollmentGroups/{id}/registrations/query)
//	GET /certificates; PUT|GET|DELETE /certificates/{name}
//	POST /certificates/{name}/generateVerificationCode and /verify (certificates.go)
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	trackingID := newTrackingID()
	if r.URL.Path == dpsWebSocketPath {
		s.serveWebSocket(w, r, trackingID) // MQTT over WebSockets (mqtt.go)
		return
	}
	segs, ok := splitPath(r.URL.EscapedPath())
	if !ok {
		s.writeError(w, r, trackingID, station.Errorf("route request", station.KindInvalid, "the path is not percent-encoded correctly"))
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, int64(s.cfg.Quotas.messageBytes()))
	defer s.countServiceRequest(&w, r.Method, segs, trackingID)()
	if err := s.throttleService(r.Method, segs); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	is := strings.EqualFold
	post := r.Method == http.MethodPost
	switch {
	case len(segs) == 1 && segs[0] == "metrics":
		s.allow(w, r, trackingID, http.MethodGet, func() { s.serveMetrics(w, r) })
	case len(segs) == 1 && is(segs[0], "certificates"):
		s.allow(w, r, trackingID, http.MethodGet, func() { s.serveCertificates(w, r, trackingID) })
	case len(segs) == 2 && is(segs[0], "certificates"):
		s.serveCertificate(w, r, trackingID, segs[1])
	case len(segs) == 3 && is(segs[0], "certificates") && is(segs[2], "generateVerificationCode"):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.generateVerificationCode(w, r, trackingID, segs[1]) })
	case len(segs) == 3 && is(segs[0], "certificates") && is(segs[2], "verify"):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.verifyCertificate(w, r, trackingID, segs[1]) })
	case len(segs) == 1 && (is(segs[0], "enrollments") || is(segs[0], "enrollmentGroups")):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.serveBulk(w, r, trackingID, is(segs[0], "enrollmentGroups")) })
	case len(segs) == 2 && post && is(segs[0], "enrollments") && is(segs[1], "query"):
		s.serveQuery(w, r, trackingID, queryEnrollments, "")
	case len(segs) == 2 && post && is(segs[0], "enrollmentGroups") && is(segs[1], "query"):
		s.serveQuery(w, r, trackingID, queryGroups, "")
	case len(segs) == 2 && is(segs[0], "enrollmentGroups"):
		s.serveGroup(w, r, trackingID, segs[1])
	case len(segs) == 3 && is(segs[0], "enrollmentGroups") && is(segs[2], "attestationmechanism"):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.groupAttestationMechanism(w, r, trackingID, segs[1]) })
	case len(segs) == 3 && post && is(segs[0], "registrations") && is(segs[2], "query"):
		s.serveQuery(w, r, trackingID, queryRegistrations, segs[1])
	case len(segs) == 4 && is(segs[0], "enrollmentGroups") && is(segs[2], "registrations") && is(segs[3], "query"):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.serveQuery(w, r, trackingID, queryRegistrations, segs[1]) })
	case len(segs) == 4 && is(segs[1], "registrations") && is(segs[3], "register"):
		s.allow(w, r, trackingID, http.MethodPut, func() { s.register(w, r, trackingID, segs[0], segs[2]) })
	case len(segs) == 5 && is(segs[1], "registrations") && is(segs[3], "operations"):
		s.allow(w, r, trackingID, http.MethodGet, func() { s.poll(w, r, trackingID, segs[0], segs[2], segs[4]) })
	case len(segs) == 3 && is(segs[1], "registrations"):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.lookup(w, r, trackingID, segs[0], segs[2]) })
	case len(segs) == 2 && is(segs[0], "enrollments"):
		s.serveEnrollment(w, r, trackingID, segs[1])
	case len(segs) == 3 && is(segs[0], "enrollments") && is(segs[2], "attestationmechanism"):
		s.allow(w, r, trackingID, http.MethodPost, func() { s.attestationMechanism(w, r, trackingID, segs[1]) })
	case len(segs) == 2 && is(segs[0], "registrations"):
		s.serveRegistration(w, r, trackingID, segs[1])
	default:
		s.writeError(w, r, trackingID, station.Errorf("route request", station.KindNotFound,
			"%s %s is not an operation of this provisioning service", r.Method, r.URL.Path))
	}
}

// allow runs h if the request's method is method, else answers 405.
func (s *Server) allow(w http.ResponseWriter, r *http.Request, trackingID, method string, h func()) {
	if r.Method != method {
		w.Header().Set("Allow", method)
		w.Header().Set("x-ms-error-code", "405000")
		writeJSON(w, http.StatusMethodNotAllowed, dps.ErrorDetails{
			ErrorCode: 405000, TrackingID: trackingID, TimestampUTC: dps.Time{Time: s.now()},
			Message: "Method " + r.Method + " is not allowed here: use " + method + ".",
		})
		return
	}
	h()
}

// splitPath splits an escaped path into its percent-decoded segments,
// ignoring a leading and a trailing slash.
func splitPath(escaped string) ([]string, bool) {
	escaped = strings.TrimSuffix(strings.TrimPrefix(escaped, "/"), "/")
	if escaped == "" {
		return nil, true
	}
	segs := strings.Split(escaped, "/")
	for i, seg := range segs {
		v, err := url.PathUnescape(seg)
		if err != nil {
			return nil, false
		}
		segs[i] = v
	}
	return segs, true
}

// readBody reads a request body of at most the message limit (the
// MaxBytesReader of serveHTTP).
// Kinds: Invalid (too large, or the read failed).
func readBody(r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(r.Body)
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, station.Errorf("read request", station.KindInvalid, "the body exceeds %d bytes, the message limit", tooBig.Limit)
	}
	if err != nil {
		return nil, station.Errorf("read request", station.KindInvalid, "read the body: %w", err)
	}
	return b, nil
}

// writeJSON writes v as the JSON body of an answer with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	w.Write(b)
}
