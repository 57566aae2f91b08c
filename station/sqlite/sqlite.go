// Package sqlite implements station.Store on SQLite (mattn/go-sqlite3, cgo).
//
// The database is one file in WAL mode with foreign keys enforced. A Store
// holds two connection pools on it: a single writer connection, through which
// every write goes one at a time (so writers in one process never meet
// SQLITE_BUSY), and a small pool of query-only readers that read in parallel
// with the writer. A busy timeout covers other processes, such as
// `kiln records`, opening the same file.
//
// The schema is built by numbered SQL migrations embedded in the binary
// (migrations/NNNN_name.sql). Open applies the missing ones, each in its own
// transaction, and records the version in PRAGMA user_version. It refuses a
// database written by a newer kiln.
//
// Times are stored as UTC text in a fixed-width RFC 3339 layout with
// nanoseconds, so they sort as text and round-trip exactly; zero times are
// NULL. Empty byte slices are stored as NULL and read back as nil.
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/internal/sqlitedb"
	"github.com/kilnworks/kiln/station"
)

var _ station.Store = (*Store)(nil)

//go:embed migrations/*.sql
var migrationFS embed.FS

// timeLayout is how times are stored: UTC, fixed width, nanoseconds.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// Store is a station.Store on an SQLite file. It is safe for concurrent use.
type Store struct {
	// Now returns the current time. It stamps runs and units that arrive
	// without a time and runs closed by AbortStale. Open sets it to
	// time.Now; replace it before the store is used, not while.
	Now func() time.Time

	path  string
	db    *sqlitedb.DB
	write *sql.DB // one connection: all writes, serialized
	read  *sql.DB // query-only connections
}

// Open opens (creating it if needed) the database at path, applies any
// missing migrations and returns the store. It fails with KindInvalid when the
// database's schema is newer than this kiln knows, and with KindUnavailable
// when the file cannot be opened or is locked by another process for longer
// than the busy timeout.
func Open(ctx context.Context, path string) (*Store, error) {
	const op = "open store"
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file:") {
		return nil, station.Errorf(op, station.KindInvalid, "database path %q: give the path of a file", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	db, err := sqlitedb.Open(ctx, abs, schema, translate)
	if err != nil {
		return nil, err
	}
	return &Store{Now: time.Now, path: abs, db: db, write: db.Write, read: db.Read}, nil
}

// Path returns the absolute path of the database file.
func (s *Store) Path() string { return s.path }

// Close closes the store; it is idempotent. Closing the last connection
// checkpoints the WAL into the database file.
func (s *Store) Close() error { return s.db.Close() }

// schema is the embedded migrations, checked once at start-up.
var schema = sqlitedb.Migrations(migrationFS, "migrations/*.sql", "station/sqlite")

// SchemaVersion returns the schema version this kiln writes: the number of
// its last migration, as kept in the database's PRAGMA user_version.
func SchemaVersion() int { return len(schema) }

// AbortStale marks every run still "running" as failed with reason (Kind
// Unavailable) and the current time as its end, and returns how many it
// closed. A run stays "running" when the station stopped (crash, power loss)
// before it finished; call AbortStale when the station starts, before any
// slot provisions, since it cannot tell such a run from one in progress.
// An empty reason gets a default that tells the operator what to do.
func (s *Store) AbortStale(ctx context.Context, reason string) (int, error) {
	const op = "abort stale runs"
	if reason == "" {
		reason = "the station stopped during this run: provision the unit again"
	}
	res, err := s.write.ExecContext(ctx,
		`UPDATE runs SET result = ?, error_kind = ?, error = ?, finished = ? WHERE result = ?`,
		station.ResultFail, station.KindUnavailable, reason, encTime(s.Now()), station.ResultRunning)
	if err != nil {
		return 0, translate(op, err)
	}
	n, err := res.RowsAffected()
	return int(n), translate(op, err)
}

// Backup writes a consistent copy of the database to a new file at dstPath
// with SQLite's online backup API, while the store stays in use. dstPath must
// not exist (KindConflict). The copy is built beside dstPath and renamed into
// place, so dstPath is either absent or complete.
func (s *Store) Backup(ctx context.Context, dstPath string) (err error) {
	const op = "back up database"
	if _, err := os.Lstat(dstPath); err == nil {
		return station.Errorf(op, station.KindConflict, "%s exists already: choose a new file name or remove it", dstPath)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return station.E(op, station.KindUnavailable, err)
	}
	dstPath, err = filepath.Abs(dstPath)
	if err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(dstPath), filepath.Base(dstPath)+".*.partial")
	if err != nil {
		return station.Errorf(op, station.KindUnavailable, "create backup file: %w", err)
	}
	tmpPath := tmp.Name()
	tmp.Close()
	defer func() {
		if err != nil {
			os.Remove(tmpPath)
		}
	}()

	if err := s.backupTo(ctx, tmpPath); err != nil {
		return translate(op, err)
	}
	if err := os.Rename(tmpPath, dstPath); err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	if d, err := os.Open(filepath.Dir(dstPath)); err == nil {
		d.Sync() // make the rename durable; best effort
		d.Close()
	}
	return nil
}

