package station

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
)

// The steps of the X.509 and symmetric-key methods that the TPM method
// does not have.
const (
	StepGenerateKey = "generate-key" // the DUT makes a key pair and a CSR
	StepIssue       = "issue-cert"   // the station CA checks the CSR and issues a leaf
	StepWriteChain  = "write-chain"  // the chain is written to the DUT and read back
	StepWriteKey    = "write-key"    // the derived symmetric key is written to the DUT and confirmed
)

// The step lists of the X.509 and symmetric-key methods, without and with
// the end-to-end check.
var (
	X509Steps           = []string{StepConnect, StepIdentify, StepDuplicates, StepGenerateKey, StepIssue, StepWriteChain, StepRecord}
	X509EndToEndSteps   = []string{StepConnect, StepIdentify, StepDuplicates, StepGenerateKey, StepIssue, StepWriteChain, StepEnroll, StepConfigure, StepRegister, StepHub, StepProduction, StepRecord}
	SymKeySteps         = []string{StepConnect, StepIdentify, StepDuplicates, StepWriteKey, StepRecord}
	SymKeyEndToEndSteps = []string{StepConnect, StepIdentify, StepDuplicates, StepWriteKey, StepEnroll, StepConfigure, StepRegister, StepHub, StepProduction, StepRecord}
	methodSteps         = map[Method][2][]string{MethodTPM: {TPMSteps, EndToEndSteps}, MethodX509: {X509Steps, X509EndToEndSteps}, MethodSymKey: {SymKeySteps, SymKeyEndToEndSteps}}
)

// IssueRequest asks the station CA for a device certificate.
type IssueRequest struct {
	CSR            []byte // PKCS#10 DER from the DUT
	RegistrationID string // the CSR's subject CN must be this
	Serial         string
	Operator       string
	Batch          string // the open batch's name, for caps per batch; empty when none is open
}

// IssuedCertificate is a leaf issued by the station CA.
type IssuedCertificate struct {
	Chain  [][]byte // DER: the leaf, then its intermediates (not the root)
	Serial string   // the leaf's serial number, hex
}

// Issuer is the station's signing CA, embedded or remote.
type Issuer interface {
	// Issue checks req.CSR (signature, subject, key type) and issues a
	// leaf. Kinds: Invalid (a bad CSR: the message says why), Conflict (a
	// cap is reached), Unavailable (a remote CA did not answer).
	Issue(ctx context.Context, req IssueRequest) (*IssuedCertificate, error)
	// SigningCertificate returns the certificate (DER) that signs leaves:
	// the certificate an X.509 enrollment group names.
	SigningCertificate() []byte
}

// SymKeyGroup is the symmetric-key enrollment group the station derives
// device keys from. Its Key is a secret: it is never logged or recorded.
type SymKeyGroup struct {
	ID  string // the enrollment group ID
	Key []byte // the group's primary key (raw bytes, not base64)
}

// String names the group without its key.
func (g *SymKeyGroup) String() string { return "symmetric-key group " + g.ID }

// DeviceKey returns the device key of registration ID regID under the group:
// HMAC-SHA256(group key, regID), as DPS derives it.
func (g *SymKeyGroup) DeviceKey(regID string) []byte {
	m := hmac.New(sha256.New, g.Key)
	m.Write([]byte(regID))
	return m.Sum(nil)
}

// GroupEnroller manages the enrollment groups of the X.509 and
// symmetric-key methods on a DPS, for the end-to-end check.
type GroupEnroller interface {
	// EnsureX509Group makes sure the X.509 enrollment group groupID exists,
	// enabled, with signingCert (DER) as its signing certificate. Kinds:
	// Unauthorized, Unavailable, Invalid.
	EnsureX509Group(ctx context.Context, groupID string, signingCert []byte) error
	// EnsureSymKeyGroup makes sure g exists on the DPS, enabled, with g's
	// key as its primary key. Kinds: Unauthorized, Unavailable, Invalid.
	EnsureSymKeyGroup(ctx context.Context, g *SymKeyGroup) error
}

// Thumbprints returns the hex SHA-1 and SHA-256 of a certificate's DER, as
// DPS names certificates (upper case, as the Azure portal shows them).
func Thumbprints(der []byte) (sha1Hex, sha256Hex string) {
	s1 := sha1.Sum(der)
	s2 := sha256.Sum256(der)
	return strings.ToUpper(hex.EncodeToString(s1[:])), strings.ToUpper(hex.EncodeToString(s2[:]))
}

// KeyFingerprint returns the hex SHA-256 of a symmetric key: how records and
// read-backs name a key without holding it.
func KeyFingerprint(key []byte) string {
	h := sha256.Sum256(key)
	return hex.EncodeToString(h[:])
}

