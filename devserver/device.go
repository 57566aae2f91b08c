package devserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// attestation is one way for devices to prove who they are (§4, §5, §6).
// The device API picks it by the enrollment's attestation type: TPM,
// symmetric key or X.509.
type attestation interface {
	// challenge answers a register request that carries no credentials.
	// done is true when it wrote the answer (the TPM challenge); false
	// makes the request fail with 401. Kinds: Unauthorized (the device
	// does not match its enrollment), Invalid, NotFound.
	challenge(ctx context.Context, w http.ResponseWriter, req *deviceRequest) (done bool, err error)
	// authenticate checks the credentials of a register, poll or lookup
	// against the enrollment and returns the device's proven identity.
	// Kinds: Unauthorized, NotFound (no challenge was issued).
	authenticate(ctx context.Context, req *deviceRequest) (*identity, error)
	// result runs during assignment: it returns the identity the device
	// proved last (its hub key) and the attestation part of its final
	// registration state (TPM: the second activation blob).
	// Kinds: Invalid, NotFound, Internal.
	result(ctx context.Context, e *dps.IndividualEnrollment) (*identity, *dps.DeviceRegistrationState, error)
}

// identity is what an attestation proved about a device.
type identity struct {
	RegistrationID string // as enrolled
	Key            []byte // the SAS key of the device in its hub; nil for X.509
}

// deviceRequest is one request of the device API, over any transport.
type deviceRequest struct {
	r              *http.Request // nil over MQTT
	transport      string        // "https" or "mqtt"
	authorization  string        // the SAS token: the Authorization header, or the MQTT password
	tls            *tls.ConnectionState
	trackingID     string
	registrationID string // from the URL
	body           *dps.DeviceRegistration
	enrollment     *dps.IndividualEnrollment
	now            time.Time
	idScope        string
	x509           *x509Proof // what the TLS client certificate proved; nil without one
	// group is the enrollment group the device attested through (X.509
	// signing certificate or symmetric-key derived key); nil for an
	// individual enrollment.
	group  *dps.EnrollmentGroup
	remote string // the client's address (host:port), for geoLatency allocation
}

// sas parses the request's Authorization header; nil when there is none.
// Kinds: Unauthorized (a malformed token).
func (d *deviceRequest) sas() (*dps.SAS, error) {
	h := d.authorization
	if h == "" {
		return nil, nil
	}
	tok, err := dps.ParseSAS(h)
	if err != nil {
		return nil, station.E("check device token", station.KindUnauthorized, err)
	}
	return tok, nil
}

// clientChain returns the TLS client certificate chain of the request
// (HTTPS or MQTT), leaf first; nil when there is none.
func (d *deviceRequest) clientChain() []*x509.Certificate {
	if d.tls == nil {
		return nil
	}
	return d.tls.PeerCertificates
}

// verifySAS checks a device token with key: signature, expiry, the resource
// {idScope}/registrations/{regId} and the key name "registration" (§4.7).
// Kinds: Unauthorized.
func (d *deviceRequest) verifySAS(tok *dps.SAS, key []byte) error {
	const op = "check device token"
	if err := tok.MatchResource(dps.DeviceResource(d.idScope, d.registrationID)); err != nil {
		return err
	}
	if tok.KeyName != "" && !strings.EqualFold(tok.KeyName, dps.RegistrationKeyName) {
		return station.Errorf(op, station.KindUnauthorized, "the token's key name is %q, not %q", tok.KeyName, dps.RegistrationKeyName)
	}
	if err := tok.Verify(key, d.now); err != nil {
		return station.E(op, station.KindUnauthorized, err)
	}
	return nil
}