// backupTo copies the database into the (empty) file at path in one backup
// step. One step holds a read snapshot for the whole copy, which in WAL mode
// does not block the writer; stepping page by page would restart whenever
// the station wrote meanwhile.
func (s *Store) backupTo(ctx context.Context, path string) error {
	dstDB, err := sql.Open("sqlite3", sqlitedb.DSN(path, nil))
	if err != nil {
		return err
	}
	defer dstDB.Close()
	dstConn, err := dstDB.Conn(ctx)
	if err != nil {
		return err
	}
	defer dstConn.Close()
	srcConn, err := s.read.Conn(ctx)
	if err != nil {
		return err
	}
	defer srcConn.Close()

	return srcConn.Raw(func(src any) error {
		return dstConn.Raw(func(dst any) error {
			b, err := dst.(*sqlite3.SQLiteConn).Backup("main", src.(*sqlite3.SQLiteConn), "main")
			if err != nil {
				return err
			}
			if err := ctx.Err(); err != nil {
				b.Finish()
				return err
			}
			done, err := b.Step(-1)
			if ferr := b.Finish(); err == nil {
				err = ferr
			}
			if err == nil && !done {
				err = errors.New("backup did not complete")
			}
			return err
		})
	})
}

// translate turns a database error into a station error of op. It is the one
// place SQLite errors become domain errors; the callers handle the cases they
// can name (no rows, a unique violation) before calling it.
func translate(op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return station.E(op, station.KindUnavailable, err)
	}
	var se sqlite3.Error
	if errors.As(err, &se) {
		switch se.Code {
		case sqlite3.ErrBusy, sqlite3.ErrLocked:
			return station.Errorf(op, station.KindUnavailable,
				"database is locked by another process (%w): retry, or stop the other kiln process", err)
		case sqlite3.ErrFull:
			return station.Errorf(op, station.KindUnavailable, "disk is full (%w): free space on the data disk", err)
		case sqlite3.ErrIoErr, sqlite3.ErrCantOpen, sqlite3.ErrPerm, sqlite3.ErrReadonly, sqlite3.ErrAuth:
			return station.Errorf(op, station.KindUnavailable,
				"cannot use the database file (%w): check the data directory's disk and permissions", err)
		case sqlite3.ErrInterrupt:
			return station.E(op, station.KindUnavailable, err)
		case sqlite3.ErrCorrupt, sqlite3.ErrNotADB:
			return station.Errorf(op, station.KindInternal,
				"database file is damaged or not a kiln database (%w): restore it from a backup", err)
		case sqlite3.ErrConstraint:
			return station.E(op, station.KindInvalid, err)
		}
	}
	return station.E(op, station.KindInternal, err)
}

// isConstraint reports whether err is the constraint violation ext.
func isConstraint(err error, ext sqlite3.ErrNoExtended) bool {
	var se sqlite3.Error
	return errors.As(err, &se) && se.ExtendedCode == ext
}

// encTime returns t as stored: fixed-width UTC text, or NULL for zero.
func encTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UTC().Format(timeLayout)
}

// timeScanner scans a stored time (text or NULL) into *t.
type timeScanner struct{ t *time.Time }

func (d timeScanner) Scan(src any) error {
	var s string
	switch v := src.(type) {
	case nil:
		*d.t = time.Time{}
		return nil
	case string:
		s = v
	case []byte:
		s = string(v)
	default:
		return fmt.Errorf("time column holds %T", src)
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return err
	}
	*d.t = t.UTC()
	return nil
}

// blob returns b as stored: NULL when empty.
func blob(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// nullString returns s as stored: NULL when empty.
func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// nullID returns id as stored: NULL when zero.
func nullID(id int64) any {
	if id == 0 {
		return nil
	}
	return id
}
