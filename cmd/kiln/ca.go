package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

// caConfig is the station CA's part of station.json.
type caConfig struct {
	// Name names the CA: "<Name> Root CA" and "<Name> Intermediate CA".
	Name string `json:"name,omitempty"`
	// KeyType is the type of the CA's own keys, made on first use.
	KeyType string `json:"key_type,omitempty"`
	// DeviceKeys are the device key types accepted in CSRs ("EC-P256",
	// "RSA-2048+"); empty means EC-P256.
	DeviceKeys []string `json:"device_keys,omitempty"`
	// ValidityDays is a leaf's lifetime; 0 means 365.
	ValidityDays int `json:"validity_days,omitempty"`
	// MaxPerBatch and MaxPerShift cap the leaves issued; 0 means no cap.
	MaxPerBatch int `json:"max_per_batch,omitempty"`
	MaxPerShift int `json:"max_per_shift,omitempty"`
	// PKCS11 is a PKCS#11 URI: the CA keys live in that token instead of
	// passphrase-sealed files.
	PKCS11 string `json:"pkcs11,omitempty"`
	// Remote, when set, makes a step-ca the factory runs the signing CA.
	Remote *remoteCA `json:"remote,omitempty"`
}

// remoteCA names a step-ca and its JWK provisioner.
type remoteCA struct {
	URL          string `json:"url"`
	Provisioner  string `json:"provisioner"`
	Root         string `json:"root"`          // PEM file of the step-ca's root
	PasswordFile string `json:"password_file"` // file holding the provisioner's password
}

// The files of the station CA in the data directory.
const (
	caDirName          = "ca"
	passphraseFileName = "ca-passphrase"
	symKeySecretName   = "symkey-group"
	defaultSymKeyGroup = "kiln-symkey"
	defaultX509Group   = "kiln-x509"
)

func (c *config) caDir() string { return filepath.Join(c.Home, caDirName) }

// caPassphrase returns the passphrase that seals the CA keys and station
// secrets: $KILN_CA_PASSPHRASE, else the file $KILN_CA_PASSPHRASE_FILE names,
// else the data directory's own passphrase file, made on first use (the
// embedded default, so that make run needs no set-up). The last reports
// itself as such so kiln ca show can warn about it.
func caPassphrase(e *env, c *config) (pass []byte, generated bool, err error) {
	if p := e.getenv("KILN_CA_PASSPHRASE"); p != "" {
		return []byte(p), false, nil
	}
	if f := e.getenv("KILN_CA_PASSPHRASE_FILE"); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, false, fmt.Errorf("read the CA passphrase from %s (KILN_CA_PASSPHRASE_FILE): %w", f, err)
		}
		b = bytes.TrimRight(b, "\r\n")
		if len(b) == 0 {
			return nil, false, usagef("%s (KILN_CA_PASSPHRASE_FILE) is empty: put the CA passphrase in it", f)
		}
		return b, false, nil
	}
	path := filepath.Join(c.Home, passphraseFileName)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		raw := make([]byte, 32)
		rand.Read(raw)
		b = []byte(base64.RawURLEncoding.EncodeToString(raw))
		if err := os.WriteFile(path, append(b, '\n'), 0o600); err != nil {
			return nil, false, fmt.Errorf("create the CA passphrase file %s: %w", path, err)
		}
		return b, true, nil
	case err != nil:
		return nil, false, fmt.Errorf("read the CA passphrase file %s: %w", path, err)
	}
	return bytes.TrimRight(b, "\r\n"), true, nil
}

// caKeys returns the key store of the station CA: the PKCS#11 token of the
// configuration, or passphrase-sealed files in the CA directory.
func caKeys(ctx context.Context, e *env, c *config) (pki.KeyStore, func(), error) {
	if c.CA.PKCS11 != "" {
		k, err := pki.OpenPKCS11(ctx, c.CA.PKCS11)
		if err != nil {
			return nil, nil, err
		}
		return k, func() { k.Close() }, nil
	}
	pass, _, err := caPassphrase(e, c)
	if err != nil {
		return nil, nil, err
	}
	return &pki.FileKeys{Dir: c.caDir(), Passphrase: pass}, func() {}, nil
}

