package pki

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/smallstep/certificates/api"
	"github.com/smallstep/cli-utils/token"
	"github.com/smallstep/cli-utils/token/provision"
	"go.step.sm/crypto/jose"

	"github.com/kilnworks/kiln/station"
)

// RemoteConfig configures a Remote. URL, Root, Provisioner, Password and Log
// are required.
type RemoteConfig struct {
	// URL is the step-ca's address, e.g. "https://ca.factory.example:9000".
	URL string
	// Root is the factory CA's root; the connection is verified against it
	// and it ends every chain.
	Root *x509.Certificate
	// Provisioner names the JWK provisioner the station signs tokens with.
	Provisioner string
	// Password decrypts the provisioner's key, which the CA serves
	// encrypted.
	Password []byte
	// Profile drives the local checks, the leaf validity asked for, and the
	// caps. The leaf's shape (template) is the remote provisioner's.
	Profile Profile
	// Log records issuances and backs the caps.
	Log IssuanceLog
	// Logger receives events; nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Remote issues leaves from a step-ca the factory runs, through its JWK
// provisioner, with the same checks, caps and issuance log as CA. It speaks
// step-ca's HTTP API (GET /provisioners, POST /1.0/sign) with one-time JWK
// tokens, as smallstep's ca client does, without linking that client's
// telemetry dependencies. It is safe for concurrent use.
type Remote struct {
	url         *url.URL
	hc          *http.Client
	provisioner string
	key         *jose.JSONWebKey
	rootSHA     string
	root        *x509.Certificate
	core        *issuer
}

// NewRemote connects to the step-ca in cfg and loads the provisioner's key.
// An unreachable CA is KindUnavailable; a wrong password or unknown
// provisioner KindUnauthorized.
func NewRemote(ctx context.Context, cfg RemoteConfig) (*Remote, error) {
	const op = "connect to step-ca"
	switch {
	case cfg.URL == "" || cfg.Root == nil || cfg.Provisioner == "":
		return nil, station.Errorf(op, station.KindInvalid, "give the step-ca URL, its root certificate and the JWK provisioner's name")
	case cfg.Log == nil:
		return nil, station.Errorf(op, station.KindInvalid, "no issuance log: the station records every leaf")
	}
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Scheme != "https" {
		return nil, station.Errorf(op, station.KindInvalid, "step-ca URL %q must be https://host:port", cfg.URL)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cfg.Root)
	sum := sha256.Sum256(cfg.Root.Raw)
	r := &Remote{
		url:         u,
		hc:          &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}},
		provisioner: cfg.Provisioner,
		rootSHA:     hex.EncodeToString(sum[:]),
		root:        cfg.Root,
	}
	if r.key, err = r.loadKey(ctx, cfg.Provisioner, cfg.Password); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger != nil {
		logger = logger.With("component", "pki", "ca", cfg.URL)
	}
	r.core = newIssuer(cfg.Profile, cfg.Log, logger, cfg.Now)
	r.core.root = cfg.Root
	return r, nil
}

// loadKey finds the named JWK provisioner and decrypts its key.
func (r *Remote) loadKey(ctx context.Context, name string, password []byte) (*jose.JSONWebKey, error) {
	const op = "load provisioner key"
	cursor := ""
	for {
		var page struct {
			Provisioners []struct {
				Type         string `json:"type"`
				Name         string `json:"name"`
				EncryptedKey string `json:"encryptedKey"`
			} `json:"provisioners"`
			NextCursor string `json:"nextCursor"`
		}
		q := url.Values{"limit": {"100"}}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		if err := r.do(ctx, http.MethodGet, "/provisioners?"+q.Encode(), nil, &page); err != nil {
			return nil, err
		}
		for _, p := range page.Provisioners {
			if p.Name != name || !strings.EqualFold(p.Type, "JWK") || p.EncryptedKey == "" {
				continue
			}
			b, err := jose.Decrypt([]byte(p.EncryptedKey), jose.WithPassword(password))
			if err != nil {
				return nil, station.Errorf(op, station.KindUnauthorized, "provisioner %q: its key does not decrypt with this password: check the provisioner password", name)
			}
			var k jose.JSONWebKey
			if err := json.Unmarshal(b, &k); err != nil {
				return nil, station.Errorf(op, station.KindInvalid, "provisioner %q: its key does not parse: %w", name, err)
			}
			return &k, nil
		}
		if page.NextCursor == "" {
			return nil, station.Errorf(op, station.KindUnauthorized, "step-ca %s has no JWK provisioner %q with an encrypted key: check the provisioner name", r.url, name)
		}
		cursor = page.NextCursor
	}
}

