package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/kilnworks/kiln/station"
)

// RecordUnit inserts u. A zero u.Created becomes s.Now() and is written back
// to u; an empty EK hash is stored as NULL, so units without a TPM identity
// do not clash with each other. Kinds: Conflict when a unit with u's serial
// or EK hash is recorded already (the message says which; the UNIQUE
// constraints decide, so two slots racing with the same unit cannot both
// win); NotFound when u.RunID is set but names no run; Invalid when u has
// no serial.
func (s *Store) RecordUnit(ctx context.Context, u *station.Unit) error {
	const op = "record unit"
	if u.Serial == "" {
		return station.Errorf(op, station.KindInvalid, "unit has no serial: scan or read the serial first")
	}
	if u.Created.IsZero() {
		u.Created = s.Now()
	}
	_, err := s.write.ExecContext(ctx, `INSERT INTO units (
		serial, registration_id, method, model, firmware, ek_hash, ek_public, ek_key,
		srk_public, ek_cert, run_id, station, operator, created,
		certificate, cert_serial, cert_thumbprint, key_storage, enrollment_group, symkey_sha256
	) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		u.Serial, u.RegistrationID, u.Method, u.Model, u.Firmware, nullString(u.EKHash),
		blob(u.EKPublic), blob(u.EKKeyDER), blob(u.SRKPublic), blob(u.EKCert),
		nullID(u.RunID), u.Station, u.Operator, encTime(u.Created),
		blob(u.Certificate), u.CertSerial, nullString(u.CertThumbprint), u.KeyStorage, u.EnrollmentGroup, u.SymKeySHA256)
	switch {
	case err == nil:
		return nil
	case isConstraint(err, sqlite3.ErrConstraintUnique):
		return s.unitConflict(ctx, op, u, err)
	case isConstraint(err, sqlite3.ErrConstraintForeignKey):
		return station.Errorf(op, station.KindNotFound, "unit %s names run %d, which does not exist: record the run first", u.Serial, u.RunID)
	}
	return translate(op, err)
}

// unitConflict builds the Conflict error for u from the unique violation
// err. The constraint decides that it is a conflict; the units already
// recorded with u's serial and EK hash are read afterwards only to say which
// field clashed and with what (SQLite reports just the first constraint).
func (s *Store) unitConflict(ctx context.Context, op string, u *station.Unit, err error) error {
	msg := err.Error()
	bySerial, _ := s.UnitBySerial(ctx, u.Serial)
	var byEK *station.Unit
	if u.EKHash != "" {
		byEK, _ = s.UnitByEKHash(ctx, u.EKHash)
	}
	if strings.Contains(msg, "units.cert_thumbprint") {
		return station.Errorf(op, station.KindConflict,
			"the certificate with SHA-256 thumbprint %s is recorded already for another unit: a certificate belongs to one unit; provision unit %s again for a new one", u.CertThumbprint, u.Serial)
	}
	serialTaken := bySerial != nil || strings.Contains(msg, "units.serial")
	ekTaken := byEK != nil || strings.Contains(msg, "units.ek_hash")

	run := ""
	if bySerial != nil && bySerial.RunID != 0 {
		run = fmt.Sprintf(" by run %d", bySerial.RunID)
	}
	switch {
	case serialTaken && ekTaken && (byEK == nil || bySerial == nil || byEK.Serial == bySerial.Serial):
		return station.Errorf(op, station.KindConflict,
			"serial %s and its EK hash are recorded already%s: this unit was provisioned before; check the label, or set the unit aside for QA", u.Serial, run)
	case serialTaken && ekTaken:
		return station.Errorf(op, station.KindConflict,
			"serial %s is recorded already%s, and EK hash %s for serial %s: set the unit aside for QA", u.Serial, run, u.EKHash, byEK.Serial)
	case serialTaken:
		return station.Errorf(op, station.KindConflict,
			"serial %s is recorded already%s: this unit was provisioned before; check the label, or set the unit aside for QA", u.Serial, run)
	case ekTaken:
		prev := ""
		if byEK != nil {
			prev = " for serial " + byEK.Serial
		}
		return station.Errorf(op, station.KindConflict,
			"EK hash %s is recorded already%s: this TPM was provisioned under another serial; set the unit aside for QA", u.EKHash, prev)
	}
	return station.E(op, station.KindConflict, err)
}

// unitColumns returns the columns scanUnit reads, in order, of the units
// table named by alias ("" when unaliased).
func unitColumns(alias string) string {
	a := ""
	if alias != "" {
		a = alias + "."
	}
	return strings.NewReplacer("$.", a).Replace(`$.serial, $.registration_id, $.method, $.model, $.firmware,
		COALESCE($.ek_hash, ''), $.ek_public, $.ek_key, $.srk_public, $.ek_cert, COALESCE($.run_id, 0),
		$.station, $.operator, $.created, $.certificate, $.cert_serial, COALESCE($.cert_thumbprint, ''),
		$.key_storage, $.enrollment_group, $.symkey_sha256`)
}

// scanUnit reads a row of unitColumns.
func scanUnit(row interface{ Scan(...any) error }) (*station.Unit, error) {
	u := new(station.Unit)
	err := row.Scan(&u.Serial, &u.RegistrationID, &u.Method, &u.Model, &u.Firmware, &u.EKHash,
		&u.EKPublic, &u.EKKeyDER, &u.SRKPublic, &u.EKCert, &u.RunID, &u.Station, &u.Operator,
		timeScanner{&u.Created}, &u.Certificate, &u.CertSerial, &u.CertThumbprint,
		&u.KeyStorage, &u.EnrollmentGroup, &u.SymKeySHA256)
	return u, err
}

func (s *Store) unit(ctx context.Context, op, where, arg, what string) (*station.Unit, error) {
	u, err := scanUnit(s.read.QueryRowContext(ctx, `SELECT `+unitColumns("")+` FROM units WHERE `+where+` = ?`, arg))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "no unit with %s %s is recorded", what, arg)
	}
	if err != nil {
		return nil, translate(op, err)
	}
	return u, nil
}

// UnitBySerial returns the unit recorded with serial. Kinds: NotFound.
func (s *Store) UnitBySerial(ctx context.Context, serial string) (*station.Unit, error) {
	return s.unit(ctx, "find unit by serial", "serial", serial, "serial")
}

// UnitByEKHash returns the unit recorded with the EK hash ekHash (hex
// SHA-256 of the EK TPM2B_PUBLIC). Kinds: NotFound.
func (s *Store) UnitByEKHash(ctx context.Context, ekHash string) (*station.Unit, error) {
	if ekHash == "" {
		return nil, station.Errorf("find unit by EK hash", station.KindNotFound, "no unit with an empty EK hash is recorded")
	}
	return s.unit(ctx, "find unit by EK hash", "ek_hash", ekHash, "EK hash")
}
