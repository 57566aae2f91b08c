package devserver

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"database/sql"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/internal/datakey"
	"github.com/kilnworks/kiln/internal/sqlitedb"
	"github.com/kilnworks/kiln/station"
)

// The devserver keeps its state in one SQLite file, devserver.db, in the
// data directory: WAL mode, foreign keys on, one writer connection through
// which every write goes, a pool of query-only readers, and numbered
// migrations embedded in the binary (migrations/NNNN_name.sql) applied at
// open and recorded in PRAGMA user_version.
//
// Keys and secrets (device keys, TPM challenge keys, enrollment
// attestations, service policy keys) are sealed with AES-256-GCM under a
// data key kept in devserver.key beside the database, readable by the owner
// only (0600). That protects a copied database, not a copied data
// directory; a key held by the OS keyring or a TPM can replace the file
// later without a schema change.

//go:embed migrations/*.sql
var migrationFS embed.FS

const (
	dbFile     = "devserver.db"
	keyFile    = "devserver.key"
	timeLayout = "2006-01-02T15:04:05.000000000Z"
)

// store is the devserver's SQLite database. It is safe for concurrent use.
type store struct {
	db    *sqlitedb.DB
	write *sql.DB // one connection: every write, serialized
	read  *sql.DB // query-only connections
	seal  cipher.AEAD
	// groupsGen grows after every committed write to enrollment_groups,
	// so that caches of groups (see groupKeys) know when to reload.
	groupsGen atomic.Int64

	// The count limits of Quotas (zero: none), set once after
	// openStore, and the row counts they are checked against
	// (quota_store.go).
	maxEnrollments, maxRegistrations int
	enrollmentRows, registrationRows rowCount
}

// openStore opens (creating them if needed) the database and the data key
// in dir and migrates the schema. Kinds: Invalid (a newer schema),
// Unavailable (the files cannot be opened), Internal.
func openStore(ctx context.Context, dir string) (*store, error) {
	const op = "open devserver database"
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, station.Errorf(op, station.KindUnavailable, "create the data directory: %w", err)
	}
	aead, err := loadDataKey(filepath.Join(dir, keyFile))
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(filepath.Join(dir, dbFile))
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	db, err := sqlitedb.Open(ctx, abs, schema, dbError)
	if err != nil {
		return nil, err
	}
	return &store{db: db, write: db.Write, read: db.Read, seal: aead}, nil
}

// close closes the connections; it is idempotent.
func (s *store) close() error { return s.db.Close() }

// loadDataKey reads the 32-byte data key at path, creating it (0600) when
// it does not exist, and returns its AES-256-GCM AEAD.
func loadDataKey(path string) (cipher.AEAD, error) {
	return datakey.Load(path, "devserver", "the stored keys are lost")
}

// sealValue encrypts plain for the row named by aad (which binds the
// ciphertext to its row, so it cannot be moved to another).
func (s *store) sealValue(plain []byte, aad string) []byte {
	nonce := make([]byte, s.seal.NonceSize(), s.seal.NonceSize()+len(plain)+s.seal.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		panic(err) // crypto/rand does not fail
	}
	return s.seal.Seal(nonce, nonce, plain, []byte(aad))
}

// openValue decrypts a value sealed by sealValue. Kinds: Internal (wrong
// data key or a tampered row).
func (s *store) openValue(sealed []byte, aad string) ([]byte, error) {
	n := s.seal.NonceSize()
	if len(sealed) < n {
		return nil, station.Errorf("unseal "+aad, station.KindInternal, "the stored value is truncated")
	}
	plain, err := s.seal.Open(nil, sealed[:n], sealed[n:], []byte(aad))
	if err != nil {
		return nil, station.Errorf("unseal "+aad, station.KindInternal,
			"the stored value does not decrypt: devserver.key is not the key this database was written with")
	}
	return plain, nil
}

// schema is the embedded migrations, checked once at start-up.
var schema = sqlitedb.Migrations(migrationFS, "migrations/*.sql", "devserver")

