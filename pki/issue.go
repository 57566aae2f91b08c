package pki

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/station"
)

// IssueRequest says for whom a leaf is issued.
type IssueRequest struct {
	// RegistrationID is the unit's DPS registration ID; the CSR's subject CN
	// must equal it.
	RegistrationID string
	// Operator is who is signed in at the station.
	Operator string
	// Batch is the open batch the unit joins; required when the profile
	// caps leaves per batch.
	Batch string
	// Shift names the shift (e.g. "2025-06-02/early"); required when the
	// profile caps leaves per shift.
	Shift string
	// IncludeRoot appends the root to Leaf.Chain.
	IncludeRoot bool
}

// Leaf is an issued device certificate and its chain.
type Leaf struct {
	// Certificate is the leaf itself.
	Certificate *x509.Certificate
	// Chain is the leaf, then the intermediates, then the root when it
	// was asked for.
	Chain []*x509.Certificate
	// Issuance is what the issuance log recorded.
	Issuance Issuance
}

// ChainPEM returns Chain PEM-encoded, leaf first.
func (l *Leaf) ChainPEM() []byte {
	var b bytes.Buffer
	for _, c := range l.Chain {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// signFunc signs a checked CSR and returns the leaf and its intermediates.
type signFunc func(ctx context.Context, csr *x509.CertificateRequest, req IssueRequest) ([]*x509.Certificate, error)

// issuer holds what CA and Remote share: the checks, the caps and the log.
type issuer struct {
	profile Profile
	log     IssuanceLog
	logger  *slog.Logger
	now     func() time.Time
	root    *x509.Certificate

	mu       sync.Mutex
	inflight map[string]int // "b:"+batch and "s:"+shift → reserved, not yet recorded
}

func newIssuer(p Profile, l IssuanceLog, logger *slog.Logger, now func() time.Time) *issuer {
	if now == nil {
		now = time.Now
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &issuer{profile: p, log: l, logger: logger, now: now, inflight: map[string]int{}}
}

// check runs the checks that need no signing key.
func (is *issuer) check(csr *x509.CertificateRequest, req IssueRequest) error {
	const op = "check CSR"
	if err := station.ValidRegistrationID(req.RegistrationID); err != nil {
		return err
	}
	if csr == nil {
		return station.Errorf(op, station.KindInvalid, "no CSR for %s: ask the DUT for a key and CSR first", req.RegistrationID)
	}
	if err := csr.CheckSignature(); err != nil {
		return station.Errorf(op, station.KindUnauthorized, "CSR signature does not verify (%v): the DUT must sign its CSR with the key it asks to certify; regenerate the key and CSR", err)
	}
	if cn := csr.Subject.CommonName; cn != req.RegistrationID {
		return station.Errorf(op, station.KindInvalid, "CSR subject CN %q is not the unit's registration ID %q", cn, req.RegistrationID)
	}
	if kt := KeyTypeOf(csr.PublicKey); !is.profile.allows(kt) {
		return station.Errorf(op, station.KindInvalid, "CSR key type %s is not allowed: the station profile accepts %s", kt, joinKeyTypes(is.profile.allowedKeys()))
	}
	return nil
}

func joinKeyTypes(ks []KeyType) string {
	s := make([]string, len(ks))
	for i, k := range ks {
		s[i] = string(k)
	}
	return strings.Join(s, ", ")
}

// reserve checks the caps, counting issuances still in flight, and holds a
// place for this one. The returned func runs record (when not nil) and
// releases the place in one step under the lock, so a recorded issuance is
// never counted twice.
func (is *issuer) reserve(ctx context.Context, req IssueRequest) (func(record func() error) error, error) {
	const op = "check issuance caps"
	p := is.profile
	if p.MaxPerBatch == 0 && p.MaxPerShift == 0 {
		return func(record func() error) error {
			if record == nil {
				return nil
			}
			return record()
		}, nil
	}
	if p.MaxPerBatch > 0 && req.Batch == "" {
		return nil, station.Errorf(op, station.KindInvalid, "no batch given and the profile caps leaves per batch: open a batch first")
	}
	if p.MaxPerShift > 0 && req.Shift == "" {
		return nil, station.Errorf(op, station.KindInvalid, "no shift given and the profile caps leaves per shift: start a shift first")
	}
	is.mu.Lock()
	defer is.mu.Unlock()
	inBatch, inShift, err := is.log.Counts(ctx, req.Batch, req.Shift)
	if err != nil {
		return nil, err
	}
	bk, sk := "b:"+req.Batch, "s:"+req.Shift
	if p.MaxPerBatch > 0 && inBatch+is.inflight[bk] >= p.MaxPerBatch {
		return nil, station.Errorf(op, station.KindConflict, "batch %q has reached its cap of %d certificates: refused; close the batch and open a new one, or raise the cap in the station profile", req.Batch, p.MaxPerBatch)
	}
	if p.MaxPerShift > 0 && inShift+is.inflight[sk] >= p.MaxPerShift {
		return nil, station.Errorf(op, station.KindConflict, "shift %q has reached its cap of %d certificates: refused; a supervisor must raise the cap in the station profile or start the next shift", req.Shift, p.MaxPerShift)
	}
	is.inflight[bk]++
	is.inflight[sk]++
	return func(record func() error) error {
		is.mu.Lock()
		defer is.mu.Unlock()
		for _, k := range []string{bk, sk} {
			if is.inflight[k]--; is.inflight[k] <= 0 {
				delete(is.inflight, k)
			}
		}
		if record == nil {
			return nil
		}
		return record()
	}, nil
}

// issue checks, reserves, signs with sign, records and returns the leaf.
func (is *issuer) issue(ctx context.Context, csr *x509.CertificateRequest, req IssueRequest, sign signFunc) (*Leaf, error) {
	if err := ctx.Err(); err != nil {
		return nil, station.E("issue leaf", station.KindUnavailable, err)
	}
	if err := is.check(csr, req); err != nil {
		return nil, err
	}
	finish, err := is.reserve(ctx, req)
	if err != nil {
		return nil, err
	}
	chain, err := sign(ctx, csr, req)
	if err != nil {
		finish(nil)
		return nil, err
	}
	leaf := chain[0]
	sum := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	rec := Issuance{
		Serial:          hex.EncodeToString(leaf.SerialNumber.Bytes()),
		Subject:         leaf.Subject.String(),
		PublicKeySHA256: hex.EncodeToString(sum[:]),
		KeyType:         KeyTypeOf(leaf.PublicKey),
		RegistrationID:  req.RegistrationID,
		Operator:        req.Operator,
		Batch:           req.Batch,
		Shift:           req.Shift,
		Time:            is.now().UTC(),
	}
	if err := finish(func() error { return is.log.Record(ctx, rec) }); err != nil {
		// An unrecorded certificate is never handed out.
		return nil, station.Errorf("record issuance", station.KindOf(err), "leaf %s for %s not handed out: %w", rec.Serial, req.RegistrationID, err)
	}
	if req.IncludeRoot && is.root != nil {
		chain = append(chain, is.root)
	}
	is.logger.Info("leaf issued", "registration_id", req.RegistrationID, "serial", rec.Serial, "key_type", rec.KeyType, "batch", req.Batch, "operator", req.Operator)
	return &Leaf{Certificate: leaf, Chain: chain, Issuance: rec}, nil
}
