package dps

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/kilnworks/kiln/station"
)

// RegisterSymmetricKey registers the device regID with symmetric-key
// attestation, as in §5: a register carrying a SAS token for
// {idScope}/registrations/{regID} signed with key (the device key: an
// individual enrollment's primary or secondary key, or one derived from a
// group key with DeriveDeviceKey), then polls of the operation with the
// same token (honouring retry-after, bounded, until ctx is done) until the
// status is final. The device then connects to the assigned hub with the
// same key. payload, when not nil, is sent as custom allocation data.
//
// A final status of failed or disabled is returned in the state with a nil
// error. Kinds: Unauthorized (DPS refused the token, or its TLS certificate
// did not check out), NotFound (DPS knows no such registration or
// operation), Unavailable (no answer, throttled, a server error), Invalid
// (a malformed answer, bad arguments).
func (c *DeviceClient) RegisterSymmetricKey(ctx context.Context, regID string, key []byte, payload json.RawMessage) (*DeviceRegistrationState, error) {
	const op = "register with DPS"
	if c.Endpoint == "" || c.IDScope == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the DPS endpoint and ID scope must be set: write the device's provisioning config")
	}
	if err := station.ValidRegistrationID(regID); err != nil {
		return nil, err
	}
	if len(key) == 0 {
		return nil, station.Errorf(op, station.KindInvalid, "no device key: write the enrollment's symmetric key into the device's provisioning config")
	}
	body, err := json.Marshal(DeviceRegistration{RegistrationID: regID, Payload: payload, ClientCertificateCSR: c.csr()})
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the custom payload is not JSON: %w", err)
	}
	base := c.baseURL(regID)
	token := NewDeviceSAS(c.IDScope, regID, key, c.now().Add(tokenLife))

	c.progress("register", "sending a token signed with the device key to "+c.Endpoint)
	st, err := c.call(ctx, op, http.MethodPut, base+"/register", body, token)
	if err != nil {
		return nil, err
	}
	rs, err := c.poll(ctx, op, base, regID, st, token)
	if err != nil || rs.Status != StatusAssigned {
		return rs, err
	}
	c.progress(StatusAssigned, fmt.Sprintf("device %s on hub %s", rs.DeviceID, rs.AssignedHub))
	return rs, nil
}
