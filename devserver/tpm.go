package devserver

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/go-tpm/tpm2"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// tpmAttestation is TPM attestation over HTTPS (§4): an unauthenticated
// register carrying the EK and SRK gets a 401 challenge whose activation
// blob carries a fresh HMAC key to that TPM; the device proves it holds
// the key by signing its SAS tokens with it inside the TPM. The key of the
// last challenge is kept per registration (sealed), so that a second
// register without the tpm object (aziot) is verified too, and it becomes
// the device's IoT Hub key, sent again in the final registration state.
type tpmAttestation struct {
	db *store
}

func (t *tpmAttestation) challenge(ctx context.Context, w http.ResponseWriter, d *deviceRequest) (bool, error) {
	const op = "TPM challenge"
	if d.body.TPM == nil || d.body.TPM.EndorsementKey == "" {
		return false, nil
	}
	if d.body.TPM.StorageRootKey == "" {
		return false, station.Errorf(op, station.KindInvalid, "the request has no tpm.storageRootKey: send the SRK (0x81000001) with the EK")
	}
	ek, err := decodeTPMKey(d.body.TPM.EndorsementKey, "tpm.endorsementKey")
	if err != nil {
		return false, err
	}
	srk, err := decodeTPMKey(d.body.TPM.StorageRootKey, "tpm.storageRootKey")
	if err != nil {
		return false, err
	}
	if err := matchEK(d.enrollment, ek); err != nil {
		return false, err
	}
	act, err := dps.NewActivation(nil, ek, srk)
	if err != nil {
		return false, err
	}
	if err := t.db.putChallenge(ctx, d.enrollment.RegistrationID, &tpmChallenge{EK: ek, SRK: srk, Key: act.Key}, d.now); err != nil {
		return false, err
	}
	writeJSON(w, http.StatusUnauthorized, dps.NewTPMChallenge(act.AuthenticationKey()))
	return true, nil
}

func (t *tpmAttestation) authenticate(ctx context.Context, d *deviceRequest) (*identity, error) {
	const op = "authenticate TPM device"
	tok, err := d.sas()
	if err != nil {
		return nil, err
	}
	if tok == nil {
		return nil, station.Errorf(op, station.KindUnauthorized, "the request has no Authorization header")
	}
	c, err := t.db.challenge(ctx, d.enrollment.RegistrationID)
	if err != nil {
		return nil, err
	}
	// The enrollment may have changed since the challenge.
	if err := matchEK(d.enrollment, c.EK); err != nil {
		return nil, err
	}
	if d.body.TPM != nil && d.body.TPM.EndorsementKey != "" {
		ek, err := decodeTPMKey(d.body.TPM.EndorsementKey, "tpm.endorsementKey")
		if err != nil {
			return nil, station.E(op, station.KindUnauthorized, err)
		}
		if err := matchEK(d.enrollment, ek); err != nil {
			return nil, err
		}
	}
	if err := d.verifySAS(tok, c.Key); err != nil {
		return nil, err
	}
	return &identity{RegistrationID: d.enrollment.RegistrationID, Key: c.Key}, nil
}

func (t *tpmAttestation) result(ctx context.Context, e *dps.IndividualEnrollment) (*identity, *dps.DeviceRegistrationState, error) {
	c, err := t.db.challenge(ctx, e.RegistrationID)
	if err != nil {
		return nil, nil, err
	}
	// The same key again, in a new blob: the device imports it a second
	// time (§4.3 step 5) and signs its hub tokens with it (§4.8).
	act, err := dps.NewActivationWithKey(nil, c.EK, c.SRK, c.Key)
	if err != nil {
		return nil, nil, err
	}
	return &identity{RegistrationID: e.RegistrationID, Key: c.Key},
		&dps.DeviceRegistrationState{TPM: &dps.TPMRegistrationResult{AuthenticationKey: act.AuthenticationKey()}}, nil
}

// decodeTPMKey decodes a base64 TPM public area from a request.
// Kinds: Invalid.
func decodeTPMKey(s, field string) ([]byte, error) {
	s = strings.TrimSpace(s)
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		b, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "="))
	}
	if err != nil || len(b) == 0 {
		return nil, station.Errorf("read TPM key", station.KindInvalid, "%s is not base64", field)
	}
	return b, nil
}

// matchEK checks that ek, a TPM public area a device sent, is the EK of
// its enrollment, comparing RSA moduli (§4.2: enrollments may hold a
// TPM2B_PUBLIC or a bare TPMT_PUBLIC). Kinds: Unauthorized.
func matchEK(e *dps.IndividualEnrollment, ek []byte) error {
	const op = "match EK"
	if e.Attestation.TPM == nil {
		return station.Errorf(op, station.KindUnauthorized, "enrollment %q has no TPM endorsement key", e.RegistrationID)
	}
	enrolled, err := decodeTPMKey(e.Attestation.TPM.EndorsementKey, "the enrollment's endorsementKey")
	if err == nil {
		var want, got []byte
		if want, err = ekModulus(enrolled); err == nil {
			if got, err = ekModulus(ek); err == nil && !bytes.Equal(want, got) {
				err = fmt.Errorf("the device's EK is not the one enrolled for %q: enroll this device's EK", e.RegistrationID)
			}
		}
	}
	return station.E(op, station.KindUnauthorized, err)
}

// ekModulus returns the RSA modulus of a TPM public area given as a
// TPM2B_PUBLIC or a bare TPMT_PUBLIC. Kinds: Invalid.
func ekModulus(b []byte) ([]byte, error) {
	pub, err := parseTPMPublic(b)
	if err != nil {
		return nil, err
	}
	if pub.Type != tpm2.TPMAlgRSA {
		return nil, station.Errorf("read EK", station.KindInvalid, "the EK is of type %v, not RSA: DPS TPM attestation uses the RSA EK", pub.Type)
	}
	rsa, err := pub.Unique.RSA()
	if err != nil || len(rsa.Buffer) < 128 {
		return nil, station.Errorf("read EK", station.KindInvalid, "the EK has no RSA modulus")
	}
	return rsa.Buffer, nil
}

// parseTPMPublic parses a TPM2B_PUBLIC or, failing that, a bare
// TPMT_PUBLIC, refusing trailing bytes and never panicking. Kinds: Invalid.
func parseTPMPublic(b []byte) (*tpm2.TPMTPublic, error) {
	if len(b) >= 2 && int(binary.BigEndian.Uint16(b)) == len(b)-2 {
		if p, err := unmarshalTPMT(b[2:]); err == nil {
			return p, nil
		}
	}
	p, err := unmarshalTPMT(b)
	if err != nil {
		return nil, station.Errorf("read TPM public area", station.KindInvalid, "not a TPM2B_PUBLIC or TPMT_PUBLIC: %w", err)
	}
	return p, nil
}

func unmarshalTPMT(b []byte) (pub *tpm2.TPMTPublic, err error) {
	defer func() {
		if r := recover(); r != nil {
			pub, err = nil, fmt.Errorf("unparseable: %v", r)
		}
	}()
	pub, err = tpm2.Unmarshal[tpm2.TPMTPublic](b)
	if err != nil {
		return nil, err
	}
	if n := len(tpm2.Marshal(*pub)); n != len(b) {
		return nil, fmt.Errorf("%d bytes of garbage after the structure", len(b)-n)
	}
	return pub, nil
}