// dbError translates a database error at the boundary: no rows → NotFound,
// constraint violations → Conflict, busy/locked → Unavailable, cancelled
// contexts → Unavailable, the rest → Internal.
func dbError(op string, err error) error {
	if err == nil {
		return nil
	}
	var se sqlite3.Error
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return station.E(op, station.KindNotFound, err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return station.E(op, station.KindUnavailable, err)
	case errors.As(err, &se) && se.Code == sqlite3.ErrConstraint:
		return station.E(op, station.KindConflict, err)
	case errors.As(err, &se) && (se.Code == sqlite3.ErrBusy || se.Code == sqlite3.ErrLocked):
		return station.Errorf(op, station.KindUnavailable, "the database is busy: try again: %w", err)
	}
	return station.E(op, station.KindInternal, err)
}

func encTime(t time.Time) string { return t.UTC().Format(timeLayout) }

// nullJSON is a JSON column's value: NULL for no document.
func nullJSON(v json.RawMessage) any {
	if len(v) == 0 {
		return nil
	}
	return string(v)
}

func decTime(s string) time.Time {
	t, _ := time.Parse(timeLayout, s) // written by encTime
	return t
}

// regKey is the key of a registration ID: DPS registration IDs are
// case-insensitive.
func regKey(registrationID string) string { return strings.ToLower(registrationID) }

// newETag returns a fresh enrollment etag: a quoted opaque string (§1.4).
func newETag() string { return `"` + uuid() + `"` }

// newRegistrationETag returns a fresh registration etag: base64 of a quoted
// opaque string (§1.4).
func newRegistrationETag() string { return base64.StdEncoding.EncodeToString([]byte(newETag())) }

// etagMatches reports whether an If-Match header value matches etag: "*"
// matches anything, and the values are compared as opaque strings after
// removing a weak prefix and one pair of quotes from each (§7.3).
func etagMatches(ifMatch, etag string) bool {
	norm := func(s string) string {
		s = strings.TrimPrefix(strings.TrimSpace(s), "W/")
		if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
			s = s[1 : len(s)-1]
		}
		return s
	}
	ifMatch = strings.TrimSpace(ifMatch)
	return ifMatch == "*" || norm(ifMatch) == norm(etag)
}

// ---- settings ----

// setting returns the value of a setting; ok is false when it is not set.
func (s *store) setting(ctx context.Context, name string) (value []byte, ok bool, err error) {
	const op = "read devserver setting"
	var sealed bool
	err = s.read.QueryRowContext(ctx, `SELECT value, sealed FROM settings WHERE name = ?`, name).Scan(&value, &sealed)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, dbError(op, err)
	}
	if sealed {
		value, err = s.openValue(value, "setting:"+name)
		if err != nil {
			return nil, false, err
		}
	}
	return value, true, nil
}

// putSetting sets a setting, sealed when secret.
func (s *store) putSetting(ctx context.Context, name string, value []byte, secret bool) error {
	if secret {
		value = s.sealValue(value, "setting:"+name)
	}
	_, err := s.write.ExecContext(ctx,
		`INSERT INTO settings (name, value, sealed) VALUES (?, ?, ?)
		 ON CONFLICT (name) DO UPDATE SET value = excluded.value, sealed = excluded.sealed`, name, value, secret)
	return dbError("write devserver setting", err)
}

// ---- enrollments ----

