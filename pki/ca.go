package pki

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/policy"
	"github.com/smallstep/certificates/authority/provisioner"
	"go.step.sm/crypto/x509util"

	"github.com/kilnworks/kiln/station"
)

// Files in Config.Dir.
const (
	RootFile         = "root.crt"         // the root, PEM
	IntermediateFile = "intermediate.crt" // the intermediate, then any further issuers up to (not including) the root, PEM
	CSRFile          = "intermediate.csr" // the intermediate's CSR while it awaits a customer's signature, PEM
	LogFile          = "issuance.jsonl"   // FileLog, unless Config.Log is set
)

// Names of the CA's keys in the KeyStore.
const (
	RootKey         = "root"
	IntermediateKey = "intermediate"
)

// Config configures a CA. Only Dir and Keys are required.
type Config struct {
	// Dir holds the certificates, the pending CSR and the default
	// issuance log. It is created with mode 0700.
	Dir string
	// Keys keeps the root and intermediate keys; usually
	// &FileKeys{Dir: dir, Passphrase: p} or a *PKCS11Keys.
	Keys KeyStore
	// KeyType is the type of the CA keys made on first use; empty means
	// EC-P256.
	KeyType KeyType
	// Name is the CA's name; the root is "<Name> Root CA" and the
	// intermediate "<Name> Intermediate CA". Empty means "Kiln Station".
	Name string
	// RootValidity and IntermediateValidity are the lifetimes of CA
	// certificates made on first use; zero means 20 and 10 years.
	RootValidity, IntermediateValidity time.Duration
	// Profile says what leaves are issued.
	Profile Profile
	// NamePolicy restricts the names leaves may carry; nil means none
	// beyond the CSR checks.
	NamePolicy *NamePolicy
	// Log records issuances and backs the caps; nil means a FileLog at
	// Dir/issuance.jsonl, owned and closed by the CA.
	Log IssuanceLog
	// Logger receives events (never key material); nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// NamePolicy is the X.509 name policy the embedded authority enforces on
// every leaf after the template has run (smallstep's policy engine). A name
// is refused when it appears as the subject CN or as a DNS SAN; DNS entries
// may use a leading wildcard ("*.quarantine.example.com" matches its
// subdomains), common names match exactly.
type NamePolicy struct {
	// Allowed, when not empty, are the only names a leaf may carry.
	Allowed []string
	// Denied are names a leaf may never carry, e.g. registration IDs that
	// were withdrawn.
	Denied []string
}

func (n *NamePolicy) options() *policy.Options {
	if n == nil {
		return nil
	}
	x := &policy.X509PolicyOptions{}
	if len(n.Allowed) > 0 {
		x.AllowedNames = &policy.X509NameOptions{CommonNames: n.Allowed, DNSDomains: n.Allowed}
	}
	if len(n.Denied) > 0 {
		// The engine checks a CN that a CN rule excludes again as a DNS
		// name, so a denied name is listed as both.
		x.DeniedNames = &policy.X509NameOptions{CommonNames: n.Denied, DNSDomains: n.Denied}
	}
	return &policy.Options{X509: x}
}

func (c *Config) name() string {
	if c.Name == "" {
		return "Kiln Station"
	}
	return c.Name
}

func (c *Config) now() time.Time {
	if c.Now == nil {
		return time.Now()
	}
	return c.Now()
}

func (c *Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger.With("component", "pki")
}

func (c *Config) validate(op string) error {
	switch {
	case c.Dir == "":
		return station.Errorf(op, station.KindInvalid, "no CA directory configured: set the station's data directory")
	case c.Keys == nil:
		return station.Errorf(op, station.KindInvalid, "no key store configured: give a passphrase for the CA key file or a PKCS #11 URI")
	}
	return nil
}

// CA is the station's signing CA: an intermediate whose key arrives as a
// crypto.Signer, issuing through an embedded smallstep authority. It is safe
// for concurrent use.
type CA struct {
	root    *x509.Certificate
	issuers []*x509.Certificate // intermediate first, up to the root
	signer  crypto.Signer
	auth    *authority.Authority
	tmpl    *leafTemplate
	core    *issuer
	logger  *slog.Logger

	closeOnce sync.Once
	ownLog    *FileLog
}

// Open loads the CA in cfg.Dir, creating a root and an intermediate on first
// use. When the intermediate's CSR awaits a customer's signature, it returns
// KindConflict saying so. A missing or wrong passphrase is KindUnauthorized.
func Open(ctx context.Context, cfg Config) (*CA, error) {
	const op = "open station CA"
	if err := cfg.validate(op); err != nil {
		return nil, err
	}
	root, issuers, err := loadCerts(cfg.Dir)
	switch {
	case err == nil:
	case station.KindOf(err) == station.KindNotFound:
		if _, err := os.Stat(filepath.Join(cfg.Dir, CSRFile)); err == nil {
			return nil, station.Errorf(op, station.KindConflict, "the intermediate's CSR %s awaits the customer's signature: import the signed certificate (kiln ca import)", filepath.Join(cfg.Dir, CSRFile))
		}
		if root, issuers, err = create(ctx, &cfg); err != nil {
			return nil, err
		}
	default:
		return nil, err
	}
	signer, err := cfg.Keys.Signer(ctx, IntermediateKey)
	if err != nil {
		return nil, err
	}
	if !samePublicKey(signer.Public(), issuers[0].PublicKey) {
		return nil, station.Errorf(op, station.KindInvalid, "the intermediate key does not match %s: restore the matching key or certificate", filepath.Join(cfg.Dir, IntermediateFile))
	}
	return newCA(ctx, &cfg, root, issuers, signer)
}

func newCA(ctx context.Context, cfg *Config, root *x509.Certificate, issuers []*x509.Certificate, signer crypto.Signer) (*CA, error) {
	const op = "start station CA"
	tmpl, err := parseTemplate(cfg.Profile.Template)
	if err != nil {
		return nil, err
	}
	auth, err := authority.NewEmbedded(
		authority.WithConfig(&config.Config{
			AuthorityConfig: &config.AuthConfig{Policy: cfg.NamePolicy.options()},
		}),
		authority.WithX509RootCerts(root),
		authority.WithX509SignerChain(issuers, signer),
		authority.WithQuietInit(),
	)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "embedded authority: %w", err)
	}
	c := &CA{root: root, issuers: issuers, signer: signer, auth: auth, tmpl: tmpl, logger: cfg.logger()}
	log := cfg.Log
	if log == nil {
		fl, err := OpenFileLog(filepath.Join(cfg.Dir, LogFile))
		if err != nil {
			auth.Shutdown()
			return nil, err
		}
		c.ownLog, log = fl, fl
	}
	c.core = newIssuer(cfg.Profile, log, c.logger, cfg.Now)
	c.core.root = root
	c.logger.Info("station CA ready", "intermediate", issuers[0].Subject.String(), "root", root.Subject.String(), "key_type", KeyTypeOf(signer.Public()), "not_after", issuers[0].NotAfter)
	return c, nil
}