// checkChain confirms that the chain a DUT read back is the one written and
// that its leaf is for the key in csr.
func checkChain(wrote, read [][]byte, csrDER []byte) error {
	const op = "read back chain"
	if len(read) != len(wrote) {
		return Errorf(op, KindConflict, "the DUT read back %d certificates, but %d were written: check the DUT's storage", len(read), len(wrote))
	}
	for i := range wrote {
		if string(wrote[i]) != string(read[i]) {
			return Errorf(op, KindConflict, "certificate %d read back from the DUT differs from the one written: check the DUT's storage", i)
		}
	}
	leaf, err := x509.ParseCertificate(read[0])
	if err != nil {
		return Errorf(op, KindInvalid, "the leaf read back does not parse: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return Errorf(op, KindInvalid, "the DUT's CSR does not parse: %v", err)
	}
	lk, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !lk.Equal(csr.PublicKey) {
		return Errorf(op, KindConflict, "the leaf on the DUT is not for the key the DUT generated: provision the unit again")
	}
	return nil
}

// stepsFor returns the steps of method m, with or without the end-to-end
// check.
func stepsFor(m Method, endToEnd bool) ([]string, error) {
	s, ok := methodSteps[m]
	if !ok {
		return nil, Errorf("provision", KindInvalid, "unknown method %q: use tpm, x509 or symkey", m)
	}
	if endToEnd {
		return s[1], nil
	}
	return s[0], nil
}

// identityLink returns the run's link as an IdentityLink.
func (w *runner) identityLink(step string) (IdentityLink, error) {
	il, ok := w.link.(IdentityLink)
	if !ok {
		w.current = step
		return nil, Errorf(step, KindInternal, "the DUT link on %s cannot generate keys or store identities: a station wiring error", w.r.Port)
	}
	return il, nil
}

// identityPrelude runs what the methods without an EK share after
// identify: the run's link as an IdentityLink (first is the step that
// needs it), the registration ID from the serial, the duplicate check.
func (w *runner) identityPrelude(first string) (IdentityLink, error) {
	il, err := w.identityLink(first)
	if err != nil {
		return nil, err
	}
	if err := w.serialRegistrationID(StepDuplicates); err != nil {
		return nil, err
	}
	if err := w.serialDuplicates(); err != nil {
		return nil, err
	}
	return il, nil
}

// groupEnroller returns x's Enroller as a GroupEnroller.
func groupEnroller(x *EndToEnd) (GroupEnroller, error) {
	ge, ok := x.Enroller.(GroupEnroller)
	if !ok {
		return nil, Errorf("enroll", KindInternal, "the verification DPS cannot hold enrollment groups: a station wiring error")
	}
	return ge, nil
}

// serialRegistrationID sets the run's registration ID for a method without
// an EK: the serial rule, whatever the profile says (there is no EK to
// derive one from).
func (w *runner) serialRegistrationID(step string) error {
	id, err := RegistrationID(RegIDFromSerial, w.r.Serial, nil)
	if err != nil {
		w.current = step
		return E(step, KindInvalid, fmt.Errorf("serial %q cannot be a DPS registration ID (%w): the X.509 and symmetric-key methods use the lower-cased serial", w.r.Serial, err))
	}
	w.r.RegistrationID = id
	return nil
}

// serialDuplicates is the duplicate check of the methods without an EK:
// the serial must be new.
func (w *runner) serialDuplicates() error {
	p, r, ctx := w.p, w.r, w.ctx
	return w.step(StepDuplicates, func() (string, error, error) {
		u, err := p.Store.UnitBySerial(ctx, r.Serial)
		switch {
		case err == nil:
			return "", nil, Errorf("check duplicates", KindConflict, "serial %s was already provisioned in run %d on %s (%s method): a unit is provisioned once; check the label", u.Serial, u.RunID, u.Created.Format(time.DateTime), u.Method)
		case KindOf(err) != KindNotFound:
			return "", nil, err
		}
		return "serial not seen before", nil, nil
	})
}

// batchName is the name of the batch a passing unit will join: the open
// one, or the one that will be opened.
func (w *runner) batchName() string {
	if w.p.Batches == nil {
		return ""
	}
	if b, err := w.p.Batches.OpenBatch(w.ctx); err == nil {
		return b.Name
	}
	return BatchName(w.now())
}

// x509Steps runs the X.509 method's steps after identify: the DUT makes a
// key and a CSR, the station CA issues a leaf, the chain is written to the
// DUT and read back.
func (w *runner) x509Steps(prof Profile) error {
	p, r, ctx := w.p, w.r, w.ctx
	il, err := w.identityPrelude(StepGenerateKey)
	if err != nil {
		return err
	}
	var key GeneratedKey
	if err := w.step(StepGenerateKey, func() (string, error, error) {
		var err error
		key, err = il.GenerateKey(ctx, KeyRequest{Type: prof.KeyType, CommonName: r.RegistrationID})
		if err != nil {
			return "", nil, err
		}
		kt := prof.KeyType
		if kt == "" {
			kt = "EC-P256"
		}
		return fmt.Sprintf("%s key in %s storage, CSR %d bytes, CN %s", kt, key.Storage, len(key.CSR), r.RegistrationID), nil, nil
	}); err != nil {
		return err
	}
	var leaf *IssuedCertificate
	if err := w.step(StepIssue, func() (string, error, error) {
		var err error
		leaf, err = p.Issuer.Issue(ctx, IssueRequest{CSR: key.CSR, RegistrationID: r.RegistrationID, Serial: r.Serial, Operator: r.Operator, Batch: w.batchName()})
		if err != nil {
			return "", nil, err
		}
		if len(leaf.Chain) == 0 {
			return "", nil, Errorf("issue certificate", KindInternal, "the station CA returned an empty chain")
		}
		_, tp := Thumbprints(leaf.Chain[0])
		return fmt.Sprintf("leaf serial %s, SHA-256 thumbprint %s, chain of %d", leaf.Serial, short(tp), len(leaf.Chain)), nil, nil
	}); err != nil {
		return err
	}
	var id DeviceIdentity
	if err := w.step(StepWriteChain, func() (string, error, error) {
		if err := il.WriteCertChain(ctx, leaf.Chain); err != nil {
			return "", nil, err
		}
		var err error
		if id, err = il.ReadIdentity(ctx); err != nil {
			return "", nil, err
		}
		if err := checkChain(leaf.Chain, id.CertChain, key.CSR); err != nil {
			return "", nil, err
		}
		return fmt.Sprintf("%d certificates written and read back", len(leaf.Chain)), nil, nil
	}); err != nil {
		return err
	}
	group := "" // the X.509 group the unit was proven through, when it was
	if x := p.EndToEnd; x != nil {
		group = x.X509Group
		if group == "" {
			group = "kiln-x509"
		}
		if err := w.endToEnd(x, func() (string, error) {
			ge, err := groupEnroller(x)
			if err != nil {
				return "", err
			}
			if err := ge.EnsureX509Group(ctx, group, p.Issuer.SigningCertificate()); err != nil {
				return "", err
			}
			return "X.509 enrollment group " + group + " signed by the station CA", nil
		}); err != nil {
			return err
		}
	}
	_, tp := Thumbprints(leaf.Chain[0])
	return w.recordUnit(&Unit{
		Certificate:     leaf.Chain[0],
		CertSerial:      leaf.Serial,
		CertThumbprint:  tp,
		KeyStorage:      key.Storage,
		EnrollmentGroup: group,
	})
}

// symKeySteps runs the symmetric-key method's steps after identify: the
// device key is derived from the group key, written and confirmed by its
// fingerprint.
func (w *runner) symKeySteps(Profile) error {
	p, r, ctx := w.p, w.r, w.ctx
	il, err := w.identityPrelude(StepWriteKey)
	if err != nil {
		return err
	}
	fp := ""
	if err := w.step(StepWriteKey, func() (string, error, error) {
		key := p.SymKey.DeviceKey(r.RegistrationID)
		fp = KeyFingerprint(key)
		if err := il.WriteSymmetricKey(ctx, r.RegistrationID, key); err != nil {
			return "", nil, err
		}
		id, err := il.ReadIdentity(ctx)
		if err != nil {
			return "", nil, err
		}
		if id.SymKeyRegistrationID != r.RegistrationID || !strings.EqualFold(id.SymKeySHA256, fp) {
			return "", nil, Errorf("write key", KindConflict, "the DUT read back a symmetric key for %q with fingerprint %s, not the key written for %q (%s): check the DUT's storage",
				id.SymKeyRegistrationID, short(id.SymKeySHA256), r.RegistrationID, short(fp))
		}
		return fmt.Sprintf("device key of %s derived from %s, written and confirmed (sha256 %s)", r.RegistrationID, p.SymKey, short(fp)), nil, nil
	}); err != nil {
		return err
	}
	if x := p.EndToEnd; x != nil {
		if err := w.endToEnd(x, func() (string, error) {
			ge, err := groupEnroller(x)
			if err != nil {
				return "", err
			}
			if err := ge.EnsureSymKeyGroup(ctx, p.SymKey); err != nil {
				return "", err
			}
			return p.SymKey.String(), nil
		}); err != nil {
			return err
		}
	}
	return w.recordUnit(&Unit{EnrollmentGroup: p.SymKey.ID, SymKeySHA256: fp})
}