func (c *config) pkiProfile() (pki.Profile, error) {
	p := pki.Profile{MaxPerBatch: c.CA.MaxPerBatch, MaxPerShift: c.CA.MaxPerShift}
	if c.CA.ValidityDays < 0 {
		return p, usagef("ca.validity_days %d: give a positive number of days", c.CA.ValidityDays)
	}
	p.Validity = time.Duration(c.CA.ValidityDays) * 24 * time.Hour
	for _, k := range c.CA.DeviceKeys {
		p.AllowedKeys = append(p.AllowedKeys, pki.KeyType(k))
	}
	return p, nil
}

func (c *config) pkiConfig(keys pki.KeyStore, e *env) (pki.Config, error) {
	prof, err := c.pkiProfile()
	if err != nil {
		return pki.Config{}, err
	}
	return pki.Config{Dir: c.caDir(), Keys: keys, KeyType: pki.KeyType(c.CA.KeyType), Name: c.CA.Name, Profile: prof, Logger: e.logger()}, nil
}

// leafIssuer is what pki.CA and pki.Remote share.
type leafIssuer interface {
	Issue(ctx context.Context, csr *x509.CertificateRequest, req pki.IssueRequest) (*pki.Leaf, error)
}

// stationIssuer is station.Issuer over the station CA, embedded or remote.
type stationIssuer struct {
	ca      leafIssuer
	signing *x509.Certificate // what an X.509 enrollment group names
	now     func() time.Time
}

var _ station.Issuer = (*stationIssuer)(nil)

func (s *stationIssuer) Issue(ctx context.Context, req station.IssueRequest) (*station.IssuedCertificate, error) {
	csr, err := x509.ParseCertificateRequest(req.CSR)
	if err != nil {
		return nil, station.Errorf("issue certificate", station.KindInvalid, "the DUT's CSR does not parse (%v): check the DUT's firmware", err)
	}
	leaf, err := s.ca.Issue(ctx, csr, pki.IssueRequest{
		RegistrationID: req.RegistrationID, Operator: req.Operator, Batch: req.Batch, Shift: shiftOf(s.now()),
	})
	if err != nil {
		return nil, err
	}
	// Without IncludeRoot the chain stops below the root: devices are given
	// the chain up to it.
	out := &station.IssuedCertificate{Serial: hex.EncodeToString(leaf.Certificate.SerialNumber.Bytes())}
	for _, c := range leaf.Chain {
		out.Chain = append(out.Chain, c.Raw)
	}
	return out, nil
}

func (s *stationIssuer) SigningCertificate() []byte { return s.signing.Raw }

// shiftOf names the eight-hour shift t falls in, in local time: early
// (06–14), late (14–22) or night (22–06, named by the day it starts).
func shiftOf(t time.Time) string {
	t = t.Local()
	switch h := t.Hour(); {
	case h >= 6 && h < 14:
		return t.Format(time.DateOnly) + "/early"
	case h >= 14 && h < 22:
		return t.Format(time.DateOnly) + "/late"
	case h < 6:
		return t.AddDate(0, 0, -1).Format(time.DateOnly) + "/night"
	}
	return t.Format(time.DateOnly) + "/night"
}