// DecodeDeviceRegistration reads the body of a register or lookup request
// (§1.3) for the registration ID of the URL: any JSON object or nothing
// (some SDKs send no body); a registrationId in the body must equal the
// URL's, ignoring case. Kinds: Invalid.
func DecodeDeviceRegistration(body []byte, registrationID string) (*dps.DeviceRegistration, error) {
	var reg dps.DeviceRegistration
	if err := dps.Decode(body, &reg); err != nil {
		return nil, err
	}
	if reg.RegistrationID != "" && !strings.EqualFold(reg.RegistrationID, registrationID) {
		return nil, station.Errorf("read device registration", station.KindInvalid,
			"the body's registrationId %.130q is not the URL's %.130q: send the same ID in both", reg.RegistrationID, registrationID)
	}
	return &reg, nil
}

// newDeviceRequest checks the scope and the registration ID of a device
// request and reads its body and enrollment. Kinds: Unauthorized (wrong
// scope, no enrollment: DPS does not tell them apart), Invalid.
func (s *Server) newDeviceRequest(ctx context.Context, r *http.Request, trackingID, scope, registrationID string, withBody bool) (*deviceRequest, error) {
	d := &deviceRequest{r: r, transport: "https", authorization: r.Header.Get("Authorization"), tls: r.TLS, trackingID: trackingID, remote: r.RemoteAddr}
	var body []byte
	if withBody {
		b, err := readBody(r)
		if err != nil {
			return nil, err
		}
		body = b
	}
	return d, s.openDeviceRequest(ctx, d, scope, registrationID, body)
}

// openDeviceRequest completes d, whatever its transport: it checks the
// scope and the registration ID, decodes body (nil or empty: no body) and
// reads the enrollment. Kinds: Unauthorized (wrong scope, no enrollment),
// Invalid.
func (s *Server) openDeviceRequest(ctx context.Context, d *deviceRequest, scope, registrationID string, body []byte) error {
	const op = "read device request"
	d.registrationID, d.now, d.idScope = registrationID, s.now(), s.idScope
	if !strings.EqualFold(scope, s.idScope) {
		return station.Errorf(op, station.KindUnauthorized, "ID scope %.40q is not this service's %s: check the device's ID scope", scope, s.idScope)
	}
	if err := checkRegistrationID(registrationID); err != nil {
		return err
	}
	d.body = &dps.DeviceRegistration{}
	if len(body) > 0 {
		var err error
		if d.body, err = DecodeDeviceRegistration(body, registrationID); err != nil {
			return err
		}
	}
	if chain := d.clientChain(); len(chain) > 0 && d.authorization == "" {
		// X.509 (§6): the certificate picks the enrollment or group.
		return s.attestX509(ctx, d, chain)
	}
	e, err := s.db.enrollment(ctx, registrationID)
	if station.KindOf(err) == station.KindNotFound {
		// No individual enrollment (which wins over any group, §5.2): a
		// symmetric-key group whose derived key signed the token.
		if gerr := s.attestSymmetricKeyGroup(ctx, d); gerr == nil || station.KindOf(gerr) != station.KindUnauthorized {
			return gerr
		}
		return station.E(op, station.KindUnauthorized, err)
	}
	if err != nil {
		return err
	}
	d.enrollment = e
	return nil
}

// attestationFor returns the attestation of an enrollment.
// Kinds: Unauthorized (a type this server does not attest yet).
func (s *Server) attestationFor(e *dps.IndividualEnrollment) (attestation, error) {
	a, ok := s.attest[strings.ToLower(e.Attestation.Type)]
	if !ok {
		return nil, station.Errorf("attest device", station.KindUnauthorized,
			"enrollment %q uses %q attestation, which this devserver does not support yet: enroll the device with TPM or symmetric-key attestation",
			e.RegistrationID, e.Attestation.Type)
	}
	return a, nil
}

// authenticate runs the attestation of a request that must carry
// credentials. Kinds: Unauthorized.
func (s *Server) authenticate(ctx context.Context, d *deviceRequest) (attestation, *identity, error) {
	a, err := s.attestationFor(d.enrollment)
	if err != nil {
		return nil, nil, err
	}
	id, err := a.authenticate(ctx, d)
	if err != nil {
		if k := station.KindOf(err); k == station.KindNotFound || k == station.KindInvalid {
			err = station.E("authenticate device", station.KindUnauthorized, err)
		}
		return nil, nil, err
	}
	return a, id, nil
}

