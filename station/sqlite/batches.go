package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/station"
)

var _ station.BatchStore = (*Store)(nil)

// CreateBatch inserts b and sets b.ID. An empty b.State becomes open and a
// zero b.Created becomes s.Now(); both are written back to b. Kinds:
// Conflict when b is open and another batch is open already (a partial
// unique index decides, so two slots racing to open a batch cannot both
// win); Invalid when b has no name, an unknown state or an invalid template.
func (s *Store) CreateBatch(ctx context.Context, b *station.Batch) error {
	const op = "create batch"
	if strings.TrimSpace(b.Name) == "" {
		return station.Errorf(op, station.KindInvalid, "the batch has no name: give it one")
	}
	state := b.State
	if state == "" {
		state = station.BatchOpen
	}
	if !state.Valid() {
		return station.Errorf(op, station.KindInvalid, "%q is not a batch state", state)
	}
	if err := b.Template.Validate(); err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	tmpl, err := json.Marshal(b.Template)
	if err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	created := b.Created
	if created.IsZero() {
		created = s.Now()
	}
	res, err := s.write.ExecContext(ctx, `INSERT INTO batches
		(name, state, target_id, template, created, sealed, pushed) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		b.Name, state, b.TargetID, string(tmpl), encTime(created), encTime(b.Sealed), encTime(b.Pushed))
	if isConstraint(err, sqlite3.ErrConstraintUnique) {
		if open, oerr := s.OpenBatch(ctx); oerr == nil {
			return station.Errorf(op, station.KindConflict,
				"batch %d (%s) is open already: seal it before opening another", open.ID, open.Name)
		}
		return station.Errorf(op, station.KindConflict, "another batch is open already: seal it before opening another (%w)", err)
	}
	if err != nil {
		return translate(op, err)
	}
	id, err := res.LastInsertId()
	if err != nil {
		return translate(op, err)
	}
	b.ID, b.State, b.Created = id, state, created
	return nil
}

// batchColumns are the columns scanBatch reads, in order.
const batchColumns = `id, name, state, target_id, template, created, sealed, pushed,
	(SELECT COUNT(*) FROM batch_units WHERE batch_units.batch_id = batches.id)`

type rowScanner interface{ Scan(dest ...any) error }

func scanBatch(row rowScanner) (*station.Batch, error) {
	b := new(station.Batch)
	var tmpl string
	if err := row.Scan(&b.ID, &b.Name, &b.State, &b.TargetID, &tmpl,
		timeScanner{&b.Created}, timeScanner{&b.Sealed}, timeScanner{&b.Pushed}, &b.Units); err != nil {
		return nil, err
	}
	if err := json.Unmarshal([]byte(tmpl), &b.Template); err != nil {
		return nil, fmt.Errorf("batch %d: enrollment template: %w", b.ID, err)
	}
	return b, nil
}

// Batch returns batch id with its unit count. Kinds: NotFound.
func (s *Store) Batch(ctx context.Context, id int64) (*station.Batch, error) {
	const op = "find batch"
	b, err := scanBatch(s.read.QueryRowContext(ctx, `SELECT `+batchColumns+` FROM batches WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, noBatch(op, id)
	}
	if err != nil {
		return nil, translate(op, err)
	}
	return b, nil
}

// OpenBatch returns the one open batch. Kinds: NotFound when none is open.
func (s *Store) OpenBatch(ctx context.Context) (*station.Batch, error) {
	const op = "find the open batch"
	b, err := scanBatch(s.read.QueryRowContext(ctx, `SELECT `+batchColumns+` FROM batches WHERE state = ?`, station.BatchOpen))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "no batch is open")
	}
	if err != nil {
		return nil, translate(op, err)
	}
	return b, nil
}

// Batches returns the batches matching f, newest first (by creation, then
// by id).
func (s *Store) Batches(ctx context.Context, f station.BatchFilter) ([]*station.Batch, error) {
	const op = "list batches"
	var where []string
	var args []any
	if f.State != "" {
		where = append(where, "state = ?")
		args = append(args, f.State)
	}
	limit := f.Limit
	if limit <= 0 {
		limit = defaultLimit
	}
	q := `SELECT ` + batchColumns + ` FROM batches`
	if len(where) > 0 {
		q += ` WHERE ` + strings.Join(where, " AND ")
	}
	q += ` ORDER BY created DESC, id DESC LIMIT ?`
	args = append(args, limit)
	rows, err := s.read.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, translate(op, err)
	}
	defer rows.Close()
	var bs []*station.Batch
	for rows.Next() {
		b, err := scanBatch(rows)
		if err != nil {
			return nil, translate(op, err)
		}
		bs = append(bs, b)
	}
	return bs, translate(op, rows.Err())
}