// openIssuer opens the station CA of the configuration, creating the
// embedded one on first use.
func openIssuer(ctx context.Context, e *env, c *config) (station.Issuer, func(), error) {
	if r := c.CA.Remote; r != nil {
		rem, root, closeFn, err := openRemote(ctx, e, c, r)
		if err != nil {
			return nil, nil, err
		}
		return &stationIssuer{ca: rem, signing: root, now: time.Now}, closeFn, nil
	}
	keys, closeKeys, err := caKeys(ctx, e, c)
	if err != nil {
		return nil, nil, err
	}
	cfg, err := c.pkiConfig(keys, e)
	if err != nil {
		closeKeys()
		return nil, nil, err
	}
	ca, err := pki.Open(ctx, cfg)
	if err != nil {
		closeKeys()
		return nil, nil, fmt.Errorf("open the station CA in %s: %w", c.caDir(), err)
	}
	return &stationIssuer{ca: ca, signing: ca.Intermediate(), now: time.Now}, func() { ca.Close(); closeKeys() }, nil
}

func openRemote(ctx context.Context, e *env, c *config, r *remoteCA) (*pki.Remote, *x509.Certificate, func(), error) {
	rootPEM, err := os.ReadFile(r.Root)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("read the step-ca root %s: %w", r.Root, err)
	}
	certs, err := pki.ParseCertificates(rootPEM)
	if err != nil || len(certs) == 0 {
		return nil, nil, nil, usagef("%s holds no certificate: give the step-ca's root certificate (PEM)", r.Root)
	}
	pw, err := os.ReadFile(r.PasswordFile)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("read the provisioner password file %s: %w", r.PasswordFile, err)
	}
	prof, err := c.pkiProfile()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := os.MkdirAll(c.caDir(), 0o700); err != nil {
		return nil, nil, nil, err
	}
	log, err := pki.OpenFileLog(filepath.Join(c.caDir(), "issuance.jsonl"))
	if err != nil {
		return nil, nil, nil, err
	}
	rem, err := pki.NewRemote(ctx, pki.RemoteConfig{URL: r.URL, Root: certs[0], Provisioner: r.Provisioner,
		Password: bytes.TrimRight(pw, "\r\n"), Profile: prof, Log: log, Logger: e.logger()})
	if err != nil {
		log.Close()
		return nil, nil, nil, fmt.Errorf("connect to the step-ca at %s: %w", r.URL, err)
	}
	return rem, certs[0], func() { log.Close() }, nil
}

// openSymKeyGroup returns the station's symmetric-key enrollment group,
// making its key on first use. The key is sealed like the CA keys.
func openSymKeyGroup(ctx context.Context, e *env, c *config) (*station.SymKeyGroup, error) {
	pass, _, err := caPassphrase(e, c)
	if err != nil {
		return nil, err
	}
	key, err := (&pki.FileKeys{Dir: c.caDir(), Passphrase: pass}).Secret(ctx, symKeySecretName, 32)
	if err != nil {
		return nil, fmt.Errorf("open the symmetric-key group key in %s: %w", c.caDir(), err)
	}
	id := c.SymKeyGroup
	if id == "" {
		id = defaultSymKeyGroup
	}
	return &station.SymKeyGroup{ID: id, Key: key}, nil
}

func runCA(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("give a subcommand: init, show, export, import or use-remote")
	}
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	switch args[0] {
	case "init":
		return caInit(ctx, e, c, args[1:])
	case "show":
		return caShow(ctx, e, c, args[1:])
	case "export":
		return caExport(ctx, e, c, args[1:])
	case "import":
		return caImport(ctx, e, c, args[1:])
	case "use-remote":
		return caUseRemote(ctx, e, c, args[1:])
	}
	return usagef("unknown subcommand %q: use init, show, export, import or use-remote", args[0])
}