// register answers PUT /{idScope}/registrations/{regId}/register (§1.5,
// §4.3): the TPM challenge to a request without Authorization, 202
// "assigning" with an operation ID to an authenticated one.
func (s *Server) register(w http.ResponseWriter, r *http.Request, trackingID, scope, registrationID string) {
	ctx := r.Context()
	log := s.log.With("trackingId", trackingID, "registrationId", registrationID)
	log.Debug("register", "apiVersion", r.URL.Query().Get("api-version"))
	if err := s.throttleRegistration(); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	d, err := s.newDeviceRequest(ctx, r, trackingID, scope, registrationID, true)
	if err != nil {
		s.countRegistrationRefused(d, err)
		s.writeError(w, r, trackingID, err)
		return
	}
	s.noteRegisterRequest(d)
	if r.Header.Get("Authorization") == "" && d.x509 == nil {
		a, err := s.attestationFor(d.enrollment)
		if err != nil {
			s.countRegistrationRefused(d, err)
			s.writeError(w, r, trackingID, err)
			return
		}
		done, err := a.challenge(ctx, w, d)
		if err == nil && !done {
			err = station.Errorf("register device", station.KindUnauthorized, "the request has no Authorization header")
		}
		if err != nil {
			s.countRegistrationRefused(d, err)
			s.writeError(w, r, trackingID, err)
			return
		}
		log.Info("TPM challenge sent")
		return
	}
	st, err := s.startRegistration(ctx, d, log)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	w.Header()["retry-after"] = []string{retryAfter(s.cfg.RetryAfter)} // lower case, verbatim (§11.1)
	writeJSON(w, http.StatusAccepted, st)
}

// startRegistration is the transport-neutral core of an authenticated
// register: it authenticates d, starts an operation and its assignment,
// and returns the 202 "assigning" answer. Kinds: Unauthorized, Internal.
func (s *Server) startRegistration(ctx context.Context, d *deviceRequest, log *slog.Logger) (*dps.RegistrationOperationStatus, error) {
	s.noteRegisterRequest(d) // over MQTT, the first register request
	if _, _, err := s.authenticate(ctx, d); err != nil {
		s.countRegistrationRefused(d, err)
		return nil, err
	}
	csr, err := s.acceptCSR(d)
	if err != nil {
		s.countRegistrationRefused(d, err)
		return nil, err
	}
	opID := newOperationID()
	now := s.now()
	var group string
	var tps []string
	if d.x509 != nil {
		tps = d.x509.thumbprints
	}
	if d.group != nil {
		group = d.group.EnrollmentGroupID
	}
	if err := s.db.startOperation(ctx, opID, d.enrollment.RegistrationID, group, tps, d.body.Payload, now, now.Add(s.cfg.OperationTTL)); err != nil {
		if station.KindOf(err) == station.KindNotFound {
			err = station.E("register device", station.KindUnauthorized, err)
		}
		s.countRegistrationRefused(d, err)
		return nil, err
	}
	if csr != nil {
		s.csrs.put(opID, csr)
	}
	s.countRegistrationAccepted(opID, d)
	s.keepAllocationContext(opID, d)
	s.startAssignment(opID, d.trackingID)
	log.Info("registration accepted", "operationId", opID, "transport", d.transport)
	return &dps.RegistrationOperationStatus{OperationID: opID, Status: dps.StatusAssigning}, nil
}

// poll answers GET /{idScope}/registrations/{regId}/operations/{opId}:
// 202 "assigning" with retry-after while the assignment runs, then 200 with
// the final state (§1.5).
func (s *Server) poll(w http.ResponseWriter, r *http.Request, trackingID, scope, registrationID, opID string) {
	ctx := r.Context()
	d, err := s.newDeviceRequest(ctx, r, trackingID, scope, registrationID, false)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	status, st, err := s.operationStatus(ctx, d, opID)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if status == http.StatusAccepted {
		w.Header()["retry-after"] = []string{retryAfter(s.cfg.RetryAfter)}
	}
	writeJSON(w, status, st)
}