// Root returns the root certificate.
func (c *CA) Root() *x509.Certificate { return c.root }

// Intermediate returns the intermediate certificate that signs leaves.
func (c *CA) Intermediate() *x509.Certificate { return c.issuers[0] }

// Signer returns the intermediate's signer (for measuring its raw rate; it
// never exposes key bytes for a PKCS #11 key).
func (c *CA) Signer() crypto.Signer { return c.signer }

// Close releases the authority and the default issuance log. It is safe to
// call more than once.
func (c *CA) Close() error {
	var err error
	c.closeOnce.Do(func() {
		err = errors.Join(c.auth.Shutdown(), closeLog(c.ownLog))
	})
	return err
}

func closeLog(l *FileLog) error {
	if l == nil {
		return nil
	}
	return l.Close()
}

// Issue signs a leaf for the device key in csr. It checks that the CSR's
// signature verifies (KindUnauthorized otherwise), that its subject CN is
// req.RegistrationID and that its key type is allowed by the profile
// (KindInvalid), and that no cap is reached (KindConflict). The leaf is
// recorded in the issuance log before it is returned.
func (c *CA) Issue(ctx context.Context, csr *x509.CertificateRequest, req IssueRequest) (*Leaf, error) {
	return c.core.issue(ctx, csr, req, c.sign)
}