func caInit(ctx context.Context, e *env, c *config, args []string) error {
	fs := newFlags(e, "ca init")
	fs.StringVar(&c.CA.Name, "name", c.CA.Name, "the CA's name (root \"NAME Root CA\", intermediate \"NAME Intermediate CA\")")
	fs.StringVar(&c.CA.KeyType, "key-type", c.CA.KeyType, "type of the CA keys: EC-P256 (default), EC-P384, RSA-2048, RSA-3072, RSA-4096")
	csrOut := fs.String("csr", "", "make only the intermediate key and write its CSR to this file, for a customer's root to sign (then: kiln ca import)")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	if c.CA.Remote != nil {
		return usagef("this station signs with the step-ca at %s: run kiln ca use-remote --off first", c.CA.Remote.URL)
	}
	keys, closeKeys, err := caKeys(ctx, e, c)
	if err != nil {
		return err
	}
	defer closeKeys()
	cfg, err := c.pkiConfig(keys, e)
	if err != nil {
		return err
	}
	if *csrOut != "" {
		csr, err := pki.RequestIntermediate(ctx, cfg)
		if err != nil {
			return err
		}
		if err := os.WriteFile(*csrOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr.Raw}), 0o644); err != nil {
			return err
		}
		if err := c.save(); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "intermediate CSR written to %s (subject %s)\nhave the customer's CA sign it as a CA certificate, then run: kiln ca import --cert SIGNED.pem --root ROOT.pem\n", *csrOut, csr.Subject)
		return nil
	}
	_, statErr := os.Stat(filepath.Join(c.caDir(), pki.IntermediateFile))
	ca, err := pki.Open(ctx, cfg)
	if err != nil {
		return err
	}
	defer ca.Close()
	if err := c.save(); err != nil {
		return err
	}
	if statErr == nil {
		fmt.Fprintln(e.stdout, "the station CA exists already:")
	} else {
		fmt.Fprintln(e.stdout, "station CA created:")
	}
	return printCA(e, c, caInfoOf(c, ca.Root(), []*x509.Certificate{ca.Intermediate()}))
}

func caImport(ctx context.Context, e *env, c *config, args []string) error {
	fs := newFlags(e, "ca import")
	certPath := fs.String("cert", "", "the signed intermediate certificate (PEM)")
	rootPath := fs.String("root", "", "the customer's root certificate (PEM)")
	chainPath := fs.String("chain", "", "further intermediates between them (PEM), if any")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	if *certPath == "" || *rootPath == "" {
		return usagef("give --cert (the signed intermediate) and --root (the customer's root)")
	}
	read := func(path, what string) ([]*x509.Certificate, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read %s %s: %w", what, path, err)
		}
		cs, err := pki.ParseCertificates(b)
		if err != nil || len(cs) == 0 {
			return nil, usagef("%s holds no %s certificate (PEM)", path, what)
		}
		return cs, nil
	}
	cert, err := read(*certPath, "intermediate")
	if err != nil {
		return err
	}
	root, err := read(*rootPath, "root")
	if err != nil {
		return err
	}
	var chain []*x509.Certificate
	if *chainPath != "" {
		if chain, err = read(*chainPath, "chain"); err != nil {
			return err
		}
	}
	keys, closeKeys, err := caKeys(ctx, e, c)
	if err != nil {
		return err
	}
	defer closeKeys()
	cfg, err := c.pkiConfig(keys, e)
	if err != nil {
		return err
	}
	ca, err := pki.ImportIntermediate(ctx, cfg, cert[0], root[0], chain...)
	if err != nil {
		return err
	}
	defer ca.Close()
	fmt.Fprintln(e.stdout, "intermediate imported; the station CA signs under the customer's root:")
	return printCA(e, c, caInfoOf(c, ca.Root(), append([]*x509.Certificate{ca.Intermediate()}, chain...)))
}

