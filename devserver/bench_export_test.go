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
	now := encTime(s.now())
	defer s.db.enrollmentRows.forget()
	for start := 0; start < n; start += batch {
		tx, err := s.db.write.BeginTx(ctx, nil)
		if err != nil {
			return dbError(op, err)
		}
		stmt, err := tx.PrepareContext(ctx,
			`INSERT INTO enrollments (id, registration_id, attestation_type, doc, attestation, etag, created, updated)
			 VALUES (?, ?, ?, ?, ?, ?, ?, ?)`)
		if err != nil {
			tx.Rollback()
			return dbError(op, err)
		}
		for i := start; i < min(start+batch, n); i++ {
			regID := fmt.Sprintf("%s-%07d", prefix, i)
			id := strings.ToLower(regID)
			doc, err := json.Marshal(dps.IndividualEnrollment{RegistrationID: regID, ProvisioningStatus: dps.ProvisioningEnabled})
			if err != nil {
				tx.Rollback()
				return station.E(op, station.KindInternal, err)
			}
			if _, err := stmt.ExecContext(ctx, id, regID, dps.AttestationSymmetricKey, string(doc),
				s.db.sealValue(att, "enrollment:"+id), newETag(), now, now); err != nil {
				tx.Rollback()
				return dbError(op, err)
			}
		}
		stmt.Close()
		if err := tx.Commit(); err != nil {
			return dbError(op, err)
		}
	}
	return nil
}