// AddUnit puts the recorded unit serial into batch batchID, in one write
// transaction, so a batch sealed meanwhile cannot take the unit. Adding a
// unit to the batch it is in already does nothing. Kinds: NotFound (no such
// batch or unit); Conflict when the batch is not open or the unit is in
// another batch.
func (s *Store) AddUnit(ctx context.Context, batchID int64, serial string) error {
	op := "add unit " + serial + " to batch"
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return translate(op, err)
	}
	defer tx.Rollback()

	var state station.BatchState
	var name string
	err = tx.QueryRowContext(ctx, `SELECT state, name FROM batches WHERE id = ?`, batchID).Scan(&state, &name)
	if errors.Is(err, sql.ErrNoRows) {
		return noBatch(op, batchID)
	}
	if err != nil {
		return translate(op, err)
	}
	var in int64
	err = tx.QueryRowContext(ctx, `SELECT batch_id FROM batch_units WHERE serial = ?`, serial).Scan(&in)
	switch {
	case err == nil && in == batchID:
		return nil
	case err == nil:
		return station.Errorf(op, station.KindConflict,
			"unit %s is in batch %d already: a unit is in one batch only", serial, in)
	case !errors.Is(err, sql.ErrNoRows):
		return translate(op, err)
	}
	if state != station.BatchOpen {
		return station.Errorf(op, station.KindConflict,
			"batch %d (%s) is %s, not open: add the unit to the open batch", batchID, name, state)
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO batch_units (batch_id, serial, added) VALUES (?, ?, ?)`,
		batchID, serial, encTime(s.Now()))
	if isConstraint(err, sqlite3.ErrConstraintForeignKey) {
		return station.Errorf(op, station.KindNotFound, "no unit with serial %s is recorded: record the unit first", serial)
	}
	if err != nil {
		return translate(op, err)
	}
	return translate(op, tx.Commit())
}

// BatchUnits returns the units of batch id in the order they joined it.
// Kinds: NotFound.
func (s *Store) BatchUnits(ctx context.Context, id int64) ([]*station.Unit, error) {
	const op = "list batch units"
	// One read transaction: the batch and its units come from one snapshot.
	tx, err := s.read.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, translate(op, err)
	}
	defer tx.Rollback()
	var one int
	if err := tx.QueryRowContext(ctx, `SELECT 1 FROM batches WHERE id = ?`, id).Scan(&one); errors.Is(err, sql.ErrNoRows) {
		return nil, noBatch(op, id)
	} else if err != nil {
		return nil, translate(op, err)
	}
	rows, err := tx.QueryContext(ctx, `SELECT `+unitColumns("u")+`
		FROM batch_units b JOIN units u ON u.serial = b.serial
		WHERE b.batch_id = ? ORDER BY b.rowid`, id)
	if err != nil {
		return nil, translate(op, err)
	}
	defer rows.Close()
	var us []*station.Unit
	for rows.Next() {
		u, err := scanUnit(rows)
		if err != nil {
			return nil, translate(op, err)
		}
		us = append(us, u)
	}
	return us, translate(op, rows.Err())
}

// Transition moves batch id from state from to state to if it is in state
// from, in one statement on the single writer (compare and set). Sealing
// stamps Sealed (the first time only); pushed and exported stamp Pushed.
// Kinds: NotFound; Conflict when the move is not legal or the batch is not
// in state from (the message says which state it is in); Invalid for an
// unknown state.
func (s *Store) Transition(ctx context.Context, id int64, from, to station.BatchState) error {
	op := fmt.Sprintf("move batch %d from %s to %s", id, from, to)
	if err := station.CheckTransition(from, to); err != nil {
		return station.E(op, station.KindOf(err), err)
	}
	now := encTime(s.Now())
	var sealed, pushed any
	switch to {
	case station.BatchSealed:
		sealed = now
	case station.BatchPushed, station.BatchExported:
		pushed = now
	}
	res, err := s.write.ExecContext(ctx, `UPDATE batches
		SET state = ?, sealed = COALESCE(sealed, ?), pushed = COALESCE(?, pushed)
		WHERE id = ? AND state = ?`, to, sealed, pushed, id, from)
	if err != nil {
		return translate(op, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return translate(op, err)
	}
	if n == 1 {
		return nil
	}
	b, err := s.Batch(ctx, id)
	if err != nil {
		return station.E(op, station.KindOf(err), err)
	}
	return station.Errorf(op, station.KindConflict,
		"batch %d (%s) is %s, not %s: someone else changed it; look at the batch again", id, b.Name, b.State, from)
}

func noBatch(op string, id int64) error {
	return station.Errorf(op, station.KindNotFound, "no batch %d: list the batches to find its number", id)
}