func caUseRemote(ctx context.Context, e *env, c *config, args []string) error {
	fs := newFlags(e, "ca use-remote")
	r := remoteCA{}
	fs.StringVar(&r.URL, "url", "", "the step-ca's address, https://host:port")
	fs.StringVar(&r.Provisioner, "provisioner", "", "the JWK provisioner the station signs its requests with")
	fs.StringVar(&r.Root, "root", "", "the step-ca's root certificate (PEM file)")
	fs.StringVar(&r.PasswordFile, "password-file", "", "file holding the provisioner's password")
	off := fs.Bool("off", false, "go back to the station's embedded CA")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	if *off {
		c.CA.Remote = nil
		if err := c.save(); err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, "the station signs with its embedded CA again")
		return nil
	}
	if r.URL == "" || r.Provisioner == "" || r.Root == "" || r.PasswordFile == "" {
		return usagef("give --url, --provisioner, --root and --password-file")
	}
	for _, p := range []*string{&r.Root, &r.PasswordFile} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
	}
	_, root, closeFn, err := openRemote(ctx, e, c, &r)
	if err != nil {
		return err
	}
	closeFn()
	c.CA.Remote = &r
	if err := c.save(); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "the station signs with the step-ca at %s (provisioner %s); connection and provisioner key checked\n", r.URL, r.Provisioner)
	return printCA(e, c, caInfoOf(c, root, nil))
}

// caInfo is what kiln ca show prints.
type caInfo struct {
	Mode          string     `json:"mode"` // embedded, remote
	Custody       string     `json:"key_custody"`
	Root          certInfo   `json:"root"`
	Intermediates []certInfo `json:"intermediates,omitempty"`
	Issued        *int       `json:"issued,omitempty"`
	Warning       string     `json:"warning,omitempty"`
}

