package devserver

import (
	"context"
	"crypto/rand"
	"net/http"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// authorizeService checks a service API request's SAS token (§7.5): the
// policy named by skn exists, the signature is that policy's over the raw
// sr, the token has not expired and sr covers this service's host name
// (the configured one, the listener's address or the Host the request was
// sent to). The policy's rights are checked by authorize.
// Kinds: Unauthorized.
func (s *Server) authorizeService(r *http.Request) error {
	const op = "authorize service request"
	h := r.Header.Get("Authorization")
	if h == "" {
		return station.Errorf(op, station.KindUnauthorized, "the request has no Authorization header: send a SAS token made from the service connection string")
	}
	tok, err := dps.ParseSAS(h)
	if err != nil {
		return station.E(op, station.KindUnauthorized, err)
	}
	key, ok := s.serviceKeys[strings.ToLower(tok.KeyName)]
	if !ok {
		return station.Errorf(op, station.KindUnauthorized, "no shared access policy %q: use the policy of the connection string", tok.KeyName)
	}
	if err := tok.Verify(key, s.now()); err != nil {
		return station.E(op, station.KindUnauthorized, err)
	}
	var errCover error
	for _, host := range []string{s.cfg.HostName, s.Addr(), r.Host} {
		if host == "" {
			continue
		}
		if errCover = tok.CoversResource(host + r.URL.Path); errCover == nil {
			return nil
		}
	}
	return station.E(op, station.KindUnauthorized, errCover)
}

// serveEnrollment answers PUT, GET and DELETE /enrollments/{regId} (§7.1).
func (s *Server) serveEnrollment(w http.ResponseWriter, r *http.Request, trackingID, registrationID string) {
	if err := s.authorize(r, readOrWrite(r, RightEnrollmentRead, RightEnrollmentWrite)); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if err := checkRegistrationID(registrationID); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	serveResource(s, w, r, trackingID, resource[*dps.IndividualEnrollment]{
		kind: "enrollment", idKey: "registrationId", id: registrationID,
		put: func(ctx context.Context) (*dps.IndividualEnrollment, string, []any, error) {
			e, err := s.putEnrollment(ctx, r, registrationID)
			if err != nil {
				return nil, "", nil, err
			}
			return e, e.ETag, nil, nil
		},
		get: func(ctx context.Context) (*dps.IndividualEnrollment, string, error) {
			e, err := s.enrollmentWithState(ctx, registrationID)
			if err != nil {
				return nil, "", err
			}
			return e, e.ETag, nil
		},
		del: func(ctx context.Context, ifMatch string) error {
			return s.db.deleteEnrollment(ctx, registrationID, ifMatch)
		},
	})
}

// resource is one resource of the service API (an enrollment, an
// enrollment group, a CA certificate) as PUT, GET and DELETE
// /{collection}/{id} serve it: put and get return the value to answer with
// and its ETag; put may add attributes to its log line.
type resource[T any] struct {
	kind, idKey, id string
	put             func(ctx context.Context) (T, string, []any, error)
	get             func(ctx context.Context) (T, string, error)
	del             func(ctx context.Context, ifMatch string) error
}

// serveResource answers PUT, GET and DELETE of res (authorization and the
// ID's syntax are checked before): 200 with the value and its ETag, 204
// for a delete, 405 for another method.
func serveResource[T any](s *Server, w http.ResponseWriter, r *http.Request, trackingID string, res resource[T]) {
	ctx := r.Context()
	switch r.Method {
	case http.MethodPut:
		v, etag, attrs, err := res.put(ctx)
		if err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		s.log.Info(res.kind+" written", append([]any{"trackingId", trackingID, res.idKey, res.id}, attrs...)...)
		w.Header().Set("ETag", etag)
		writeJSON(w, http.StatusOK, v)
	case http.MethodGet:
		v, etag, err := res.get(ctx)
		if err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		w.Header().Set("ETag", etag)
		writeJSON(w, http.StatusOK, v)
	case http.MethodDelete:
		if err := res.del(ctx, r.Header.Get("If-Match")); err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		s.log.Info(res.kind+" deleted", "trackingId", trackingID, res.idKey, res.id)
		w.WriteHeader(http.StatusNoContent)
	default:
		s.allow(w, r, trackingID, "PUT, GET, DELETE", nil)
	}
}

// putEnrollment validates and stores an individual enrollment.
// Kinds: Invalid, Conflict (etag), Unavailable, Internal.
func (s *Server) putEnrollment(ctx context.Context, r *http.Request, registrationID string) (*dps.IndividualEnrollment, error) {
	b, err := readBody(r)
	if err != nil {
		return nil, err
	}
	e, err := DecodeEnrollment(b, registrationID)
	if err != nil {
		return nil, err
	}
	if e.ETag != "" && r.Header.Get("If-Match") == "" {
		// Node sends If-Match itself; the body's etag counts the same.
		r.Header.Set("If-Match", e.ETag)
	}
	if t := e.Attestation.SymmetricKey; t != nil && strings.EqualFold(e.Attestation.Type, dps.AttestationSymmetricKey) {
		// DPS generates the keys a caller leaves out.
		if t.PrimaryKey == "" {
			t.PrimaryKey = randomKey()
		}
		if t.SecondaryKey == "" {
			t.SecondaryKey = randomKey()
		}
	}
	stored, err := s.db.putEnrollment(ctx, *e, r.Header.Get("If-Match"), s.now())
	if err != nil {
		return nil, err
	}
	if reg, err := s.db.registration(ctx, registrationID); err == nil {
		stored.RegistrationState = reg.state()
	}
	return stored, nil
}

// DecodeEnrollment reads the body of PUT /enrollments/{regId}: an
// IndividualEnrollment whose registrationId, when set, equals the URL's
// (ignoring case), with an attestation DPS accepts (a TPM enrollment
// holds an RSA EK). The read-only fields (registrationState, times) are
// cleared; a disabled provisioningStatus is spelled "disabled".
// Kinds: Invalid.
func DecodeEnrollment(body []byte, registrationID string) (*dps.IndividualEnrollment, error) {
	const op = "read enrollment"
	var e dps.IndividualEnrollment
	if err := dps.Decode(body, &e); err != nil {
		return nil, err
	}
	if e.RegistrationID == "" {
		e.RegistrationID = registrationID
	}
	if !strings.EqualFold(e.RegistrationID, registrationID) {
		return nil, station.Errorf(op, station.KindInvalid,
			"the body's registrationId %.130q is not the URL's %.130q: send the same ID in both", e.RegistrationID, registrationID)
	}
	e.RegistrationState = nil
	e.CreatedDateTimeUTC, e.LastUpdatedDateTimeUTC = dps.Time{}, dps.Time{}
	switch {
	case e.ProvisioningStatus == "":
		e.ProvisioningStatus = dps.ProvisioningEnabled
	case strings.EqualFold(e.ProvisioningStatus, dps.ProvisioningEnabled):
		e.ProvisioningStatus = dps.ProvisioningEnabled
	case strings.EqualFold(e.ProvisioningStatus, dps.ProvisioningDisabled):
		e.ProvisioningStatus = dps.ProvisioningDisabled
	default:
		return nil, station.Errorf(op, station.KindInvalid, "provisioningStatus %.20q: use enabled or disabled", e.ProvisioningStatus)
	}
	a := &e.Attestation
	switch strings.ToLower(a.Type) {
	case strings.ToLower(dps.AttestationTPM):
		a.Type = dps.AttestationTPM
		if a.TPM == nil || a.TPM.EndorsementKey == "" {
			return nil, station.Errorf(op, station.KindInvalid, "a TPM enrollment needs attestation.tpm.endorsementKey")
		}
		ek, err := decodeTPMKey(a.TPM.EndorsementKey, "attestation.tpm.endorsementKey")
		if err != nil {
			return nil, err
		}
		if _, err := ekModulus(ek); err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "attestation.tpm.endorsementKey: %w", err)
		}
	case strings.ToLower(dps.AttestationSymmetricKey):
		a.Type = dps.AttestationSymmetricKey
		if err := checkSymmetricKeys(op, a); err != nil {
			return nil, err
		}
	case strings.ToLower(dps.AttestationX509):
		a.Type = dps.AttestationX509
		if a.X509 == nil {
			return nil, station.Errorf(op, station.KindInvalid, "an X.509 enrollment needs attestation.x509")
		}
	case "":
		return nil, station.Errorf(op, station.KindInvalid, "the enrollment has no attestation.type: use tpm, symmetricKey or x509")
	default:
		return nil, station.Errorf(op, station.KindInvalid, "attestation.type %.20q: use tpm, symmetricKey or x509", a.Type)
	}
	if len(e.IoTHubs) == 0 && e.IoTHubHostName == "" && strings.EqualFold(e.AllocationPolicy, dps.AllocationStatic) {
		return nil, station.Errorf(op, station.KindInvalid, "static allocation needs one hub in iotHubs")
	}
	return &e, nil
}

