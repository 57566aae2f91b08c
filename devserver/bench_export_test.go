package devserver

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// LoadEnrollments writes n enabled symmetric-key individual enrollments,
// registration IDs fmt.Sprintf("%s-%07d", prefix, i), all with key as
// primary and secondary key, straight into s's store: the set-up of the
// benchmarks that need a million enrollments, which the service API
// writes one request at a time. Rows are as putEnrollment writes them
// (attestation sealed under the data key), batch rows per transaction.
func LoadEnrollments(ctx context.Context, s *Server, prefix string, n, batch int, key []byte) error {
	const op = "load enrollments"
	att, err := json.Marshal(dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
		SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(key), SecondaryKey: dps.EncodeKey(key)}})
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	if err := checkRegistrationID(prefix + "-0000000"); err != nil {
		return err // the IDs go into the JSON docs unescaped
	}
	now := encTime(s.now())
	// The doc of every row is the same but for its ID: marshal it once.
	const placeholder = "\x00id\x00"
	tmpl, err := json.Marshal(dps.IndividualEnrollment{RegistrationID: placeholder, ProvisioningStatus: dps.ProvisioningEnabled})
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	quoted, _ := json.Marshal(placeholder)
	docBefore, docAfter, _ := strings.Cut(string(tmpl), string(quoted))
	// Rows go in groups of perStmt per INSERT, which saves most of the
	// per-call cost of the driver.
	const perStmt = 64
	insert := func(rows int) string {
		return `INSERT INTO enrollments (id, registration_id, attestation_type, doc, attestation, etag, created, updated) VALUES ` +
			strings.TrimSuffix(strings.Repeat(`(?, ?, ?, ?, ?, ?, ?, ?),`, rows), ",")
	}
	defer s.db.enrollmentRows.forget()
	args := make([]any, 0, 8*perStmt)
	// The statements run without ctx: go-sqlite3 watches a cancellable
	// context with a goroutine per call. ctx is checked between batches.
	bg := context.Background()
	for start := 0; start < n; start += batch {
		if err := ctx.Err(); err != nil {
			return station.E(op, station.KindUnavailable, err)
		}
		tx, err := s.db.write.BeginTx(bg, nil)
		if err != nil {
			return dbError(op, err)
		}
		stmt, err := tx.PrepareContext(bg, insert(perStmt))
		if err != nil {
			tx.Rollback()
			return dbError(op, err)
		}
		end := min(start+batch, n)
		for i := start; i < end; i += perStmt {
			args = args[:0]
			rows := min(perStmt, end-i)
			for j := i; j < i+rows; j++ {
				regID := prefix + "-" + fmt.Sprintf("%07d", j)
				id := strings.ToLower(regID)
				args = append(args, id, regID, dps.AttestationSymmetricKey, docBefore+`"`+regID+`"`+docAfter,
					s.db.sealValue(att, "enrollment:"+id), newETag(), now, now)
			}
			var err error
			if rows == perStmt {
				_, err = stmt.ExecContext(bg, args...)
			} else {
				_, err = tx.ExecContext(bg, insert(rows), args...)
			}
			if err != nil {
				tx.Rollback()
				return dbError(op, err)
			}
		}
		stmt.Close()
		if err := tx.Commit(); err != nil {
			return dbError(op, err)
		}
	}
	// Into the database file, so that the first requests after the load
	// do not pay for it.
	_, err = s.db.write.ExecContext(bg, `PRAGMA wal_checkpoint(TRUNCATE)`)
	return dbError(op, err)
}