func (c *CA) sign(ctx context.Context, csr *x509.CertificateRequest, req IssueRequest) ([]*x509.Certificate, error) {
	const op = "sign leaf"
	now := c.core.now()
	chain, err := c.auth.SignWithContext(ctx, csr, provisioner.SignOptions{},
		certOptions{c.tmpl.option(csr, req)},
		validity{notBefore: now.Add(-time.Minute), notAfter: now.Add(c.core.profile.validity())},
	)
	if err != nil {
		var sc interface{ StatusCode() int }
		kind := station.KindInternal
		if errors.As(err, &sc) {
			switch s := sc.StatusCode(); {
			case s == http.StatusForbidden:
				return nil, station.Errorf(op, station.KindInvalid, "the CA's name policy refuses %s (%v): issue under the registration ID the policy allows, or change the policy", req.RegistrationID, err)
			case s >= 400 && s < 500:
				kind = station.KindInvalid
			}
		}
		if k := station.KindOf(err); k != station.KindOther {
			kind = k
		}
		return nil, station.Errorf(op, kind, "%s: %w", req.RegistrationID, err)
	}
	return chain, nil
}

// certOptions hands the cached template to the authority.
type certOptions []x509util.Option

func (o certOptions) Options(provisioner.SignOptions) []x509util.Option { return o }

// validity sets a leaf's lifetime from the profile.
type validity struct{ notBefore, notAfter time.Time }

func (v validity) Modify(cert *x509.Certificate, _ provisioner.SignOptions) error {
	cert.NotBefore, cert.NotAfter = v.notBefore, v.notAfter
	return nil
}

// create makes the root and the intermediate on first use.
func create(ctx context.Context, cfg *Config) (*x509.Certificate, []*x509.Certificate, error) {
	const op = "create station CA"
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, nil, station.E(op, station.KindUnavailable, err)
	}
	rootKey, err := cfg.Keys.CreateKey(ctx, RootKey, cfg.KeyType)
	if err != nil {
		return nil, nil, err
	}
	now := cfg.now()
	rv, iv := cfg.RootValidity, cfg.IntermediateValidity
	if rv <= 0 {
		rv = 20 * 365 * 24 * time.Hour
	}
	if iv <= 0 {
		iv = 10 * 365 * 24 * time.Hour
	}
	root, err := caCert(cfg.name()+" Root CA", x509util.DefaultRootTemplate, rootKey, nil, rootKey, now, rv)
	if err != nil {
		return nil, nil, err
	}
	interKey, err := cfg.Keys.CreateKey(ctx, IntermediateKey, cfg.KeyType)
	if err != nil {
		return nil, nil, err
	}
	inter, err := caCert(cfg.name()+" Intermediate CA", x509util.DefaultIntermediateTemplate, interKey, root, rootKey, now, iv)
	if err != nil {
		return nil, nil, err
	}
	if err := writeCerts(cfg.Dir, root, []*x509.Certificate{inter}); err != nil {
		return nil, nil, err
	}
	cfg.logger().Info("station CA created", "root", root.Subject.String(), "key_type", KeyTypeOf(rootKey.Public()), "dir", cfg.Dir)
	return root, []*x509.Certificate{inter}, nil
}

// caCert makes a CA certificate for key from an x509util template, signed by
// parentKey (self-signed when parent is nil).
func caCert(cn, text string, key crypto.Signer, parent *x509.Certificate, parentKey crypto.Signer, now time.Time, life time.Duration) (*x509.Certificate, error) {
	const op = "make CA certificate"
	cr, err := x509util.CreateCertificateRequest(cn, nil, key)
	if err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	c, err := x509util.NewCertificate(cr, x509util.WithTemplate(text, x509util.CreateTemplateData(cn, nil)))
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	t := c.GetCertificate()
	t.NotBefore, t.NotAfter = now.Add(-time.Minute), now.Add(life)
	if parent == nil {
		parent = t
	}
	crt, err := x509util.CreateCertificate(t, parent, key.Public(), parentKey)
	if err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	return crt, nil
}

// RequestIntermediate starts a CA under a customer's root: it makes the
// intermediate key (or reuses the one already made) and returns its CSR,
// also written to Dir/intermediate.csr. Send the CSR to the customer's CA,
// then call ImportIntermediate with what comes back. It returns KindConflict
// when the directory already holds a working CA.
func RequestIntermediate(ctx context.Context, cfg Config) (*x509.CertificateRequest, error) {
	const op = "request intermediate"
	if err := cfg.validate(op); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(cfg.Dir, IntermediateFile)); err == nil {
		return nil, station.Errorf(op, station.KindConflict, "%s already holds a CA: use another directory, or move it away to start over", cfg.Dir)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	key, err := cfg.Keys.Signer(ctx, IntermediateKey)
	if station.KindOf(err) == station.KindNotFound {
		key, err = cfg.Keys.CreateKey(ctx, IntermediateKey, cfg.KeyType)
	}
	if err != nil {
		return nil, err
	}
	cr, err := x509util.CreateCertificateRequest(cfg.name()+" Intermediate CA", nil, key)
	if err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: cr.Raw})
	if err := writeFileAtomic(filepath.Join(cfg.Dir, CSRFile), b, 0o644); err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	cfg.logger().Info("intermediate CSR written", "path", filepath.Join(cfg.Dir, CSRFile))
	return cr, nil
}