// randomKey returns a fresh 64-byte key in base64, as DPS generates.
func randomKey() string {
	b := make([]byte, 64)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail
	}
	return dps.EncodeKey(b)
}

// enrollmentWithState returns an enrollment with its registration state.
// Kinds: NotFound.
func (s *Server) enrollmentWithState(ctx context.Context, registrationID string) (*dps.IndividualEnrollment, error) {
	e, err := s.db.enrollment(ctx, registrationID)
	if err != nil {
		return nil, err
	}
	if reg, err := s.db.registration(ctx, registrationID); err == nil {
		e.RegistrationState = reg.state()
	}
	return e, nil
}

// attestationMechanism answers POST /enrollments/{regId}/attestationmechanism:
// the enrollment's attestation, keys included.
func (s *Server) attestationMechanism(w http.ResponseWriter, r *http.Request, trackingID, registrationID string) {
	if err := s.authorize(r, RightEnrollmentRead); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	e, err := s.db.enrollment(r.Context(), registrationID)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	writeJSON(w, http.StatusOK, e.Attestation)
}

// serveRegistration answers GET and DELETE /registrations/{regId}: a
// device's registration state (§7.1).
func (s *Server) serveRegistration(w http.ResponseWriter, r *http.Request, trackingID, registrationID string) {
	ctx := r.Context()
	if err := s.authorize(r, readOrWrite(r, RightRegistrationStatusRead, RightRegistrationStatusWrite)); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	switch r.Method {
	case http.MethodGet:
		reg, err := s.db.registration(ctx, registrationID)
		if err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		w.Header().Set("ETag", reg.ETag)
		writeJSON(w, http.StatusOK, reg.state())
	case http.MethodDelete:
		if err := s.db.deleteRegistration(ctx, registrationID, r.Header.Get("If-Match")); err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		s.log.Info("registration deleted", "trackingId", trackingID, "registrationId", registrationID)
		w.WriteHeader(http.StatusNoContent)
	default:
		s.allow(w, r, trackingID, "GET, DELETE", nil)
	}
}
