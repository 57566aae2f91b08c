package devserver

import (
	"database/sql"
	"path/filepath"
	"testing"

	"github.com/kilnworks/kiln/internal/sqlitedb"
)

// TestMigration0003KeepsRegistrations migrates a version-2 database that
// holds a registration and its operation: both survive the rebuild of the
// tables, the operation still cascades from its registration, and deleting
// an individual enrollment still deletes its registration (now by trigger)
// but not a group device's.
func TestMigration0003KeepsRegistrations(t *testing.T) {
	dir := t.TempDir()
	abs, err := filepath.Abs(filepath.Join(dir, dbFile))
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", sqlitedb.DSN(abs, nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range schema[:2] {
		if _, err := db.Exec(m.SQL); err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
	}
	for _, q := range []string{
		`INSERT INTO enrollments VALUES ('dev-1', 'Dev-1', 'x509', '{}', x'00', '"e"', '2026-01-01T00:00:00.000000000Z', '2026-01-01T00:00:00.000000000Z')`,
		`INSERT INTO registrations (id, registration_id, status, assigned_hub, device_id, enabled, operation, etag, created, updated)
		 VALUES ('dev-1', 'Dev-1', 'assigned', 'hub', 'Dev-1', 1, 'op-1', 'e', '2026-01-01T00:00:00.000000000Z', '2026-01-01T00:00:00.000000000Z')`,
		`INSERT INTO operations VALUES ('op-1', 'dev-1', 'assigned', '{}', '2026-01-01T00:00:00.000000000Z', '2099-01-01T00:00:00.000000000Z')`,
		`PRAGMA user_version = 2`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()

	s, err := openStore(t.Context(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	r, err := s.registration(t.Context(), "dev-1")
	if err != nil || r.Hub != "hub" || !r.Enabled || r.Group != "" || r.Thumbprints != nil {
		t.Fatalf("registration after migration: %+v, %v", r, err)
	}
	var n int
	if err := s.write.QueryRow(`SELECT count(*) FROM operations WHERE id = 'op-1' AND registration = 'dev-1'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("operation after migration: %d, %v", n, err)
	}
	// A group device's registration has no enrollment.
	if _, err := s.write.Exec(`INSERT INTO registrations (id, registration_id, status, etag, created, updated, enrollment_group)
		VALUES ('grp-dev', 'grp-dev', 'assigned', 'e', '', '', 'grp')`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.write.Exec(`DELETE FROM enrollments WHERE id = 'dev-1'`); err != nil {
		t.Fatal(err)
	}
	if err := s.write.QueryRow(`SELECT count(*) FROM registrations`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("registrations after deleting the enrollment: %d, %v (want the group device's only)", n, err)
	}
	if err := s.write.QueryRow(`SELECT count(*) FROM operations`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("operations after deleting the registration: %d, %v", n, err)
	}
}