// operationStatus is the transport-neutral core of a poll: it
// authenticates d and returns 202 with "assigning" while the assignment
// runs, then 200 with the final state (§1.5). A device polling faster
// than Quotas.PollsPerDevice is throttled (after authentication, so that
// nobody else spends its budget). Kinds: Unauthorized, NotFound,
// Unavailable (throttled), Internal.
func (s *Server) operationStatus(ctx context.Context, d *deviceRequest, opID string) (int, *dps.RegistrationOperationStatus, error) {
	if _, _, err := s.authenticate(ctx, d); err != nil {
		return 0, nil, err
	}
	if err := s.throttlePoll(d.registrationID); err != nil {
		return 0, nil, err
	}
	o, err := s.db.operation(ctx, opID, d.now)
	if err == nil && !strings.EqualFold(o.RegistrationID, d.registrationID) {
		err = station.Errorf("poll operation", station.KindNotFound, "operation %.80q is not one of registration %q", opID, d.registrationID)
	}
	if err != nil {
		return 0, nil, err
	}
	if o.Status == dps.StatusAssigning {
		return http.StatusAccepted, &dps.RegistrationOperationStatus{
			OperationID: o.ID, Status: dps.StatusAssigning,
			RegistrationState: &dps.DeviceRegistrationState{RegistrationID: o.RegistrationID, Status: dps.StatusAssigning},
		}, nil
	}
	var state dps.DeviceRegistrationState
	if err := json.Unmarshal(o.Result, &state); err != nil {
		return 0, nil, station.E("poll operation", station.KindInternal, err)
	}
	return http.StatusOK, &dps.RegistrationOperationStatus{OperationID: o.ID, Status: o.Status, RegistrationState: &state}, nil
}

// lookup answers POST /{idScope}/registrations/{regId}: the device's
// registration state, bare (§1.1). A TPM device without Authorization
// gets the challenge first, as for register.
func (s *Server) lookup(w http.ResponseWriter, r *http.Request, trackingID, scope, registrationID string) {
	ctx := r.Context()
	if err := s.throttleRegistration(); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	d, err := s.newDeviceRequest(ctx, r, trackingID, scope, registrationID, true)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if r.Header.Get("Authorization") == "" && d.x509 == nil {
		a, err := s.attestationFor(d.enrollment)
		if err == nil {
			var done bool
			if done, err = a.challenge(ctx, w, d); err == nil && done {
				return
			}
			if err == nil {
				err = station.Errorf("look up registration", station.KindUnauthorized, "the request has no Authorization header")
			}
		}
		s.writeError(w, r, trackingID, err)
		return
	}
	if _, _, err := s.authenticate(ctx, d); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	reg, err := s.db.registration(ctx, registrationID)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	writeJSON(w, http.StatusOK, reg.state()) // not billable (billableOperations)
}

// checkRegistrationID checks a registration ID's shape: 1 to 128
// characters, alphanumerics and - . _ : (§6). Kinds: Invalid.
func checkRegistrationID(id string) error {
	ok := id != "" && len(id) <= 128
	for i := 0; ok && i < len(id); i++ {
		c := id[i]
		ok = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._:", c) >= 0
	}
	if !ok {
		return station.Errorf("check registration ID", station.KindInvalid,
			"registration ID %.130q: use 1 to 128 letters, digits and - . _ :", id)
	}
	return nil
}

// newOperationID returns an operation ID shaped like DPS's:
// 4.<16 hex digits>.<uuid>.
func newOperationID() string {
	u := uuid()
	return "4." + strings.ReplaceAll(uuid(), "-", "")[:16] + "." + u
}

