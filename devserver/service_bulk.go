package devserver

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// DecodeBulkOperation reads the body of POST /enrollments (groups false:
// {"mode", "enrollments":[...]}) or POST /enrollmentGroups (groups true:
// {"mode", "enrollmentGroups":[...]}). It returns the mode in its
// canonical spelling (dps.BulkCreate, ...; compared ignoring case, since
// Node sends "updateIfMatchEtag") and the items undecoded, 1 to
// dps.MaxBulkItems of them: each item is decoded, and fails, on its own.
// Kinds: Invalid.
func DecodeBulkOperation(body []byte, groups bool) (mode string, items []json.RawMessage, err error) {
	return decodeBulkOperation(body, groups, dps.MaxBulkItems)
}

// decodeBulkOperation is DecodeBulkOperation with at most max items (no
// count limit when max is 0).
func decodeBulkOperation(body []byte, groups bool, max int) (mode string, items []json.RawMessage, err error) {
	const op = "read bulk operation"
	var v struct {
		Mode             string            `json:"mode"`
		Enrollments      []json.RawMessage `json:"enrollments"`
		EnrollmentGroups []json.RawMessage `json:"enrollmentGroups"`
	}
	if err := dps.Decode(body, &v); err != nil {
		return "", nil, err
	}
	for _, m := range []string{dps.BulkCreate, dps.BulkUpdate, dps.BulkUpdateIfMatchETag, dps.BulkDelete} {
		if strings.EqualFold(v.Mode, m) {
			mode = m
		}
	}
	if mode == "" {
		return "", nil, station.Errorf(op, station.KindInvalid, "mode %.30q: use create, update, updateIfMatchETag or delete", v.Mode)
	}
	field := "enrollments"
	items = v.Enrollments
	if groups {
		field, items = "enrollmentGroups", v.EnrollmentGroups
	}
	switch {
	case len(items) == 0:
		return "", nil, station.Errorf(op, station.KindInvalid, "the operation has no %s: send at least 1", field)
	case max > 0 && len(items) > max:
		return "", nil, station.Errorf(op, station.KindInvalid,
			"the operation has %d %s, more than this service's limit of %d (DPS's is %d): split it", len(items), field, max, dps.MaxBulkItems)
	}
	for i, it := range items {
		if t := strings.TrimSpace(string(it)); t == "" || t[0] != '{' {
			return "", nil, station.Errorf(op, station.KindInvalid, "%s[%d] is not a JSON object", field, i)
		}
	}
	return mode, items, nil
}

// bulkItem is the part of an item every mode reads.
type bulkItem struct {
	RegistrationID    string `json:"registrationId"`
	EnrollmentGroupID string `json:"enrollmentGroupId"`
	ETag              string `json:"etag"`
}

// serveBulk answers POST /enrollments and POST /enrollmentGroups (§7.3):
// each item is applied on its own, failures are listed per item and the
// HTTP status stays 200.
func (s *Server) serveBulk(w http.ResponseWriter, r *http.Request, trackingID string, groups bool) {
	if err := s.authorize(r, RightEnrollmentWrite); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	b, err := readBody(r)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	mode, items, err := decodeBulkOperation(b, groups, s.cfg.Quotas.bulkItems())
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	type failure struct {
		id  string
		err error
	}
	var failed []failure
	for _, raw := range items {
		var it bulkItem
		_ = json.Unmarshal(raw, &it) // a malformed item fails in its decoder below
		id := it.RegistrationID
		if groups {
			id = it.EnrollmentGroupID
		}
		if err := s.bulkItem(r.Context(), mode, raw, id, it.ETag, groups); err != nil {
			failed = append(failed, failure{id, err})
			status, code := errorStatus(err)
			s.log.Info("bulk item refused", "trackingId", trackingID, "mode", mode, "id", id, "status", status, "errorCode", code, "err", err)
		}
	}
	s.log.Info("bulk operation", "trackingId", trackingID, "mode", mode, "groups", groups, "items", len(items), "failed", len(failed))
	if groups {
		res := dps.BulkEnrollmentGroupOperationResult{IsSuccessful: len(failed) == 0, Errors: []dps.BulkEnrollmentGroupOperationError{}}
		for _, f := range failed {
			status, code := errorStatus(f.err)
			res.Errors = append(res.Errors, dps.BulkEnrollmentGroupOperationError{EnrollmentGroupID: f.id, ErrorCode: code, ErrorStatus: publicMessage(f.err, status)})
		}
		writeJSON(w, http.StatusOK, res)
		return
	}
	res := dps.BulkEnrollmentOperationResult{IsSuccessful: len(failed) == 0, Errors: []dps.BulkEnrollmentOperationError{}}
	for _, f := range failed {
		status, code := errorStatus(f.err)
		res.Errors = append(res.Errors, dps.BulkEnrollmentOperationError{RegistrationID: f.id, ErrorCode: code, ErrorStatus: publicMessage(f.err, status)})
	}
	writeJSON(w, http.StatusOK, res)
}

// bulkItem applies mode to one item. create fails when the item exists
// (409), update upserts, updateIfMatchETag needs the item's etag to match
// the stored one (412), delete removes (with the item's etag, if any, as
// If-Match). Kinds: Invalid, NotFound, Conflict, Unavailable, Internal.
func (s *Server) bulkItem(ctx context.Context, mode string, raw json.RawMessage, id, etag string, groups bool) error {
	const op = "bulk item"
	if err := checkRegistrationID(id); err != nil {
		return err
	}
	var ifMatch string
	switch mode {
	case dps.BulkDelete:
		if groups {
			return s.db.deleteGroup(ctx, id, etag)
		}
		return s.db.deleteEnrollment(ctx, id, etag)
	case dps.BulkCreate:
		ifMatch = mustCreate
	case dps.BulkUpdateIfMatchETag:
		if etag == "" {
			return station.Errorf(op, station.KindConflict, "%q: %w: updateIfMatchETag needs the item's etag", id, errETagMismatch)
		}
		ifMatch = etag
	}
	if groups {
		g, err := DecodeEnrollmentGroup(raw, id)
		if err != nil {
			return err
		}
		_, err = s.putGroup(ctx, g, ifMatch)
		return err
	}
	e, err := DecodeEnrollment(raw, id)
	if err != nil {
		return err
	}
	fillSymmetricKeys(&e.Attestation)
	_, err = s.db.putEnrollment(ctx, *e, ifMatch, s.now())
	return err
}

// fillSymmetricKeys generates the symmetric keys a caller left out, as
// DPS does.
func fillSymmetricKeys(a *dps.AttestationMechanism) {
	if t := a.SymmetricKey; t != nil && strings.EqualFold(a.Type, dps.AttestationSymmetricKey) {
		if t.PrimaryKey == "" {
			t.PrimaryKey = randomKey()
		}
		if t.SecondaryKey == "" {
			t.SecondaryKey = randomKey()
		}
	}
}
