package devserver

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// symmetricKeyAttestation is symmetric-key attestation of individual
// enrollments (§5): every register and poll carries a SAS token for
// {idScope}/registrations/{regId} signed with the enrollment's primary or
// secondary key. There is no challenge. The enrollment's keys become the
// device's IoT Hub keys (§5.2): the primary is kept with the registration,
// the secondary is read from the enrollment when the hub asks (see
// Server.HubDevice).
type symmetricKeyAttestation struct{}

// challenge never answers: a symmetric-key device without a token is
// refused with 401.
func (symmetricKeyAttestation) challenge(context.Context, http.ResponseWriter, *deviceRequest) (bool, error) {
	return false, nil
}

func (symmetricKeyAttestation) authenticate(_ context.Context, d *deviceRequest) (*identity, error) {
	const op = "authenticate symmetric-key device"
	tok, err := d.sas()
	if err != nil {
		return nil, err
	}
	if tok == nil {
		return nil, station.Errorf(op, station.KindUnauthorized, "the request has no Authorization header: send a SAS token signed with the device key")
	}
	primary, secondary, err := enrollmentKeys(d.enrollment)
	if err != nil {
		return nil, err
	}
	// Find the key that signed the token (the zero time skips the expiry
	// check), then check everything with it, so that an expired token
	// signed with the primary key is reported as expired.
	key := primary
	if tok.Verify(primary, time.Time{}) != nil && len(secondary) > 0 && tok.Verify(secondary, time.Time{}) == nil {
		key = secondary
	}
	if err := d.verifySAS(tok, key); err != nil {
		return nil, err
	}
	return &identity{RegistrationID: d.enrollment.RegistrationID, Key: primary}, nil
}

func (symmetricKeyAttestation) result(_ context.Context, e *dps.IndividualEnrollment) (*identity, *dps.DeviceRegistrationState, error) {
	primary, _, err := enrollmentKeys(e)
	if err != nil {
		return nil, nil, err
	}
	return &identity{RegistrationID: e.RegistrationID, Key: primary},
		&dps.DeviceRegistrationState{SymmetricKey: &dps.SymmetricKeyRegistrationResult{}}, nil
}

// enrollmentKeys returns the decoded primary and secondary keys of a
// symmetric-key enrollment; secondary is nil when the enrollment has none.
// Kinds: Unauthorized (no usable primary key).
func enrollmentKeys(e *dps.IndividualEnrollment) (primary, secondary []byte, err error) {
	const op = "read enrollment keys"
	sk := e.Attestation.SymmetricKey
	if sk == nil || !strings.EqualFold(e.Attestation.Type, dps.AttestationSymmetricKey) {
		return nil, nil, station.Errorf(op, station.KindUnauthorized, "enrollment %q has no symmetric keys", e.RegistrationID)
	}
	primary, err = dps.DecodeKey(sk.PrimaryKey)
	if err != nil {
		return nil, nil, station.Errorf(op, station.KindUnauthorized, "the primary key of enrollment %q: %w", e.RegistrationID, err)
	}
	if sk.SecondaryKey != "" {
		if secondary, err = dps.DecodeKey(sk.SecondaryKey); err != nil {
			secondary = nil // the primary still works
		}
	}
	return primary, secondary, nil
}

// hubSecondaryKey returns the secondary IoT Hub key of a registration: the
// secondary key of its symmetric-key enrollment (for a group: the key
// derived from the group's secondary key), while that enrollment's primary
// key is still the one the device registered with; nil otherwise.
func (s *Server) hubSecondaryKey(ctx context.Context, r *registration) []byte {
	if len(r.Key) == 0 {
		return nil
	}
	var e *dps.IndividualEnrollment
	var err error
	if r.Group != "" {
		var g *dps.EnrollmentGroup
		if g, err = s.db.group(ctx, r.Group); err == nil {
			e = groupEnrollment(g, r.RegistrationID)
		}
	} else {
		e, err = s.db.enrollment(ctx, r.RegistrationID)
	}
	if err != nil || !strings.EqualFold(e.Attestation.Type, dps.AttestationSymmetricKey) {
		return nil
	}
	primary, secondary, err := enrollmentKeys(e)
	if err != nil || !bytes.Equal(primary, r.Key) {
		return nil
	}
	return secondary
}

// checkSymmetricKeys gives a symmetric-key attestation its (possibly empty)
// keys object and checks the keys given: base64 of 16 to 64 bytes. Keys
// left out are generated later, as DPS does. Kinds: Invalid.
func checkSymmetricKeys(op string, a *dps.AttestationMechanism) error {
	if a.SymmetricKey == nil {
		a.SymmetricKey = &dps.SymmetricKeyAttestation{}
	}
	for _, k := range []string{a.SymmetricKey.PrimaryKey, a.SymmetricKey.SecondaryKey} {
		if k == "" {
			continue
		}
		if b, err := dps.DecodeKey(k); err != nil || len(b) < 16 || len(b) > 64 {
			return station.Errorf(op, station.KindInvalid, "a symmetric key is not base64 of 16 to 64 bytes")
		}
	}
	return nil
}