// enrollment returns the individual enrollment registrationID, with its
// etag, times and attestation. Kinds: NotFound (errNoEnrollment).
func (s *store) enrollment(ctx context.Context, registrationID string) (*dps.IndividualEnrollment, error) {
	const op = "read enrollment"
	id := regKey(registrationID)
	r, err := scanSealedRow(s.read.QueryRowContext(ctx,
		`SELECT doc, attestation, etag, created, updated, id FROM enrollments WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "no individual enrollment %q: %w: create it with the service API", registrationID, errNoEnrollment)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	var e dps.IndividualEnrollment
	if e.ETag, e.CreatedDateTimeUTC, e.LastUpdatedDateTimeUTC, err = s.decodeSealed(op, "enrollment:", r, &e, &e.Attestation); err != nil {
		return nil, err
	}
	return &e, nil
}

// sealedRow is a row of an enrollment or a group: its JSON document, its
// sealed attestation, etag, times and key.
type sealedRow struct {
	doc, etag, created, updated, id string
	att                             []byte
}

// scanSealedRow scans (doc, attestation, etag, created, updated, id).
func scanSealedRow(row interface{ Scan(...any) error }) (sealedRow, error) {
	var r sealedRow
	err := row.Scan(&r.doc, &r.att, &r.etag, &r.created, &r.updated, &r.id)
	return r, err
}

// decodeSealed decodes r's document into v and its attestation, sealed for
// aadPrefix + key, into att; it returns the row's etag and times.
func (s *store) decodeSealed(op, aadPrefix string, r sealedRow, v any, att *dps.AttestationMechanism) (string, dps.Time, dps.Time, error) {
	if err := json.Unmarshal([]byte(r.doc), v); err != nil {
		return "", dps.Time{}, dps.Time{}, station.E(op, station.KindInternal, err)
	}
	plain, err := s.openValue(r.att, aadPrefix+r.id)
	if err != nil {
		return "", dps.Time{}, dps.Time{}, err
	}
	if err := json.Unmarshal(plain, att); err != nil {
		return "", dps.Time{}, dps.Time{}, station.E(op, station.KindInternal, err)
	}
	return r.etag, dps.Time{Time: decTime(r.created)}, dps.Time{Time: decTime(r.updated)}, nil
}

// putEnrollment creates or replaces an enrollment. When ifMatch is not
// empty the stored etag must match it (Conflict with errETagMismatch).
// It returns the stored enrollment with its new etag and times.
func (s *store) putEnrollment(ctx context.Context, e dps.IndividualEnrollment, ifMatch string, now time.Time) (*dps.IndividualEnrollment, error) {
	const op = "write enrollment"
	id := regKey(e.RegistrationID)
	att, err := json.Marshal(e.Attestation)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	doc := e
	doc.Attestation = dps.AttestationMechanism{}
	doc.RegistrationState = nil
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
	committed := false
	err = tx.QueryRowContext(ctx, `SELECT etag, created FROM enrollments WHERE id = ?`, id).Scan(&oldETag, &created)
	exists := err == nil
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, dbError(op, err)
	}
	if ifMatch == mustCreate {
		if exists {
			return nil, station.Errorf(op, station.KindConflict, "enrollment %q exists already: update it instead", e.RegistrationID)
		}
	} else if ifMatch != "" && (!exists || !etagMatches(ifMatch, oldETag)) {
		return nil, station.Errorf(op, station.KindConflict,
			"enrollment %q: %w (If-Match %s): read the enrollment again and retry with its etag", e.RegistrationID, errETagMismatch, ifMatch)
	}
	if !exists {
		if err := s.enrollmentRows.reserve(ctx, tx, op, "enrollments", "individual enrollments", s.maxEnrollments); err != nil {
			return nil, err
		}
		defer s.enrollmentRows.settle(&committed)
		created = encTime(now)
	}
	etag := newETag()
	_, err = tx.ExecContext(ctx,
		`INSERT INTO enrollments (id, registration_id, attestation_type, doc, attestation, etag, created, updated)
		 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		 ON CONFLICT (id) DO UPDATE SET registration_id = excluded.registration_id,
		   attestation_type = excluded.attestation_type, doc = excluded.doc,
		   attestation = excluded.attestation, etag = excluded.etag, updated = excluded.updated`,
		id, e.RegistrationID, e.Attestation.Type, string(docJSON), s.sealValue(att, "enrollment:"+id), etag, created, encTime(now))
	if err != nil {
		return nil, dbError(op, err)
	}
	if err := tx.Commit(); err != nil {
		return nil, dbError(op, err)
	}
	committed = true
	e.ETag = etag
	e.CreatedDateTimeUTC = dps.Time{Time: decTime(created)}
	e.LastUpdatedDateTimeUTC = dps.Time{Time: decTime(encTime(now))}
	e.RegistrationState = nil
	return &e, nil
}

// deleteEnrollment deletes an enrollment, and with it its registration,
// challenge and operations. Kinds: NotFound, Conflict (errETagMismatch).
func (s *store) deleteEnrollment(ctx context.Context, registrationID, ifMatch string) error {
	return s.deleteRow(ctx, "delete enrollment", "enrollments", registrationID, ifMatch, errNoEnrollment)
}

// deleteRegistration deletes a device's registration state and its
// operations; the enrollment stays. Kinds: NotFound, Conflict.
func (s *store) deleteRegistration(ctx context.Context, registrationID, ifMatch string) error {
	return s.deleteRow(ctx, "delete registration", "registrations", registrationID, ifMatch, errNoRegistration)
}

func (s *store) deleteRow(ctx context.Context, op, table, registrationID, ifMatch string, missing error) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return dbError(op, err)
	}
	defer tx.Rollback()
	var etag string
	// table is one of two constants of ours.
	err = tx.QueryRowContext(ctx, `SELECT etag FROM `+table+` WHERE id = ?`, regKey(registrationID)).Scan(&etag)
	if errors.Is(err, sql.ErrNoRows) {
		return station.Errorf(op, station.KindNotFound, "%q: %w", registrationID, missing)
	}
	if err != nil {
		return dbError(op, err)
	}
	if ifMatch != "" && !etagMatches(ifMatch, etag) {
		return station.Errorf(op, station.KindConflict,
			"%q: %w (If-Match %s): read it again and retry with its etag", registrationID, errETagMismatch, ifMatch)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM `+table+` WHERE id = ?`, regKey(registrationID)); err != nil {
		return dbError(op, err)
	}
	err = tx.Commit()
	if table == "enrollment_groups" {
		s.groupsGen.Add(1)
	}
	return dbError(op, err)
}

// ---- TPM challenges ----

// tpmChallenge is the state of a TPM device's last challenge.
type tpmChallenge struct {
	EK, SRK []byte // TPM2B_PUBLIC as the device sent them
	Key     []byte // the HMAC key in the challenge blob
}

func (s *store) putChallenge(ctx context.Context, registrationID string, c *tpmChallenge, now time.Time) error {
	const op = "record TPM challenge"
	id := regKey(registrationID)
	_, err := s.write.ExecContext(ctx,
		`INSERT INTO tpm_challenges (id, ek, srk, key, created) VALUES (?, ?, ?, ?, ?)
		 ON CONFLICT (id) DO UPDATE SET ek = excluded.ek, srk = excluded.srk, key = excluded.key, created = excluded.created`,
		id, c.EK, c.SRK, s.sealValue(c.Key, "challenge:"+id), encTime(now))
	if station.KindOf(dbError(op, err)) == station.KindConflict {
		// The enrollment went away between the check and the insert.
		return station.Errorf(op, station.KindNotFound, "%q: %w", registrationID, errNoEnrollment)
	}
	return dbError(op, err)
}

// challenge returns the last challenge of a TPM registration.
// Kinds: NotFound (no challenge: the device must start with one).
func (s *store) challenge(ctx context.Context, registrationID string) (*tpmChallenge, error) {
	const op = "read TPM challenge"
	id := regKey(registrationID)
	var c tpmChallenge
	var key []byte
	err := s.read.QueryRowContext(ctx, `SELECT ek, srk, key FROM tpm_challenges WHERE id = ?`, id).Scan(&c.EK, &c.SRK, &key)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound,
			"no TPM challenge was issued to %q: register without Authorization first, with tpm.endorsementKey and tpm.storageRootKey", registrationID)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	if c.Key, err = s.openValue(key, "challenge:"+id); err != nil {
		return nil, err
	}
	return &c, nil
}