// do sends a JSON request to the CA and decodes the JSON answer into out.
func (r *Remote) do(ctx context.Context, method, path string, in, out any) error {
	const op = "call step-ca"
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return station.E(op, station.KindInternal, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, r.url.JoinPath("/").String()+strings.TrimPrefix(path, "/"), body)
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := r.hc.Do(req)
	if err != nil {
		return station.Errorf(op, station.KindUnavailable, "%w: check that the factory CA is running and reachable", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		var e struct {
			Message string `json:"message"`
		}
		json.Unmarshal(b, &e)
		kind := station.KindUnauthorized
		if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests {
			kind = station.KindUnavailable
		}
		return station.Errorf(op, kind, "%s %s: %s %s", method, path, resp.Status, e.Message)
	}
	if err := json.Unmarshal(b, out); err != nil {
		return station.Errorf(op, station.KindUnavailable, "%s %s: answer does not parse: %w", method, path, err)
	}
	return nil
}

// Root returns the factory CA's root.
func (r *Remote) Root() *x509.Certificate { return r.root }

// Issue checks csr like CA.Issue, then has the remote CA sign it. A CA that
// does not answer is KindUnavailable; a refusal by the CA is
// KindUnauthorized (its reason is in the message).
func (r *Remote) Issue(ctx context.Context, csr *x509.CertificateRequest, req IssueRequest) (*Leaf, error) {
	return r.core.issue(ctx, csr, req, r.sign)
}

// token makes the one-time JWK token that authorises one signature.
func (r *Remote) token(subject string) (string, error) {
	jti := make([]byte, 32)
	rand.Read(jti)
	now := time.Now()
	tok, err := provision.New(subject,
		token.WithJWTID(hex.EncodeToString(jti)),
		token.WithKid(r.key.KeyID),
		token.WithIssuer(r.provisioner),
		token.WithAudience(r.url.JoinPath("/1.0/sign").String()),
		token.WithValidity(now, now.Add(5*time.Minute)),
		token.WithSANS([]string{subject}),
		token.WithSHA(r.rootSHA),
	)
	if err != nil {
		return "", err
	}
	return tok.SignedString(r.key.Algorithm, r.key.Key)
}

func (r *Remote) sign(ctx context.Context, csr *x509.CertificateRequest, req IssueRequest) ([]*x509.Certificate, error) {
	const op = "sign leaf at step-ca"
	tok, err := r.token(req.RegistrationID)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	now := r.core.now()
	var resp api.SignResponse
	err = r.do(ctx, http.MethodPost, "/1.0/sign", &api.SignRequest{
		CsrPEM:    api.CertificateRequest{CertificateRequest: csr},
		OTT:       tok,
		NotBefore: api.NewTimeDuration(now.Add(-time.Minute)),
		NotAfter:  api.NewTimeDuration(now.Add(r.core.profile.validity())),
	}, &resp)
	if err != nil {
		return nil, fmt.Errorf("%s for %s: %w", op, req.RegistrationID, err)
	}
	var chain []*x509.Certificate
	for _, c := range resp.CertChainPEM {
		chain = append(chain, c.Certificate)
	}
	if len(chain) == 0 && resp.ServerPEM.Certificate != nil {
		chain = []*x509.Certificate{resp.ServerPEM.Certificate, resp.CaPEM.Certificate}
	}
	if len(chain) == 0 {
		return nil, station.Errorf(op, station.KindUnavailable, "step-ca returned no certificate for %s", req.RegistrationID)
	}
	return chain, nil
}
