package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/station"
)

var (
	_ station.TargetStore = (*Store)(nil)
	_ station.Outbox      = (*Store)(nil)
)

// PutTarget inserts t or replaces the target of the same name. The
// connection string arrives sealed and is stored as it came. Kinds: Invalid.
func (s *Store) PutTarget(ctx context.Context, t *station.Target) error {
	op := "save target " + t.Name
	if err := t.Validate(); err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	if t.Created.IsZero() {
		t.Created = s.Now()
	}
	_, err := s.write.ExecContext(ctx, `INSERT INTO targets
		(name, host_name, sealed_connection, trust_pem, base_url, ops_per_minute, created)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET host_name = excluded.host_name,
			sealed_connection = excluded.sealed_connection, trust_pem = excluded.trust_pem,
			base_url = excluded.base_url, ops_per_minute = excluded.ops_per_minute`,
		t.Name, t.HostName, t.SealedConnectionString, blob(t.TrustPEM), t.BaseURL, t.OpsPerMinute, encTime(t.Created))
	return translate(op, err)
}

const targetColumns = `name, host_name, sealed_connection, trust_pem, base_url, ops_per_minute, created`

func scanTarget(row rowScanner) (*station.Target, error) {
	t := new(station.Target)
	err := row.Scan(&t.Name, &t.HostName, &t.SealedConnectionString, &t.TrustPEM, &t.BaseURL, &t.OpsPerMinute, timeScanner{&t.Created})
	return t, err
}