// ---- registrations ----

// registration is a device's registration state as stored.
type registration struct {
	RegistrationID string
	Status         string
	Substatus      string
	ErrorCode      int
	ErrorMessage   string
	Hub            string
	DeviceID       string
	Key            []byte
	Twin           json.RawMessage
	Enabled        bool
	ETag           string
	Created        time.Time
	Updated        time.Time
	// Group is the lower-cased ID of the enrollment group the device
	// registered through; "" for an individual enrollment.
	Group string
	// Thumbprints are the upper-case hex SHA-1 and SHA-256 thumbprints of
	// the X.509 certificate of the last assignment; nil for SAS devices.
	Thumbprints []string
	// Tags are the twin tags of the initial twin (JSON object); nil for
	// none. Twin holds its desired properties.
	Tags json.RawMessage
	// IoTEdge is the device's IoT Edge capability.
	IoTEdge bool
	// Payload is the data returned to the device with its assignment
	// (registrationState.payload); nil for none.
	Payload json.RawMessage
	// DataETag changes whenever the device data (twin, capabilities) is
	// set from the enrollment: at the first assignment and at a reset.
	DataETag string
	// PreviousHub is the hub the device data was migrated from by the
	// last assignment; "" when it was not migrated.
	PreviousHub string
}

// state returns the registration as the service API and the device API
// show it (without the attestation part).
func (r *registration) state() *dps.DeviceRegistrationState {
	return &dps.DeviceRegistrationState{
		RegistrationID:         r.RegistrationID,
		CreatedDateTimeUTC:     dps.Time{Time: r.Created},
		AssignedHub:            r.Hub,
		DeviceID:               r.DeviceID,
		Status:                 r.Status,
		Substatus:              r.Substatus,
		ErrorCode:              r.ErrorCode,
		ErrorMessage:           r.ErrorMessage,
		LastUpdatedDateTimeUTC: dps.Time{Time: r.Updated},
		ETag:                   r.ETag,
		Payload:                r.Payload,
	}
}

