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

// groupKeyCache holds the symmetric-key groups with their decoded keys,
// so that a device request costs no database read and no unsealing. It
// is reloaded when the store's group generation moves (every group write
// moves it). hints remembers, per registration ID, which group key signed
// the device's last token, so that its polls and later registrations try
// that key first instead of every group's; a hint is only a first guess,
// checked like any other key, and the hints go with a reload.
type groupKeyCache struct {
	mu     sync.Mutex
	loaded bool
	gen    int64
	groups []symmetricKeyGroup
	hints  map[string]groupHint // by registration key
}

// groupHint points at one key of one group of a groupKeyCache load.
type groupHint struct{ group, key int }

// maxGroupHints bounds the hints kept: when full, they are dropped all at
// once (devices then pay one full search each).
const maxGroupHints = 1 << 14

// symmetricKeyGroups returns the symmetric-key enrollment groups in ID
// order, from the cache when no group was written since it was filled,
// with the generation of the load and the hint for registration key reg
// (ok false: none). Kinds: Unavailable, Internal.
func (s *Server) symmetricKeyGroups(ctx context.Context, reg string) (groups []symmetricKeyGroup, gen int64, hint groupHint, ok bool, err error) {
	c := &s.groupKeys
	c.mu.Lock()
	defer c.mu.Unlock()
	gen = s.db.groupsGen.Load() // before reading: a write during the load triggers another
	if c.loaded && c.gen == gen {
		hint, ok = c.hints[reg]
		return c.groups, gen, hint, ok, nil
	}
	for after := ""; ; {
		page, err := s.db.listGroups(ctx, after, 100)
		if err != nil {
			return nil, 0, groupHint{}, false, err
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
	c.loaded, c.gen, c.groups, c.hints = true, gen, groups, map[string]groupHint{}
	return groups, gen, groupHint{}, false, nil
}

// rememberGroupKey records the hint for registration key reg, unless the
// cache was reloaded since generation gen.
func (s *Server) rememberGroupKey(gen int64, reg string, h groupHint) {
	c := &s.groupKeys
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.loaded || c.gen != gen {
		return
	}
	if len(c.hints) >= maxGroupHints {
		clear(c.hints)
	}
	c.hints[reg] = h
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
	reg := regKey(d.registrationID)
	groups, gen, hint, ok, err := s.symmetricKeyGroups(ctx, reg)
	if err != nil {
		return err
	}
	signedWith := func(g, k int) bool {
		return tok.Verify(dps.DeriveDeviceKey(groups[g].keys[k], d.registrationID), time.Time{}) == nil // zero time: signature only
	}
	found := func(g, k int) error {
		d.group = groups[g].group
		d.enrollment = groupEnrollment(d.group, d.registrationID)
		s.rememberGroupKey(gen, reg, groupHint{g, k})
		return nil
	}
	// The key that signed this device's last token first: a group that
	// comes earlier could only match too if it had the same keys.
	if ok && hint.group < len(groups) && hint.key < len(groups[hint.group].keys) && signedWith(hint.group, hint.key) {
		return found(hint.group, hint.key)
	}
	for g := range groups {
		for k := range groups[g].keys {
			if signedWith(g, k) {
				return found(g, k)
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