// startAssignment runs the assignment of operation opID in a goroutine,
// unless the server is closing (the operation then resumes at the next
// New).
func (s *Server) startAssignment(opID, trackingID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		log := s.log.With("trackingId", trackingID, "operationId", opID)
		if d := s.cfg.AssignmentDelay; d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-s.ctx.Done():
				t.Stop()
				return
			}
		}
		if err := s.assign(s.ctx, opID, log); err != nil {
			if s.ctx.Err() != nil {
				return // closing: resumed at the next New
			}
			s.countRegistrationDone(opID, "error")
			log.Error("assignment failed", "err", err)
		}
	}()
}

// assign decides the outcome of an operation: disabled, failed (no hub),
// or assigned to a hub with the device's key and twin.
func (s *Server) assign(ctx context.Context, opID string, log *slog.Logger) error {
	now := s.now()
	o, err := s.db.operation(ctx, opID, now)
	if err != nil {
		return err
	}
	prev, err := s.db.registration(ctx, o.RegistrationID)
	if err != nil {
		return err
	}
	e, groupID, err := s.operationEnrollment(ctx, o)
	if err != nil {
		return err
	}
	reg := &registration{
		RegistrationID: prev.RegistrationID,
		Created:        prev.Created,
		Updated:        now,
		ETag:           newRegistrationETag(),
		Enabled:        true, // a failed attempt leaves an earlier assignment as it was
	}
	state := &dps.DeviceRegistrationState{}
	var issued string
	csr := s.csrs.take(opID)

	switch {
	case strings.EqualFold(e.ProvisioningStatus, dps.ProvisioningDisabled):
		reg.Status, reg.Enabled = dps.StatusDisabled, false
		reg.ErrorCode, reg.ErrorMessage = dps.CodeUnauthorized, "The enrollment is disabled."
	default:
		al, err := s.chooseHub(ctx, opID, e, groupID, prev)
		var ae *allocationError
		if errors.As(err, &ae) {
			reg.Status, reg.ErrorCode, reg.ErrorMessage = dps.StatusFailed, ae.code, ae.message
			break
		}
		if err != nil {
			return err
		}
		hub := al.hub
		a, err := s.attestationFor(e)
		if err != nil {
			return err
		}
		id, st, err := a.result(ctx, e)
		if err != nil {
			return err
		}
		state = st
		if groupID != "" {
			switch {
			case state.X509 != nil:
				state.X509.EnrollmentGroupID = groupID
			case state.SymmetricKey != nil:
				state.SymmetricKey.EnrollmentGroupID = groupID
			}
		}
		reg.Thumbprints = o.Thumbprints
		if csr != nil {
			regID := e.DeviceID
			if regID == "" {
				regID = e.RegistrationID
			}
			pemChain, tps, ae := s.issue(ctx, regID, csr)
			if ae != nil {
				reg.Status, reg.ErrorCode, reg.ErrorMessage = dps.StatusFailed, ae.code, ae.message
				break
			}
			// The hub accepts the issued certificate as well as the one the
			// device attested with.
			issued, reg.Thumbprints = pemChain, append(slices.Clone(o.Thumbprints), tps...)
		}
		reg.Status = dps.StatusAssigned
		reg.Hub = hub
		reg.DeviceID = e.DeviceID
		if reg.DeviceID == "" {
			reg.DeviceID = e.RegistrationID
		}
		reg.Key = id.Key
		var reset bool
		reg.Substatus, reset = reprovision(prev, hub, e)
		if reset {
			// The device data comes from the enrollment (or a custom
			// allocation webhook's initialTwin, which overrides it, §8): at
			// the first assignment, and when the policy says not to migrate it.
			reg.Twin, reg.Tags = desired(e), initialTags(e)
			if al.twin != nil {
				reg.Twin = al.twin
			}
			reg.IoTEdge = e.Capabilities != nil && e.Capabilities.IoTEdge
			reg.DataETag = newETag()
		} else {
			// Kept on the same hub, or migrated from the previous one.
			reg.Twin, reg.Tags, reg.IoTEdge, reg.DataETag = prev.Twin, prev.Tags, prev.IoTEdge, prev.DataETag
			if !strings.EqualFold(prev.Hub, hub) {
				reg.PreviousHub = prev.Hub
			}
		}
		reg.Payload = al.payload // a custom allocation webhook's, for the device
	}

	full := reg.state()
	full.X509, full.SymmetricKey, full.TPM = state.X509, state.SymmetricKey, state.TPM
	full.IssuedClientCertificate = issued
	result, err := json.Marshal(full)
	if err != nil {
		return station.E("assign device", station.KindInternal, err)
	}
	if err := s.db.finishOperation(ctx, opID, reg, result); err != nil {
		return err
	}
	s.countRegistrationDone(opID, reg.Status)
	log.Info("assignment done", "status", reg.Status, "hub", reg.Hub, "deviceId", reg.DeviceID, "errorCode", reg.ErrorCode)
	return nil
}

