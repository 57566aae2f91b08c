package devserver

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// mustCreate, passed as the ifMatch of putEnrollment or putGroup, makes
// the write fail with Conflict when the item exists already (bulk create).
const mustCreate = "\x00create"

// ---- enrollment groups ----

// group returns the enrollment group groupID with its etag, times and
// attestation. Kinds: NotFound (errNoGroup).
func (s *store) group(ctx context.Context, groupID string) (*dps.EnrollmentGroup, error) {
	const op = "read enrollment group"
	id := regKey(groupID)
	row := s.read.QueryRowContext(ctx,
		`SELECT doc, attestation, etag, created, updated, id FROM enrollment_groups WHERE id = ?`, id)
	g, err := s.scanGroup(row)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "no enrollment group %q: %w: create it with the service API", groupID, errNoGroup)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	return g, nil
}

func (s *store) scanGroup(row interface{ Scan(...any) error }) (*dps.EnrollmentGroup, error) {
	r, err := scanSealedRow(row)
	if err != nil {
		return nil, err
	}
	var g dps.EnrollmentGroup
	if g.ETag, g.CreatedDateTimeUTC, g.LastUpdatedDateTimeUTC, err = s.decodeSealed("read enrollment group", "group:", r, &g, &g.Attestation); err != nil {
		return nil, err
	}
	return &g, nil
}

// putGroup creates or replaces an enrollment group. ifMatch is as for
// putEnrollment (mustCreate included). A new group, or one whose
// attestation type changes, must leave room under limit groups of its
// attestation type (zero: no limit). Kinds: Conflict (errETagMismatch,
// errQuota, or it exists for mustCreate), Unavailable, Internal.
func (s *store) putGroup(ctx context.Context, g dps.EnrollmentGroup, ifMatch string, limit int, now time.Time) (*dps.EnrollmentGroup, error) {
	const op = "write enrollment group"
	id := regKey(g.EnrollmentGroupID)
	att, err := json.Marshal(g.Attestation)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	doc := g
	doc.Attestation = dps.AttestationMechanism{}
	doc.ETag = ""
	doc.CreatedDateTimeUTC, doc.LastUpdatedDateTimeUTC = dps.Time{}, dps.Time{}
	docJSON, err := json.Marshal(doc)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}

	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return nil, dbError(op, err)
	}
	defer tx.Rollback()
	var oldETag, created string
	err = tx.QueryRowContext(ctx, `SELECT etag, created FROM enrollment_groups WHERE id = ?`, id).Scan(&oldETag, &created)
	exists := err == nil
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, dbError(op, err)
	}
	switch {
	case ifMatch == mustCreate:
		if exists {
			return nil, station.Errorf(op, station.KindConflict, "enrollment group %q exists already: update it instead", g.EnrollmentGroupID)
		}
	case ifMatch != "" && (!exists || !etagMatches(ifMatch, oldETag)):
		return nil, station.Errorf(op, station.KindConflict,
			"enrollment group %q: %w (If-Match %s): read the group again and retry with its etag", g.EnrollmentGroupID, errETagMismatch, ifMatch)
	}
	if limit > 0 {
		var n int
		err := tx.QueryRowContext(ctx, `SELECT count(*) FROM enrollment_groups WHERE attestation_type = ? AND id <> ?`,
			g.Attestation.Type, id).Scan(&n)
		if err != nil {
			return nil, dbError(op, err)
		}
		if n >= limit {
			return nil, station.Errorf(op, station.KindConflict,
				"%w: the service holds %d %s enrollment groups already, its limit: delete one first", errQuota, n, g.Attestation.Type)
		}
	}
	if !exists {
		created = encTime(now)
	}
	etag := newETag()
	_, err = tx.ExecContext(ctx,
		`INSERT INTO enrollment_groups (id, enrollment_group_id, attestation_type, doc, attestation, etag, created, updated)
		 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		 ON CONFLICT (id) DO UPDATE SET enrollment_group_id = excluded.enrollment_group_id,
		   attestation_type = excluded.attestation_type, doc = excluded.doc,
		   attestation = excluded.attestation, etag = excluded.etag, updated = excluded.updated`,
		id, g.EnrollmentGroupID, g.Attestation.Type, string(docJSON), s.sealValue(att, "group:"+id), etag, created, encTime(now))
	if err != nil {
		return nil, dbError(op, err)
	}
	err = tx.Commit()
	s.groupsGen.Add(1) // after the commit: a reload now sees the write
	if err != nil {
		return nil, dbError(op, err)
	}
	g.ETag = etag
	g.CreatedDateTimeUTC = dps.Time{Time: decTime(created)}
	g.LastUpdatedDateTimeUTC = dps.Time{Time: decTime(encTime(now))}
	return &g, nil
}