// ImportIntermediate finishes RequestIntermediate: it checks that cert is
// for the intermediate key, is a CA that may sign certificates, and chains
// through chain (any further issuers) to root, then stores them and opens
// the CA. A mismatch is KindInvalid; a chain that does not verify is
// KindUnauthorized.
func ImportIntermediate(ctx context.Context, cfg Config, cert, root *x509.Certificate, chain ...*x509.Certificate) (*CA, error) {
	const op = "import intermediate"
	if err := cfg.validate(op); err != nil {
		return nil, err
	}
	if cert == nil || root == nil {
		return nil, station.Errorf(op, station.KindInvalid, "give both the signed intermediate and the customer's root")
	}
	key, err := cfg.Keys.Signer(ctx, IntermediateKey)
	if err != nil {
		return nil, err
	}
	switch {
	case !samePublicKey(key.Public(), cert.PublicKey):
		return nil, station.Errorf(op, station.KindInvalid, "certificate %q is not for this station's intermediate key: import the certificate issued for %s", cert.Subject, filepath.Join(cfg.Dir, CSRFile))
	case !cert.BasicConstraintsValid || !cert.IsCA:
		return nil, station.Errorf(op, station.KindInvalid, "certificate %q is not a CA certificate: ask the customer to sign the CSR with a CA (intermediate) profile", cert.Subject)
	case cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0:
		return nil, station.Errorf(op, station.KindInvalid, "certificate %q may not sign certificates (no certSign key usage): ask the customer for a CA profile", cert.Subject)
	case !root.IsCA || root.CheckSignatureFrom(root) != nil:
		return nil, station.Errorf(op, station.KindInvalid, "%q is not a self-signed root CA: give the customer's root certificate", root.Subject)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range chain {
		inters.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: cfg.now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, station.Errorf(op, station.KindUnauthorized, "intermediate %q does not chain to root %q: %w; check you have the customer's right root", cert.Subject, root.Subject, err)
	}
	issuers := append([]*x509.Certificate{cert}, chain...)
	if err := writeCerts(cfg.Dir, root, issuers); err != nil {
		return nil, err
	}
	os.Remove(filepath.Join(cfg.Dir, CSRFile))
	cfg.logger().Info("intermediate imported", "intermediate", cert.Subject.String(), "root", root.Subject.String())
	return newCA(ctx, &cfg, root, issuers, key)
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func writeCerts(dir string, root *x509.Certificate, issuers []*x509.Certificate) error {
	const op = "store CA certificates"
	var b bytes.Buffer
	for _, c := range issuers {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	if err := writeFileAtomic(filepath.Join(dir, RootFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}), 0o644); err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	if err := writeFileAtomic(filepath.Join(dir, IntermediateFile), b.Bytes(), 0o644); err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	return nil
}

func loadCerts(dir string) (*x509.Certificate, []*x509.Certificate, error) {
	roots, err := readCerts(filepath.Join(dir, RootFile))
	if err != nil {
		return nil, nil, err
	}
	issuers, err := readCerts(filepath.Join(dir, IntermediateFile))
	if err != nil {
		return nil, nil, err
	}
	return roots[0], issuers, nil
}

// ParseCertificates reads PEM certificates, e.g. a customer's root or a
// signed intermediate.
func ParseCertificates(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, station.Errorf("parse certificates", station.KindInvalid, "%w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, station.Errorf("parse certificates", station.KindInvalid, "no PEM certificate found: give a PEM file")
	}
	return out, nil
}

func readCerts(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, station.Errorf("load CA certificates", station.KindNotFound, "no %s", path)
	} else if err != nil {
		return nil, station.E("load CA certificates", station.KindUnavailable, err)
	}
	cs, err := ParseCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cs, nil
}