// chooseHub allocates a hub to operation opID (allocation_custom.go),
// keeping the earlier one when the enrollment's reprovision policy says
// not to update the hub assignment (§10).
func (s *Server) chooseHub(ctx context.Context, opID string, e *dps.IndividualEnrollment, groupID string, prev *registration) (*allocation, error) {
	ac := s.takeAllocationContext(opID)
	if prev.Hub != "" && e.ReprovisionPolicy != nil && !e.ReprovisionPolicy.UpdateHubAssignment {
		for _, h := range s.cfg.Hubs {
			if strings.EqualFold(h.Name, prev.Hub) {
				return &allocation{hub: h.Name}, nil
			}
		}
	}
	return s.allocation(ctx, e, groupID, prev, ac)
}

// reprovision says how an assignment to hub relates to the device's
// previous one (§10), by the enrollment's reprovision policy (absent:
// update the hub assignment and migrate the data): its substatus, and
// whether the device data (twin, capabilities) is set afresh from the
// enrollment (reset) rather than kept or migrated.
//
//   - no previous hub: initialAssignment, data from the enrollment;
//   - the same hub, migrateDeviceData or updateHubAssignment false (never
//     re-provision): reprovisionedToInitialAssignment, data kept, as real
//     DPS answers a device that registers again to the hub it has;
//   - the same hub, updateHubAssignment without migrateDeviceData:
//     deviceDataReset, data from the enrollment (DPS's factory reset);
//   - another hub: deviceDataMigrated with the data moved along, or
//     deviceDataReset without migrateDeviceData.
func reprovision(prev *registration, hub string, e *dps.IndividualEnrollment) (substatus string, reset bool) {
	policy := dps.ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
	if e.ReprovisionPolicy != nil {
		policy = *e.ReprovisionPolicy
	}
	switch {
	case prev.Hub == "":
		return dps.SubstatusInitialAssignment, true
	case strings.EqualFold(prev.Hub, hub) && (policy.MigrateDeviceData || !policy.UpdateHubAssignment):
		return dps.SubstatusReprovisionedToInitialAssignment, false
	case !policy.MigrateDeviceData:
		return dps.SubstatusDeviceDataReset, true
	}
	return dps.SubstatusDeviceDataMigrated, false
}

// initialTags returns the tags of an enrollment's initial twin, nil when
// there are none.
func initialTags(e *dps.IndividualEnrollment) json.RawMessage {
	if e.InitialTwin == nil || len(e.InitialTwin.Tags) == 0 || string(e.InitialTwin.Tags) == "null" {
		return nil
	}
	return e.InitialTwin.Tags
}

// desired returns the desired properties of an enrollment's initial twin,
// nil when there are none.
func desired(e *dps.IndividualEnrollment) json.RawMessage {
	if e.InitialTwin == nil || e.InitialTwin.Properties == nil || len(e.InitialTwin.Properties.Desired) == 0 {
		return nil
	}
	if string(e.InitialTwin.Properties.Desired) == "null" {
		return nil
	}
	return e.InitialTwin.Properties.Desired
}
