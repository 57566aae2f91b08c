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
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/station"
)

var _ station.Store = (*Store)(nil)

//go:embed migrations/*.sql
var migrationFS embed.FS

// busyTimeout is how long a connection waits for a lock held by another
// process before it gives up with SQLITE_BUSY.
const busyTimeout = 5 * time.Second

// timeLayout is how times are stored: UTC, fixed width, nanoseconds.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// Store is a station.Store on an SQLite file. It is safe for concurrent use.
type Store struct {
	// Now returns the current time. It stamps runs and units that arrive
	// without a time and runs closed by AbortStale. Open sets it to
	// time.Now; replace it before the store is used, not while.
	Now func() time.Time

	path  string
	write *sql.DB // one connection: all writes, serialized
	read  *sql.DB // query-only connections

	closeOnce sync.Once
	closeErr  error
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
	s := &Store{Now: time.Now, path: abs}

	// The writer sets WAL mode (persistent in the file) before any reader
	// opens; readers never write, not even the journal mode.
	s.write, err = sql.Open("sqlite3", dsn(abs, url.Values{
		"_journal_mode": {"WAL"},
		"_txlock":       {"immediate"}, // take the write lock at BEGIN, not halfway through
	}))
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	s.write.SetMaxOpenConns(1)
	s.write.SetMaxIdleConns(1)
	s.write.SetConnMaxIdleTime(0)
	s.write.SetConnMaxLifetime(0)

	// SQLite falls back to a rollback journal, silently, where WAL cannot
	// work (some network file systems); readers would then block the writer.
	var mode string
	if err := s.write.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		s.write.Close()
		return nil, translate(op, err)
	}
	if !strings.EqualFold(mode, "wal") {
		s.write.Close()
		return nil, station.Errorf(op, station.KindUnavailable,
			"%s: journal mode is %q, not WAL: put the data directory on a local disk", abs, mode)
	}
	if err := s.migrate(ctx); err != nil {
		s.write.Close()
		return nil, err
	}

	s.read, err = sql.Open("sqlite3", dsn(abs, url.Values{"_query_only": {"1"}}))
	if err != nil {
		s.write.Close()
		return nil, station.E(op, station.KindInternal, err)
	}
	n := max(4, runtime.NumCPU())
	s.read.SetMaxOpenConns(n)
	s.read.SetMaxIdleConns(n)
	if err := s.read.PingContext(ctx); err != nil {
		s.Close()
		return nil, translate(op, err)
	}
	return s, nil
}

// dsn returns the go-sqlite3 data source name for the file at abs with the
// settings every connection gets plus extra.
func dsn(abs string, extra url.Values) string {
	q := url.Values{
		"_foreign_keys": {"1"},
		"_busy_timeout": {strconv.Itoa(int(busyTimeout / time.Millisecond))},
		"_synchronous":  {"NORMAL"},
	}
	for k, v := range extra {
		q[k] = v
	}
	// A file: URI, with the path escaped so that '?' or '#' in it survive.
	return "file:" + (&url.URL{Path: filepath.ToSlash(abs)}).EscapedPath() + "?" + q.Encode()
}

// Path returns the absolute path of the database file.
func (s *Store) Path() string { return s.path }

// Close closes the store's connections; it is idempotent. On the last close
// SQLite checkpoints the WAL into the database file.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		if s.read != nil {
			errs = append(errs, s.read.Close())
		}
		errs = append(errs, s.write.Close())
		if err := errors.Join(errs...); err != nil {
			s.closeErr = station.E("close store", station.KindInternal, err)
		}
	})
	return s.closeErr
}

// migration is one numbered schema change.
type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the embedded migrations in order. Their numbers must
// run 1, 2, 3, ... without gaps; a mistake there is a build bug, so it panics.
func migrations() []migration {
	names, err := fs.Glob(migrationFS, "migrations/*.sql")
	if err != nil {
		panic(err)
	}
	sort.Strings(names)
	ms := make([]migration, 0, len(names))
	for i, name := range names {
		base := filepath.Base(name)
		num, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v != i+1 {
			panic(fmt.Sprintf("station/sqlite: migration %s: want a name like %04d_what.sql", name, i+1))
		}
		b, err := migrationFS.ReadFile(name)
		if err != nil {
			panic(err)
		}
		ms = append(ms, migration{version: v, name: base, sql: string(b)})
	}
	return ms
}

// schema is the embedded migrations, checked once at start-up.
var schema = migrations()

// SchemaVersion returns the schema version this kiln writes: the number of
// its last migration, as kept in the database's PRAGMA user_version.
func SchemaVersion() int { return len(schema) }

// migrate applies the migrations the database lacks, each in its own
// immediate transaction, and bumps PRAGMA user_version with it. Two
// processes opening a new file at once are serialized by the write lock.
//
// PRAGMA foreign_keys cannot change inside a transaction, so a future
// migration that rebuilds a table must use PRAGMA defer_foreign_keys and end
// with PRAGMA foreign_key_check instead.
func (s *Store) migrate(ctx context.Context) error {
	const op = "migrate database"
	ms := schema
	// Check the version before writing anything, so a newer database is
	// refused untouched.
	var v int
	if err := s.write.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return translate(op, err)
	}
	if err := checkVersion(s.path, v, len(ms)); err != nil {
		return err
	}
	for _, m := range ms[min(v, len(ms)):] {
		if err := s.apply(ctx, m); err != nil {
			return err
		}
	}
	return nil
}

func checkVersion(path string, v, known int) error {
	if v > known {
		return station.Errorf("open store", station.KindInvalid,
			"%s: database schema version %d is newer than this kiln (%d): upgrade kiln", path, v, known)
	}
	return nil
}

// apply runs m in a transaction unless another process applied it first.
func (s *Store) apply(ctx context.Context, m migration) error {
	op := "apply migration " + m.name
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return translate(op, err)
	}
	defer tx.Rollback()
	var v int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return translate(op, err)
	}
	if err := checkVersion(s.path, v, SchemaVersion()); err != nil {
		return err
	}
	if v >= m.version {
		return nil // applied meanwhile by another process
	}
	if v != m.version-1 {
		return station.Errorf(op, station.KindInternal, "database is at schema version %d, want %d", v, m.version-1)
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return translate(op, err)
	}
	// PRAGMA takes no parameters; m.version is an int of ours.
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", m.version)); err != nil {
		return translate(op, err)
	}
	return translate(op, tx.Commit())
}

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
	dstDB, err := sql.Open("sqlite3", dsn(path, nil))
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
