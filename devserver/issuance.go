package devserver

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"sync"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// CertificateIssuer signs the certificate signing requests devices send
// with their registration (clientCertificateCsr, DPS's certificate issuance
// preview): the station CA, embedded or remote.
type CertificateIssuer interface {
	// IssueDeviceCertificate checks csrDER (PKCS#10, its subject CN must be
	// registrationID) and returns the issued leaf, then its intermediates.
	// Kinds: Invalid (a CSR it refuses: the message says why), Conflict (a
	// cap is reached), Unavailable.
	IssueDeviceCertificate(ctx context.Context, registrationID string, csrDER []byte) ([]*x509.Certificate, error)
}

// csrNotConfigured is the message DPS answers a CSR with when the service
// issues no certificates; the aziot identity service matches it exactly and
// registers again without the CSR (§2).
const csrNotConfigured = "Device sent CSR but it is not configured in the service."

// pendingCSRs holds the CSRs of operations whose assignment has not run
// yet, by operation ID. An operation's assignment runs in this process
// right after its register, so memory is where a CSR lives until then.
type pendingCSRs struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (p *pendingCSRs) put(opID string, csr []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = make(map[string][]byte)
	}
	p.m[opID] = csr
}

func (p *pendingCSRs) take(opID string) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	csr := p.m[opID]
	delete(p.m, opID)
	return csr
}

// DecodeClientCSR decodes a register body's clientCertificateCsr: base64
// DER PKCS#10 (PEM is accepted too), whose signature must verify. Kinds:
// Invalid.
func DecodeClientCSR(s string) ([]byte, error) {
	const op = "read client certificate CSR"
	s = strings.TrimSpace(s)
	var der []byte
	if strings.HasPrefix(s, "-----BEGIN") {
		b, _ := pem.Decode([]byte(s))
		if b == nil {
			return nil, station.Errorf(op, station.KindInvalid, "clientCertificateCsr is PEM that does not decode: send base64 DER PKCS#10")
		}
		der = b.Bytes
	} else {
		var err error
		if der, err = base64.StdEncoding.DecodeString(s); err != nil {
			if der, err = base64.RawStdEncoding.DecodeString(s); err != nil {
				return nil, station.Errorf(op, station.KindInvalid, "clientCertificateCsr is not base64: send base64 DER PKCS#10")
			}
		}
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "clientCertificateCsr is not a PKCS#10 request: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "clientCertificateCsr's signature does not verify: sign it with the key it asks to certify")
	}
	return der, nil
}

// acceptCSR checks the CSR of a register request before the operation
// starts: a CSR to a service without an issuer is refused with DPS's own
// message, a malformed one as a bad request. It returns the CSR's DER (nil
// when there is none).
func (s *Server) acceptCSR(d *deviceRequest) ([]byte, error) {
	if d.body == nil || d.body.ClientCertificateCSR == "" {
		return nil, nil
	}
	if s.cfg.Issuer == nil {
		return nil, station.Errorf("register device", station.KindInvalid, "%s", csrNotConfigured)
	}
	return DecodeClientCSR(d.body.ClientCertificateCSR)
}

// issue signs an assigned device's CSR and returns the chain as PEM (leaf
// first) and the thumbprints the hub accepts it by. A refusal fails the
// registration with the issuer's reason.
func (s *Server) issue(ctx context.Context, regID string, csr []byte) (string, []string, *allocationError) {
	chain, err := s.cfg.Issuer.IssueDeviceCertificate(ctx, regID, csr)
	if err == nil && len(chain) == 0 {
		err = station.Errorf("issue device certificate", station.KindInternal, "the issuer returned no certificate")
	}
	if err != nil {
		code := dps.CodeBadRequest
		if station.KindOf(err) == station.KindUnavailable {
			code = 500000
		}
		return "", nil, &allocationError{code: code, message: "The certificate could not be issued: " + err.Error()}
	}
	var b bytes.Buffer
	for _, c := range chain {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	sha1Hex, sha256Hex := thumbprints(chain[0])
	return b.String(), []string{sha1Hex, sha256Hex}, nil
}