type certInfo struct {
	Subject   string    `json:"subject"`
	SHA256    string    `json:"sha256"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	KeyType   string    `json:"key_type"`
}

func certInfoOf(c *x509.Certificate) certInfo {
	sum := sha256.Sum256(c.Raw)
	return certInfo{Subject: c.Subject.String(), SHA256: hex.EncodeToString(sum[:]), NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC(), KeyType: string(pki.KeyTypeOf(c.PublicKey))}
}

func caInfoOf(c *config, root *x509.Certificate, inters []*x509.Certificate) caInfo {
	info := caInfo{Mode: "embedded", Root: certInfoOf(root)}
	switch {
	case c.CA.Remote != nil:
		info.Mode, info.Custody = "remote", "step-ca at "+c.CA.Remote.URL
	case c.CA.PKCS11 != "":
		info.Custody = "PKCS#11 token"
	default:
		info.Custody = "files sealed with AES-256-GCM under an scrypt-derived key"
	}
	for _, i := range inters {
		info.Intermediates = append(info.Intermediates, certInfoOf(i))
	}
	return info
}

func printCA(e *env, c *config, info caInfo) error {
	if c.Home != "" && c.CA.Remote == nil && c.CA.PKCS11 == "" {
		if _, err := os.Stat(filepath.Join(c.Home, passphraseFileName)); err == nil && e.getenv("KILN_CA_PASSPHRASE") == "" && e.getenv("KILN_CA_PASSPHRASE_FILE") == "" {
			info.Warning = "the CA passphrase is the generated one in " + filepath.Join(c.Home, passphraseFileName) + ": for production set KILN_CA_PASSPHRASE (or keep the keys in PKCS#11) and remove that file"
		}
	}
	if n, err := issuedCount(c); err == nil {
		info.Issued = &n
	}
	fmt.Fprintf(e.stdout, "mode          %s\nkey custody   %s\n", info.Mode, info.Custody)
	pr := func(label string, ci certInfo) {
		fmt.Fprintf(e.stdout, "%-13s %s\n              %s, valid %s to %s\n              sha256 %s\n", label, ci.Subject, ci.KeyType,
			ci.NotBefore.Format(time.DateOnly), ci.NotAfter.Format(time.DateOnly), ci.SHA256)
	}
	pr("root", info.Root)
	for _, i := range info.Intermediates {
		pr("intermediate", i)
	}
	if info.Issued != nil {
		fmt.Fprintf(e.stdout, "issued        %d leaves\n", *info.Issued)
	}
	if info.Warning != "" {
		fmt.Fprintf(e.stdout, "warning       %s\n", info.Warning)
	}
	return nil
}

// issuedCount counts the issuance log's entries.
func issuedCount(c *config) (int, error) {
	b, err := os.ReadFile(filepath.Join(c.caDir(), "issuance.jsonl"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	return bytes.Count(b, []byte("\n")), nil
}

func caShow(ctx context.Context, e *env, c *config, args []string) error {
	fs := newFlags(e, "ca show")
	asJSON := fs.Bool("json", false, "print as JSON")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	root, inters, err := caCerts(ctx, e, c)
	if err != nil {
		return err
	}
	info := caInfoOf(c, root, inters)
	if !*asJSON {
		return printCA(e, c, info)
	}
	if n, err := issuedCount(c); err == nil {
		info.Issued = &n
	}
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(info)
}

// caCerts reads the station CA's certificates without unlocking its keys.
func caCerts(ctx context.Context, e *env, c *config) (*x509.Certificate, []*x509.Certificate, error) {
	if r := c.CA.Remote; r != nil {
		b, err := os.ReadFile(r.Root)
		if err != nil {
			return nil, nil, fmt.Errorf("read the step-ca root %s: %w", r.Root, err)
		}
		cs, err := pki.ParseCertificates(b)
		if err != nil || len(cs) == 0 {
			return nil, nil, usagef("%s holds no certificate", r.Root)
		}
		return cs[0], nil, nil
	}
	read := func(name string) ([]*x509.Certificate, error) {
		b, err := os.ReadFile(filepath.Join(c.caDir(), name))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, usagef("there is no station CA in %s yet: run kiln ca init", c.caDir())
		}
		if err != nil {
			return nil, err
		}
		return pki.ParseCertificates(b)
	}
	roots, err := read(pki.RootFile)
	if err != nil {
		return nil, nil, err
	}
	inters, err := read(pki.IntermediateFile)
	if err != nil {
		return nil, nil, err
	}
	if len(roots) == 0 || len(inters) == 0 {
		return nil, nil, fmt.Errorf("the station CA files in %s are empty: restore them from a backup", c.caDir())
	}
	return roots[0], inters, nil
}

func caExport(ctx context.Context, e *env, c *config, args []string) error {
	fs := newFlags(e, "ca export")
	out := fs.String("out", "", "write to this file instead of standard output")
	what := fs.String("what", "chain", "what to export: chain (intermediates, then the root), root, or intermediate")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	root, inters, err := caCerts(ctx, e, c)
	if err != nil {
		return err
	}
	var certs []*x509.Certificate
	switch *what {
	case "chain":
		certs = append(append(certs, inters...), root)
	case "root":
		certs = []*x509.Certificate{root}
	case "intermediate":
		if len(inters) == 0 {
			return usagef("a remote step-ca's intermediate is not known to the station: export the root")
		}
		certs = inters[:1]
	default:
		return usagef("--what %q: use chain, root or intermediate", *what)
	}
	var b bytes.Buffer
	for _, cert := range certs {
		fmt.Fprintf(&b, "# %s\n", strings.ReplaceAll(cert.Subject.String(), "\n", " "))
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	}
	if *out == "" {
		_, err := e.stdout.Write(b.Bytes())
		return err
	}
	return os.WriteFile(*out, b.Bytes(), 0o644)
}

// dpsIssuer is the station CA as the embedded DPS's certificate issuer:
// devices that send a CSR with their registration get a leaf for their
// registration ID.
type dpsIssuer struct{ station.Issuer }

var _ devserver.CertificateIssuer = dpsIssuer{}

func (d dpsIssuer) IssueDeviceCertificate(ctx context.Context, regID string, csr []byte) ([]*x509.Certificate, error) {
	out, err := d.Issue(ctx, station.IssueRequest{CSR: csr, RegistrationID: regID, Operator: "dps-registration"})
	if err != nil {
		return nil, err
	}
	chain := make([]*x509.Certificate, 0, len(out.Chain))
	for _, der := range out.Chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, station.E("issue device certificate", station.KindInternal, err)
		}
		chain = append(chain, c)
	}
	return chain, nil
}
