package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"strings"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/station"
)

// defaultLimit is how many runs Runs returns when the filter sets no limit.
const defaultLimit = 100

// CreateRun inserts r and sets r.ID. An empty r.Result becomes running and a
// zero r.Started becomes s.Now(); both are written back to r. Steps already
// in r.Steps are inserted with it, in order, in the same transaction.
func (s *Store) CreateRun(ctx context.Context, r *station.Run) error {
	const op = "create run"
	if r.Result == "" {
		r.Result = station.ResultRunning
	}
	if r.Started.IsZero() {
		r.Started = s.Now()
	}
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return translate(op, err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, `INSERT INTO runs (
		serial, port, station, operator, method, started, finished, result, error_kind, error,
		model, firmware, registration_id, ek_hash, bytes_out, bytes_in
	) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.Serial, r.Port, r.Station, r.Operator, r.Method, encTime(r.Started), encTime(r.Finished),
		r.Result, r.ErrorKind, r.Error, r.Model, r.Firmware, r.RegistrationID, r.EKHash,
		r.BytesOut, r.BytesIn)
	if err != nil {
		return translate(op, err)
	}
	id, err := res.LastInsertId()
	if err != nil {
		return translate(op, err)
	}
	for i, st := range r.Steps {
		if _, err := tx.ExecContext(ctx, `INSERT INTO steps
			(run_id, seq, name, status, started, duration_ns, detail, error)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			id, i+1, st.Name, st.Status, encTime(st.Started), int64(st.Duration), st.Detail, st.Error); err != nil {
			return translate(op, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return translate(op, err)
	}
	r.ID = id
	return nil
}

// AddStep appends st to run runID, after the steps it has. Kinds: NotFound
// when there is no such run.
func (s *Store) AddStep(ctx context.Context, runID int64, st station.Step) error {
	const op = "add step"
	// One statement on the single writer: the sequence number cannot race.
	_, err := s.write.ExecContext(ctx, `INSERT INTO steps
		(run_id, seq, name, status, started, duration_ns, detail, error)
		VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE run_id = ?1), ?2, ?3, ?4, ?5, ?6, ?7)`,
		runID, st.Name, st.Status, encTime(st.Started), int64(st.Duration), st.Detail, st.Error)
	if isConstraint(err, sqlite3.ErrConstraintForeignKey) {
		return noRun(op, runID)
	}
	return translate(op, err)
}

// FinishRun writes r's final fields: serial, result, error kind and text,
// model, firmware, registration ID, EK hash, finished time, byte counts and
// the end-to-end check's findings.
// A zero r.Finished becomes s.Now() and is written back to r. Steps are not
// touched; add them with AddStep. Kinds: NotFound when there is no run r.ID.
func (s *Store) FinishRun(ctx context.Context, r *station.Run) error {
	const op = "finish run"
	if r.Finished.IsZero() {
		r.Finished = s.Now()
	}
	res, err := s.write.ExecContext(ctx, `UPDATE runs SET
		serial = ?, result = ?, error_kind = ?, error = ?, model = ?, firmware = ?,
		registration_id = ?, ek_hash = ?, finished = ?, bytes_out = ?, bytes_in = ?,
		dps_status = ?, assigned_hub = ?, device_id = ?, telemetry_at = ?
		WHERE id = ?`,
		r.Serial, r.Result, r.ErrorKind, r.Error, r.Model, r.Firmware,
		r.RegistrationID, r.EKHash, encTime(r.Finished), r.BytesOut, r.BytesIn,
		r.DPSStatus, r.AssignedHub, r.DeviceID, encTime(r.TelemetryAt), r.ID)
	if err != nil {
		return translate(op, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return translate(op, err)
	}
	if n == 0 {
		return noRun(op, r.ID)
	}
	return nil
}

func noRun(op string, id int64) error {
	return station.Errorf(op, station.KindNotFound, "no run %d: check the run number", id)
}

// runColumns are the columns scanRun reads, in order.
const runColumns = `id, serial, port, station, operator, method, started, finished, result,
	error_kind, error, model, firmware, registration_id, ek_hash, bytes_out, bytes_in,
	dps_status, assigned_hub, device_id, telemetry_at`

func scanRun(sc interface{ Scan(...any) error }) (*station.Run, error) {
	r := new(station.Run)
	err := sc.Scan(&r.ID, &r.Serial, &r.Port, &r.Station, &r.Operator, &r.Method,
		timeScanner{&r.Started}, timeScanner{&r.Finished}, &r.Result, &r.ErrorKind, &r.Error,
		&r.Model, &r.Firmware, &r.RegistrationID, &r.EKHash, &r.BytesOut, &r.BytesIn,
		&r.DPSStatus, &r.AssignedHub, &r.DeviceID, timeScanner{&r.TelemetryAt})
	return r, err
}

// stepColumns are the columns scanStep reads, in order, after run_id.
const stepColumns = `name, status, started, duration_ns, detail, error`

func scanStep(sc interface{ Scan(...any) error }) (runID int64, st station.Step, err error) {
	err = sc.Scan(&runID, &st.Name, &st.Status, timeScanner{&st.Started}, &st.Duration, &st.Detail, &st.Error)
	return runID, st, err
}

// Run returns run id with its steps in the order they were added (nil when
// it has none). Kinds: NotFound.
func (s *Store) Run(ctx context.Context, id int64) (*station.Run, error) {
	const op = "read run"
	// One read transaction: the run and its steps come from one snapshot.
	tx, err := s.read.BeginTx(ctx, nil)
	if err != nil {
		return nil, translate(op, err)
	}
	defer tx.Rollback()
	r, err := scanRun(tx.QueryRowContext(ctx, `SELECT `+runColumns+` FROM runs WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, noRun(op, id)
	}
	if err != nil {
		return nil, translate(op, err)
	}
	rows, err := tx.QueryContext(ctx, `SELECT run_id, `+stepColumns+` FROM steps WHERE run_id = ? ORDER BY seq`, id)
	if err != nil {
		return nil, translate(op, err)
	}
	defer rows.Close()
	for rows.Next() {
		_, st, err := scanStep(rows)
		if err != nil {
			return nil, translate(op, err)
		}
		r.Steps = append(r.Steps, st)
	}
	if err := rows.Err(); err != nil {
		return nil, translate(op, err)
	}
	return r, nil
}

// Runs returns the runs that match f with their steps, newest first (by
// start time, then by id). A zero f.Limit means 100; a negative one is
// KindInvalid. The runs and their steps are read in two queries from one
// snapshot, whatever the number of runs.
func (s *Store) Runs(ctx context.Context, f station.RunFilter) ([]*station.Run, error) {
	const op = "list runs"
	if f.Limit < 0 {
		return nil, station.Errorf(op, station.KindInvalid, "limit %d: give a positive limit, or 0 for %d", f.Limit, defaultLimit)
	}
	if f.Limit == 0 {
		f.Limit = defaultLimit
	}
	var where []string
	var args []any
	if f.Serial != "" {
		where = append(where, "serial = ?")
		args = append(args, f.Serial)
	}
	if f.Result != "" {
		where = append(where, "result = ?")
		args = append(args, f.Result)
	}
	if !f.Since.IsZero() {
		where = append(where, "started >= ?")
		args = append(args, encTime(f.Since))
	}
	if !f.Until.IsZero() {
		where = append(where, "started < ?")
		args = append(args, encTime(f.Until))
	}
	sel := " FROM runs"
	if len(where) > 0 {
		sel += " WHERE " + strings.Join(where, " AND ")
	}
	sel += " ORDER BY started DESC, id DESC LIMIT ?"
	args = append(args, f.Limit)

	tx, err := s.read.BeginTx(ctx, nil)
	if err != nil {
		return nil, translate(op, err)
	}
	defer tx.Rollback()

	rows, err := tx.QueryContext(ctx, `SELECT `+runColumns+sel, args...)
	if err != nil {
		return nil, translate(op, err)
	}
	defer rows.Close()
	var runs []*station.Run
	byID := make(map[int64]*station.Run)
	for rows.Next() {
		r, err := scanRun(rows)
		if err != nil {
			return nil, translate(op, err)
		}
		runs = append(runs, r)
		byID[r.ID] = r
	}
	if err := rows.Err(); err != nil {
		return nil, translate(op, err)
	}
	rows.Close()
	if len(runs) == 0 {
		return runs, nil
	}

	rows, err = tx.QueryContext(ctx, `SELECT run_id, `+stepColumns+` FROM steps
		WHERE run_id IN (SELECT id`+sel+`) ORDER BY run_id, seq`, args...)
	if err != nil {
		return nil, translate(op, err)
	}
	defer rows.Close()
	for rows.Next() {
		id, st, err := scanStep(rows)
		if err != nil {
			return nil, translate(op, err)
		}
		if r := byID[id]; r != nil {
			r.Steps = append(r.Steps, st)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, translate(op, err)
	}
	return runs, nil
}