// deleteGroup deletes an enrollment group. The registrations of its
// devices stay (DPS keeps them too). Kinds: NotFound (errNoGroup),
// Conflict (errETagMismatch).
func (s *store) deleteGroup(ctx context.Context, groupID, ifMatch string) error {
	return s.deleteRow(ctx, "delete enrollment group", "enrollment_groups", groupID, ifMatch, errNoGroup)
}

// ---- queries ----

// Queries page by key: a page holds the items whose lower-cased ID sorts
// after the previous page's last, in ID order, so that the order is stable
// and a page never repeats or skips an item that existed throughout.

// listEnrollments returns up to limit enrollments whose key sorts after
// after, in key order.
func (s *store) listEnrollments(ctx context.Context, after string, limit int) ([]dps.IndividualEnrollment, error) {
	const op = "query enrollments"
	rows, err := s.read.QueryContext(ctx,
		`SELECT doc, attestation, etag, created, updated, id FROM enrollments WHERE id > ? ORDER BY id LIMIT ?`, after, limit)
	if err != nil {
		return nil, dbError(op, err)
	}
	defer rows.Close()
	out := []dps.IndividualEnrollment{}
	for rows.Next() {
		r, err := scanSealedRow(rows)
		if err != nil {
			return nil, dbError(op, err)
		}
		var e dps.IndividualEnrollment
		if e.ETag, e.CreatedDateTimeUTC, e.LastUpdatedDateTimeUTC, err = s.decodeSealed(op, "enrollment:", r, &e, &e.Attestation); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, dbError(op, rows.Err())
}

// listGroups returns up to limit enrollment groups whose key sorts after
// after, in key order.
func (s *store) listGroups(ctx context.Context, after string, limit int) ([]dps.EnrollmentGroup, error) {
	const op = "query enrollment groups"
	rows, err := s.read.QueryContext(ctx,
		`SELECT doc, attestation, etag, created, updated, id FROM enrollment_groups WHERE id > ? ORDER BY id LIMIT ?`, after, limit)
	if err != nil {
		return nil, dbError(op, err)
	}
	defer rows.Close()
	out := []dps.EnrollmentGroup{}
	for rows.Next() {
		g, err := s.scanGroup(rows)
		if err != nil {
			return nil, dbError(op, err)
		}
		out = append(out, *g)
	}
	return out, dbError(op, rows.Err())
}

// listGroupRegistrations returns up to limit registration states of the
// devices that registered through group groupID, by key after after.
func (s *store) listGroupRegistrations(ctx context.Context, groupID, after string, limit int) ([]dps.DeviceRegistrationState, error) {
	const op = "query group registrations"
	rows, err := s.read.QueryContext(ctx,
		`SELECT `+registrationColumns+` FROM registrations WHERE enrollment_group = ? AND id > ? ORDER BY id LIMIT ?`,
		regKey(groupID), after, limit)
	if err != nil {
		return nil, dbError(op, err)
	}
	defer rows.Close()
	out := []dps.DeviceRegistrationState{}
	for rows.Next() {
		r, err := s.scanRegistration(rows)
		if err != nil {
			return nil, dbError(op, err)
		}
		out = append(out, *r.state())
	}
	return out, dbError(op, rows.Err())
}
