// Package sqlitedb opens a SQLite file the way every Kiln store does: WAL
// mode (refused when SQLite falls back to a rollback journal), foreign keys
// on, a busy timeout, synchronous=NORMAL, one writer connection through
// which every write goes (so one process never sees SQLITE_BUSY), a pool of
// query-only readers, and numbered migrations embedded in the binary,
// applied at open and recorded in PRAGMA user_version.
package sqlitedb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "github.com/mattn/go-sqlite3" // the sqlite3 driver

	"github.com/kilnworks/kiln/station"
)

// BusyTimeout is how long a connection waits for a lock held by another
// process before it fails.
const BusyTimeout = 5 * time.Second

// Migration is one numbered schema change.
type Migration struct {
	Version int
	Name    string // the file name, e.g. 0001_init.sql
	SQL     string
}

// Migrations reads the files matching pattern in fsys (e.g. an embed.FS and
// "migrations/*.sql"), sorted by name. Their names must be numbered 0001_,
// 0002_, ... without gaps; a mistake there is a build bug, so it panics,
// naming owner.
func Migrations(fsys fs.FS, pattern, owner string) []Migration {
	names, err := fs.Glob(fsys, pattern)
	if err != nil {
		panic(err)
	}
	sort.Strings(names)
	ms := make([]Migration, 0, len(names))
	for i, name := range names {
		base := filepath.Base(name)
		num, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v != i+1 {
			panic(fmt.Sprintf("%s: migration %s: want a name like %04d_what.sql", owner, name, i+1))
		}
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			panic(err)
		}
		ms = append(ms, Migration{Version: v, Name: base, SQL: string(b)})
	}
	return ms
}

// DB is an open SQLite file: Write has one connection, Read query-only ones.
type DB struct {
	Path  string
	Write *sql.DB
	Read  *sql.DB

	closeOnce sync.Once
	closeErr  error
}

// Open opens (creating it if needed) the database at the absolute path abs
// and applies the migrations it lacks. translate turns SQLite errors into
// the caller's station errors. Kinds: Invalid (the database's schema is
// newer than ms), Unavailable (not WAL), and those of translate.
func Open(ctx context.Context, abs string, ms []Migration, translate func(op string, err error) error) (*DB, error) {
	const op = "open database"
	db := &DB{Path: abs}
	// The writer sets WAL mode (persistent in the file) before any reader
	// opens; readers never write, not even the journal mode.
	var err error
	db.Write, err = sql.Open("sqlite3", DSN(abs, url.Values{
		"_journal_mode": {"WAL"},
		"_txlock":       {"immediate"}, // take the write lock at BEGIN, not halfway through
	}))
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	db.Write.SetMaxOpenConns(1)
	db.Write.SetMaxIdleConns(1)
	db.Write.SetConnMaxIdleTime(0)
	db.Write.SetConnMaxLifetime(0)

	// SQLite falls back to a rollback journal, silently, where WAL cannot
	// work (some network file systems); readers would then block the writer.
	var mode string
	if err := db.Write.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		db.Write.Close()
		return nil, translate(op, err)
	}
	if !strings.EqualFold(mode, "wal") {
		db.Write.Close()
		return nil, station.Errorf(op, station.KindUnavailable,
			"%s: journal mode is %q, not WAL: put the data directory on a local disk", abs, mode)
	}
	if err := db.migrate(ctx, ms, translate); err != nil {
		db.Write.Close()
		return nil, err
	}

	db.Read, err = sql.Open("sqlite3", DSN(abs, url.Values{"_query_only": {"1"}}))
	if err != nil {
		db.Write.Close()
		return nil, station.E(op, station.KindInternal, err)
	}
	n := max(4, runtime.NumCPU())
	db.Read.SetMaxOpenConns(n)
	db.Read.SetMaxIdleConns(n)
	if err := db.Read.PingContext(ctx); err != nil {
		db.Close()
		return nil, translate(op, err)
	}
	return db, nil
}

// DSN returns the go-sqlite3 data source name for the file at abs with the
// settings every connection gets, plus extra.
func DSN(abs string, extra url.Values) string {
	q := url.Values{
		"_foreign_keys": {"1"},
		"_busy_timeout": {strconv.Itoa(int(BusyTimeout / time.Millisecond))},
		"_synchronous":  {"NORMAL"},
	}
	for k, v := range extra {
		q[k] = v
	}
	// A file: URI, with the path escaped so that '?' or '#' in it survive.
	return "file:" + (&url.URL{Path: filepath.ToSlash(abs)}).EscapedPath() + "?" + q.Encode()
}

// Close closes the connections; it is idempotent. Closing the last
// connection checkpoints the WAL into the database file.
func (db *DB) Close() error {
	db.closeOnce.Do(func() {
		var errs []error
		if db.Read != nil {
			errs = append(errs, db.Read.Close())
		}
		errs = append(errs, db.Write.Close())
		if err := errors.Join(errs...); err != nil {
			db.closeErr = station.E("close database", station.KindInternal, err)
		}
	})
	return db.closeErr
}

// migrate applies the migrations the database lacks, each in its own
// immediate transaction that also bumps PRAGMA user_version. Two processes
// opening a new file at once are serialized by the write lock. The version
// is checked before anything is written, so a newer database is refused
// untouched.
//
// PRAGMA foreign_keys cannot change inside a transaction, so a migration
// that rebuilds a table must use PRAGMA defer_foreign_keys and end with
// PRAGMA foreign_key_check instead.
func (db *DB) migrate(ctx context.Context, ms []Migration, translate func(string, error) error) error {
	const op = "migrate database"
	var v int
	if err := db.Write.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return translate(op, err)
	}
	if err := db.checkVersion(v, len(ms)); err != nil {
		return err
	}
	for _, m := range ms[min(v, len(ms)):] {
		if err := db.apply(ctx, m, len(ms), translate); err != nil {
			return err
		}
	}
	return nil
}

func (db *DB) checkVersion(v, known int) error {
	if v > known {
		return station.Errorf("open database", station.KindInvalid,
			"%s: database schema version %d is newer than this kiln (%d): upgrade kiln", db.Path, v, known)
	}
	return nil
}

// apply runs m in a transaction unless another process applied it first.
func (db *DB) apply(ctx context.Context, m Migration, known int, translate func(string, error) error) error {
	op := "apply migration " + m.Name
	tx, err := db.Write.BeginTx(ctx, nil)
	if err != nil {
		return translate(op, err)
	}
	defer tx.Rollback()
	var v int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return translate(op, err)
	}
	if err := db.checkVersion(v, known); err != nil {
		return err
	}
	if v >= m.Version {
		return nil // applied meanwhile by another process
	}
	if v != m.Version-1 {
		return station.Errorf(op, station.KindInternal, "database is at schema version %d, want %d", v, m.Version-1)
	}
	if _, err := tx.ExecContext(ctx, m.SQL); err != nil {
		return translate(op, err)
	}
	// PRAGMA takes no parameters; m.Version is an int of ours.
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", m.Version)); err != nil {
		return translate(op, err)
	}
	return translate(op, tx.Commit())
}