const registrationColumns = `registration_id, status, substatus, error_code, error_message, assigned_hub,
	device_id, device_key, twin, enabled, etag, created, updated, id, enrollment_group, thumbprints,
	tags, iot_edge, payload, data_etag, previous_hub`

func (s *store) scanRegistration(row interface{ Scan(...any) error }) (*registration, error) {
	var r registration
	var key []byte
	var twin, tags, payload sql.NullString
	var created, updated, id, thumbprints string
	if err := row.Scan(&r.RegistrationID, &r.Status, &r.Substatus, &r.ErrorCode, &r.ErrorMessage, &r.Hub,
		&r.DeviceID, &key, &twin, &r.Enabled, &r.ETag, &created, &updated, &id, &r.Group, &thumbprints,
		&tags, &r.IoTEdge, &payload, &r.DataETag, &r.PreviousHub); err != nil {
		return nil, err
	}
	if tags.Valid {
		r.Tags = json.RawMessage(tags.String)
	}
	if payload.Valid {
		r.Payload = json.RawMessage(payload.String)
	}
	if thumbprints != "" {
		r.Thumbprints = strings.Fields(thumbprints)
	}
	if key != nil {
		k, err := s.openValue(key, "registration:"+id)
		if err != nil {
			return nil, err
		}
		r.Key = k
	}
	if twin.Valid {
		r.Twin = json.RawMessage(twin.String)
	}
	r.Created, r.Updated = decTime(created), decTime(updated)
	return &r, nil
}

// registration returns a device's registration state.
// Kinds: NotFound (errNoRegistration).
func (s *store) registration(ctx context.Context, registrationID string) (*registration, error) {
	const op = "read registration"
	r, err := s.scanRegistration(s.read.QueryRowContext(ctx,
		`SELECT `+registrationColumns+` FROM registrations WHERE id = ?`, regKey(registrationID)))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "no registration %q: %w", registrationID, errNoRegistration)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	return r, nil
}