// Target returns the target named name. Kinds: NotFound.
func (s *Store) Target(ctx context.Context, name string) (*station.Target, error) {
	op := "find target " + name
	t, err := scanTarget(s.read.QueryRowContext(ctx, `SELECT `+targetColumns+` FROM targets WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "no target %q: add it with kiln batch target add, or list them with kiln batch target list", name)
	}
	if err != nil {
		return nil, translate(op, err)
	}
	return t, nil
}

// Targets returns every target, by name.
func (s *Store) Targets(ctx context.Context) ([]*station.Target, error) {
	const op = "list targets"
	rows, err := s.read.QueryContext(ctx, `SELECT `+targetColumns+` FROM targets ORDER BY name`)
	if err != nil {
		return nil, translate(op, err)
	}
	defer rows.Close()
	var ts []*station.Target
	for rows.Next() {
		t, err := scanTarget(rows)
		if err != nil {
			return nil, translate(op, err)
		}
		ts = append(ts, t)
	}
	return ts, translate(op, rows.Err())
}

// SetBatchTarget binds batch id to target and sets its template, in one
// statement that only matches an open or sealed batch. Kinds: NotFound (no
// such batch or target); Conflict when the batch is neither open nor
// sealed; Invalid (the template).
func (s *Store) SetBatchTarget(ctx context.Context, id int64, target string, tmpl station.EnrollmentTemplate) error {
	op := fmt.Sprintf("set the target of batch %d", id)
	if err := tmpl.Validate(); err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	if _, err := s.Target(ctx, target); err != nil {
		return station.E(op, station.KindOf(err), err)
	}
	raw, err := json.Marshal(tmpl)
	if err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	res, err := s.write.ExecContext(ctx, `UPDATE batches SET target_id = ?, template = ?
		WHERE id = ? AND state IN ('open', 'sealed')`, target, string(raw), id)
	if err != nil {
		return translate(op, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return translate(op, err)
	} else if n == 1 {
		return nil
	}
	b, err := s.Batch(ctx, id)
	if err != nil {
		return station.E(op, station.KindOf(err), err)
	}
	return station.Errorf(op, station.KindConflict,
		"batch %d (%s) is %s: its target can only change while it is open or sealed", id, b.Name, b.State)
}

// AddPushItems inserts items as they are; an item that exists already is
// left alone. Kinds: NotFound (no such batch).
func (s *Store) AddPushItems(ctx context.Context, items []station.PushItem) error {
	const op = "add push items"
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return translate(op, err)
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO push_items
		(batch_id, op, key, serial, state, mode, etag, error_code, error, attempts, updated)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (batch_id, op, key) DO NOTHING`)
	if err != nil {
		return translate(op, err)
	}
	defer stmt.Close()
	now := s.Now()
	for _, it := range items {
		if it.State == "" {
			it.State = station.PushPending
		}
		if it.Updated.IsZero() {
			it.Updated = now
		}
		_, err := stmt.ExecContext(ctx, it.BatchID, it.Op, it.Key, it.Serial, it.State, it.Mode, it.ETag,
			it.ErrorCode, it.Error, it.Attempts, encTime(it.Updated))
		if isConstraint(err, sqlite3.ErrConstraintForeignKey) {
			return noBatch(op, it.BatchID)
		}
		if err != nil {
			return translate(op, err)
		}
	}
	return translate(op, tx.Commit())
}

// PushItems returns the items of batch id and op in state ("" for all), in
// the order they were added.
func (s *Store) PushItems(ctx context.Context, id int64, op station.PushOp, state station.PushState) ([]station.PushItem, error) {
	const what = "list push items"
	q := `SELECT batch_id, op, key, serial, state, mode, etag, error_code, error, attempts, updated
		FROM push_items WHERE batch_id = ? AND op = ?`
	args := []any{id, op}
	if state != "" {
		q += ` AND state = ?`
		args = append(args, state)
	}
	rows, err := s.read.QueryContext(ctx, q+` ORDER BY rowid`, args...)
	if err != nil {
		return nil, translate(what, err)
	}
	defer rows.Close()
	var items []station.PushItem
	for rows.Next() {
		var it station.PushItem
		if err := rows.Scan(&it.BatchID, &it.Op, &it.Key, &it.Serial, &it.State, &it.Mode, &it.ETag,
			&it.ErrorCode, &it.Error, &it.Attempts, timeScanner{&it.Updated}); err != nil {
			return nil, translate(what, err)
		}
		items = append(items, it)
	}
	return items, translate(what, rows.Err())
}

// UpdatePushItems writes the changing fields of items in one transaction.
// Kinds: NotFound when an item does not exist.
func (s *Store) UpdatePushItems(ctx context.Context, items []station.PushItem) error {
	const op = "update push items"
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return translate(op, err)
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `UPDATE push_items SET state = ?, mode = ?, etag = ?,
		error_code = ?, error = ?, attempts = ?, updated = ? WHERE batch_id = ? AND op = ? AND key = ?`)
	if err != nil {
		return translate(op, err)
	}
	defer stmt.Close()
	now := s.Now()
	for _, it := range items {
		if it.Updated.IsZero() {
			it.Updated = now
		}
		res, err := stmt.ExecContext(ctx, it.State, it.Mode, it.ETag, it.ErrorCode, it.Error, it.Attempts,
			encTime(it.Updated), it.BatchID, it.Op, it.Key)
		if err != nil {
			return translate(op, err)
		}
		if n, err := res.RowsAffected(); err != nil {
			return translate(op, err)
		} else if n != 1 {
			return station.Errorf(op, station.KindNotFound, "batch %d has no %s item %s", it.BatchID, it.Op, it.Key)
		}
	}
	return translate(op, tx.Commit())
}

// PushCounts returns how many items of batch id and op are in each state.
func (s *Store) PushCounts(ctx context.Context, id int64, op station.PushOp) (map[station.PushState]int, error) {
	const what = "count push items"
	rows, err := s.read.QueryContext(ctx, `SELECT state, COUNT(*) FROM push_items
		WHERE batch_id = ? AND op = ? GROUP BY state`, id, op)
	if err != nil {
		return nil, translate(what, err)
	}
	defer rows.Close()
	counts := map[station.PushState]int{}
	for rows.Next() {
		var st station.PushState
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, translate(what, err)
		}
		counts[st] = n
	}
	return counts, translate(what, rows.Err())
}
