package devserver

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Symmetric-key enrollment groups (§5.2). A device of a group has no
// individual enrollment: its key is base64(HMAC-SHA256(groupKey, regId)),
// derived from the group's primary or secondary key, and it signs its SAS
// token with that. The server finds the group by deriving the key of the
// requested registration ID from every symmetric-key group's keys and
// checking the token's signature with it; the first group (by ID) whose
// key verifies wins, whatever its provisioning status, so that a disabled
// group refuses its devices (status "disabled" at assignment) instead of
// letting them fall through to another group. The device then behaves as
// an individual enrollment of the group (see groupEnrollment) whose keys
// are the derived ones, which also become its IoT Hub keys.

// symmetricKeyGroup is a symmetric-key enrollment group with its decoded
// keys.
type symmetricKeyGroup struct {
	group *dps.EnrollmentGroup
	keys  [][]byte // primary, then secondary when it decodes
}

// groupKeyCache holds the symmetric-key groups with their keys decoded,
// so that a device request costs no database read and no unsealing. It
// is reloaded when the store's group generation moves (every group write
// moves it).
type groupKeyCache struct {
	mu     sync.Mutex
	loaded bool
	gen    int64
	groups []symmetricKeyGroup
}

// symmetricKeyGroups returns the symmetric-key enrollment groups in ID
// order, from the cache when no group was written since it was filled.
// Kinds: Unavailable, Internal.
func (s *Server) symmetricKeyGroups(ctx context.Context) ([]symmetricKeyGroup, error) {
	c := &s.groupKeys
	c.mu.Lock()
	defer c.mu.Unlock()
	gen := s.db.groupsGen.Load() // before reading: a write during the load triggers another
	if c.loaded && c.gen == gen {
		return c.groups, nil
	}
	var groups []symmetricKeyGroup
	for after := ""; ; {
		page, err := s.db.listGroups(ctx, after, 100)
		if err != nil {
			return nil, err
		}
		for i := range page {
			g := &page[i]
			sk := g.Attestation.SymmetricKey
			if !strings.EqualFold(g.Attestation.Type, dps.AttestationSymmetricKey) || sk == nil {
				continue
			}
			sg := symmetricKeyGroup{group: g}
			for _, k := range []string{sk.PrimaryKey, sk.SecondaryKey} {
				if k == "" {
					continue
				}
				if b, err := dps.DecodeKey(k); err == nil && len(b) > 0 {
					sg.keys = append(sg.keys, b)
				}
			}
			if len(sg.keys) > 0 {
				groups = append(groups, sg)
			}
		}
		if len(page) < 100 {
			break
		}
		after = regKey(page[len(page)-1].EnrollmentGroupID)
	}
	c.loaded, c.gen, c.groups = true, gen, groups
	return groups, nil
}

// attestSymmetricKeyGroup finds the symmetric-key enrollment group whose
// derived key signed the request's SAS token and sets d.enrollment (the
// group seen as this device's enrollment, with the derived keys) and
// d.group. Only the signature picks the group: authenticate then checks
// the whole token (resource, key name, expiry) with the derived key.
// Kinds: Unauthorized (no token, or no group's key signed it),
// Unavailable, Internal.
func (s *Server) attestSymmetricKeyGroup(ctx context.Context, d *deviceRequest) error {
	const op = "attest symmetric-key group device"
	tok, err := d.sas()
	if err != nil {
		return err
	}
	if tok == nil {
		return station.Errorf(op, station.KindUnauthorized,
			"no individual enrollment %q and no Authorization header: enroll the device, or sign a SAS token with its key derived from a symmetric-key enrollment group", d.registrationID)
	}
	groups, err := s.symmetricKeyGroups(ctx)
	if err != nil {
		return err
	}
	for _, g := range groups {
		for _, k := range g.keys {
			if tok.Verify(dps.DeriveDeviceKey(k, d.registrationID), time.Time{}) == nil { // zero time: signature only
				d.group = g.group
				d.enrollment = groupEnrollment(g.group, d.registrationID)
				return nil
			}
		}
	}
	return station.Errorf(op, station.KindUnauthorized,
		"no individual enrollment %q, and its token is signed with no key derived from a symmetric-key enrollment group's keys (%d groups tried): enroll the device, or derive its key from a group key as HMAC-SHA256(groupKey, registrationId)",
		d.registrationID, len(groups))
}

// deriveGroupKeys returns the symmetric keys of one device of a group:
// each group key, decoded, turned into base64(HMAC-SHA256(groupKey,
// registrationID)). A key that does not decode is left out.
func deriveGroupKeys(sk *dps.SymmetricKeyAttestation, registrationID string) *dps.SymmetricKeyAttestation {
	derive := func(k string) string {
		b, err := dps.DecodeKey(k)
		if k == "" || err != nil || len(b) == 0 {
			return ""
		}
		return dps.EncodeKey(dps.DeriveDeviceKey(b, registrationID))
	}
	return &dps.SymmetricKeyAttestation{PrimaryKey: derive(sk.PrimaryKey), SecondaryKey: derive(sk.SecondaryKey)}
}