// hubDevice returns the registration assigned to hub as deviceID, the most
// recently updated when several are. Kinds: NotFound.
func (s *store) hubDevice(ctx context.Context, hub, deviceID string) (*registration, error) {
	const op = "find hub device"
	r, err := s.scanRegistration(s.read.QueryRowContext(ctx,
		`SELECT `+registrationColumns+` FROM registrations WHERE assigned_hub = ? AND device_id = ?
		 ORDER BY updated DESC LIMIT 1`, strings.ToLower(hub), deviceID))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound,
			"no device %q on hub %s: register the device with DPS first", deviceID, hub)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	return r, nil
}

// ---- operations ----

// operation is one registration attempt.
type operation struct {
	ID             string
	RegistrationID string // as the registration spells it
	Status         string
	Result         json.RawMessage // the final registration state; nil while assigning
	Expires        time.Time
	Group          string   // the lower-cased enrollment group the device attested through; "" for none
	Thumbprints    []string // of the X.509 certificate the device registered with; nil for SAS
	// Payload is the custom payload the device sent with its register
	// (§1.3), for allocation; nil for none.
	Payload json.RawMessage
}

// startOperation records a new registration attempt: the registration
// becomes "assigning" (keeping any earlier assignment, which stays usable
// in the hub until this one ends) and the operation is created. Expired
// operations are dropped on the way. Kinds: NotFound (the enrollment is
// gone), Unavailable, Internal. group is the enrollment group the device
// attested through ("" for an individual enrollment), thumbprints those
// of its X.509 certificate (nil for SAS) and payload the custom payload of
// its register (nil for none).
func (s *store) startOperation(ctx context.Context, opID, registrationID, group string, thumbprints []string, payload json.RawMessage, now, expires time.Time) error {
	const op = "start registration operation"
	id := regKey(registrationID)
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return dbError(op, err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `DELETE FROM operations WHERE expires < ?`, encTime(now)); err != nil {
		return dbError(op, err)
	}
	committed := false
	if s.maxRegistrations > 0 { // a new registration must fit under the limit
		var one int
		err = tx.QueryRowContext(ctx, `SELECT 1 FROM registrations WHERE id = ?`, id).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			if err := s.registrationRows.reserve(ctx, tx, op, "registrations", "device registrations", s.maxRegistrations); err != nil {
				return err
			}
			defer s.registrationRows.settle(&committed)
		} else if err != nil {
			return dbError(op, err)
		}
	}
	_, err = tx.ExecContext(ctx,
		`INSERT INTO registrations (id, registration_id, status, operation, etag, created, updated, enrollment_group) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		 ON CONFLICT (id) DO UPDATE SET status = excluded.status, error_code = 0, error_message = '',
		   operation = excluded.operation, etag = excluded.etag, updated = excluded.updated,
		   enrollment_group = excluded.enrollment_group`,
		id, registrationID, dps.StatusAssigning, opID, newRegistrationETag(), encTime(now), encTime(now), regKey(group))
	if err != nil {
		if station.KindOf(dbError(op, err)) == station.KindConflict {
			return station.Errorf(op, station.KindNotFound, "%q: %w", registrationID, errNoEnrollment)
		}
		return dbError(op, err)
	}
	_, err = tx.ExecContext(ctx,
		`INSERT INTO operations (id, registration, status, created, expires, enrollment_group, thumbprints, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
		opID, id, dps.StatusAssigning, encTime(now), encTime(expires), regKey(group), strings.Join(thumbprints, " "), nullJSON(payload))
	if err != nil {
		return dbError(op, err)
	}
	if err := tx.Commit(); err != nil {
		return dbError(op, err)
	}
	committed = true
	return nil
}

// operation returns an operation that has not expired at now.
// Kinds: NotFound.
func (s *store) operation(ctx context.Context, opID string, now time.Time) (*operation, error) {
	const op = "read registration operation"
	var o operation
	var result, payload sql.NullString
	var expires, thumbprints string
	err := s.read.QueryRowContext(ctx,
		`SELECT o.id, r.registration_id, o.status, o.result, o.expires, o.enrollment_group, o.thumbprints, o.payload
		 FROM operations o JOIN registrations r ON r.id = o.registration WHERE o.id = ?`, opID).
		Scan(&o.ID, &o.RegistrationID, &o.Status, &result, &expires, &o.Group, &thumbprints, &payload)
	if err == nil {
		if payload.Valid {
			o.Payload = json.RawMessage(payload.String)
		}
		if thumbprints != "" {
			o.Thumbprints = strings.Fields(thumbprints)
		}
		o.Expires = decTime(expires)
		if !now.Before(o.Expires) {
			err = sql.ErrNoRows
		}
	}
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound,
			"no operation %.80q (operations expire after a while): register again", opID)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	if result.Valid {
		o.Result = json.RawMessage(result.String)
	}
	return &o, nil
}

// pendingOperations lists the operations still assigning and not expired
// at now, oldest first: those a stop interrupted.
func (s *store) pendingOperations(ctx context.Context, now time.Time) ([]string, error) {
	const op = "list pending operations"
	rows, err := s.read.QueryContext(ctx,
		`SELECT id FROM operations WHERE status = ? AND expires > ? ORDER BY created`, dps.StatusAssigning, encTime(now))
	if err != nil {
		return nil, dbError(op, err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, dbError(op, err)
		}
		ids = append(ids, id)
	}
	return ids, dbError(op, rows.Err())
}

// finishOperation records the outcome of an operation: the registration's
// new state (hub fields and key are written only when r.Hub is set) and
// the operation's final result. A registration that moved on to a newer
// operation is left alone. Kinds: NotFound (the operation or the
// registration is gone), Unavailable, Internal.
func (s *store) finishOperation(ctx context.Context, opID string, r *registration, result []byte) error {
	const op = "finish registration operation"
	id := regKey(r.RegistrationID)
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return dbError(op, err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, `UPDATE operations SET status = ?, result = ? WHERE id = ? AND status = ?`,
		r.Status, string(result), opID, dps.StatusAssigning)
	if err != nil {
		return dbError(op, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return station.Errorf(op, station.KindNotFound, "operation %s is gone or finished already", opID)
	}
	var key []byte
	if r.Key != nil {
		key = s.sealValue(r.Key, "registration:"+id)
	}
	if r.Hub != "" {
		_, err = tx.ExecContext(ctx,
			`UPDATE registrations SET status = ?, substatus = ?, error_code = ?, error_message = ?, assigned_hub = ?,
			   device_id = ?, device_key = ?, twin = ?, enabled = ?, etag = ?, updated = ?, thumbprints = ?,
			   tags = ?, iot_edge = ?, payload = ?, data_etag = ?, previous_hub = ? WHERE id = ? AND operation = ?`,
			r.Status, r.Substatus, r.ErrorCode, r.ErrorMessage, strings.ToLower(r.Hub),
			r.DeviceID, key, nullJSON(r.Twin), r.Enabled, r.ETag, encTime(r.Updated), strings.Join(r.Thumbprints, " "),
			nullJSON(r.Tags), r.IoTEdge, nullJSON(r.Payload), r.DataETag, strings.ToLower(r.PreviousHub), id, opID)
	} else {
		_, err = tx.ExecContext(ctx,
			`UPDATE registrations SET status = ?, substatus = ?, error_code = ?, error_message = ?,
			   enabled = enabled AND ?, etag = ?, updated = ? WHERE id = ? AND operation = ?`,
			r.Status, r.Substatus, r.ErrorCode, r.ErrorMessage, r.Enabled, r.ETag, encTime(r.Updated), id, opID)
	}
	if err != nil {
		return dbError(op, err)
	}
	return dbError(op, tx.Commit())
}
