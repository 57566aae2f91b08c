package devserver

import (
	"bytes"
	"context"
	"crypto/x509"
	"database/sql"
	"errors"
	"time"

	"github.com/kilnworks/kiln/station"
)

// errNoCertificate is the NotFound of a CA certificate name.
var errNoCertificate = errors.New("no such CA certificate")

// caCertificate is a CA certificate registered with the service.
type caCertificate struct {
	Name     string // as uploaded
	Cert     *x509.Certificate
	Verified bool
	Code     string // the last verification code; "" before one is generated
	ETag     string
	Created  time.Time
	Updated  time.Time
}

const certificateColumns = `name, der, verified, verification_code, etag, created, updated`

func scanCertificate(row interface{ Scan(...any) error }) (*caCertificate, error) {
	var c caCertificate
	var der []byte
	var created, updated string
	if err := row.Scan(&c.Name, &der, &c.Verified, &c.Code, &c.ETag, &created, &updated); err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, station.Errorf("read CA certificate", station.KindInternal, "the stored certificate %q does not parse: %w", c.Name, err)
	}
	c.Cert, c.Created, c.Updated = cert, decTime(created), decTime(updated)
	return &c, nil
}

// certificate returns the CA certificate name. Kinds: NotFound
// (errNoCertificate), Internal.
func (s *store) certificate(ctx context.Context, name string) (*caCertificate, error) {
	const op = "read CA certificate"
	c, err := scanCertificate(s.read.QueryRowContext(ctx, `SELECT `+certificateColumns+` FROM certificates WHERE id = ?`, regKey(name)))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, station.Errorf(op, station.KindNotFound, "%q: %w: upload it with PUT /certificates/{name}", name, errNoCertificate)
	}
	if err != nil {
		return nil, dbError(op, err)
	}
	return c, nil
}

// listCertificates returns every CA certificate, by name.
func (s *store) listCertificates(ctx context.Context) ([]*caCertificate, error) {
	const op = "list CA certificates"
	rows, err := s.read.QueryContext(ctx, `SELECT `+certificateColumns+` FROM certificates ORDER BY id`)
	if err != nil {
		return nil, dbError(op, err)
	}
	defer rows.Close()
	var out []*caCertificate
	for rows.Next() {
		c, err := scanCertificate(rows)
		if err != nil {
			return nil, dbError(op, err)
		}
		out = append(out, c)
	}
	return out, dbError(op, rows.Err())
}

// putCertificate uploads or replaces the CA certificate name. A new
// certificate, or one whose DER changes, starts unverified with no code
// (verified when verified is true); re-uploading the same certificate
// keeps its state. A new one must leave room under limit (zero: none).
// Kinds: Conflict (errETagMismatch, errQuota), Unavailable, Internal.
func (s *store) putCertificate(ctx context.Context, name string, cert *x509.Certificate, verified bool, ifMatch string, limit int, now time.Time) (*caCertificate, error) {
	const op = "write CA certificate"
	id := regKey(name)
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return nil, dbError(op, err)
	}
	defer tx.Rollback()
	var oldDER []byte
	var oldETag, created, code string
	var oldVerified bool
	err = tx.QueryRowContext(ctx, `SELECT der, etag, created, verified, verification_code FROM certificates WHERE id = ?`, id).
		Scan(&oldDER, &oldETag, &created, &oldVerified, &code)
	exists := err == nil
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, dbError(op, err)
	}
	if ifMatch != "" && (!exists || !etagMatches(ifMatch, oldETag)) {
		return nil, station.Errorf(op, station.KindConflict,
			"CA certificate %q: %w (If-Match %s): read it again and retry with its etag", name, errETagMismatch, ifMatch)
	}
	if !exists {
		if limit > 0 {
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM certificates`).Scan(&n); err != nil {
				return nil, dbError(op, err)
			}
			if n >= limit {
				return nil, station.Errorf(op, station.KindConflict,
					"%w: the service holds %d CA certificates already, its limit: delete one first", errQuota, n)
			}
		}
		created = encTime(now)
	}
	if !exists || !bytes.Equal(oldDER, cert.Raw) {
		oldVerified, code = false, ""
	}
	verified = verified || oldVerified
	etag := newRegistrationETag()
	_, err = tx.ExecContext(ctx,
		`INSERT INTO certificates (id, name, der, verified, verification_code, etag, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
		 ON CONFLICT (id) DO UPDATE SET name = excluded.name, der = excluded.der, verified = excluded.verified,
		   verification_code = excluded.verification_code, etag = excluded.etag, updated = excluded.updated`,
		id, name, cert.Raw, verified, code, etag, created, encTime(now))
	if err != nil {
		return nil, dbError(op, err)
	}
	if err := tx.Commit(); err != nil {
		return nil, dbError(op, err)
	}
	return &caCertificate{Name: name, Cert: cert, Verified: verified, Code: code, ETag: etag, Created: decTime(created), Updated: decTime(encTime(now))}, nil
}

// updateCertificate changes the verification state of the CA certificate
// name, provided its etag is still etag (the state the caller checked) and,
// when ifMatch is set, that ifMatch matches it. Kinds: NotFound,
// Conflict (errETagMismatch), Unavailable, Internal.
func (s *store) updateCertificate(ctx context.Context, name, etag, ifMatch string, verified bool, code string, now time.Time) (*caCertificate, error) {
	const op = "update CA certificate"
	if ifMatch != "" && !etagMatches(ifMatch, etag) {
		return nil, station.Errorf(op, station.KindConflict,
			"CA certificate %q: %w (If-Match %s): read it again and retry with its etag", name, errETagMismatch, ifMatch)
	}
	res, err := s.write.ExecContext(ctx,
		`UPDATE certificates SET verified = ?, verification_code = ?, etag = ?, updated = ? WHERE id = ? AND etag = ?`,
		verified, code, newRegistrationETag(), encTime(now), regKey(name), etag)
	if err != nil {
		return nil, dbError(op, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return nil, station.Errorf(op, station.KindConflict,
			"CA certificate %q: %w: it changed meanwhile: read it again and retry", name, errETagMismatch)
	}
	return s.certificate(ctx, name)
}

// deleteCertificate deletes the CA certificate name. Kinds: NotFound,
// Conflict (errETagMismatch).
func (s *store) deleteCertificate(ctx context.Context, name, ifMatch string) error {
	return s.deleteRow(ctx, "delete CA certificate", "certificates", name, ifMatch, errNoCertificate)
}
