package pki

import (
	"context"
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/pkcs11"

	"github.com/kilnworks/kiln/station"
)

// PKCS11Keys is a KeyStore whose keys live in a PKCS #11 token (an HSM, or
// softhsm2 in tests), reached through go.step.sm/crypto/kms. A key named
// "intermediate" is the token object labelled "kiln-intermediate". Build
// with cgo; the kms needs the module's shared library at run time.
type PKCS11Keys struct {
	kms *pkcs11.PKCS11

	mu     sync.Mutex
	closed bool
}

var _ KeyStore = (*PKCS11Keys)(nil)

// OpenPKCS11 opens the token named by uri, a PKCS #11 URI such as
// "pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=kiln?pin-value=1234".
// A wrong PIN is KindUnauthorized; a missing module or token KindUnavailable.
// Close the store when done.
func OpenPKCS11(ctx context.Context, uri string) (*PKCS11Keys, error) {
	const op = "open PKCS #11 token"
	k, err := pkcs11.New(ctx, apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		kind := station.KindUnavailable
		if strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
			kind = station.KindUnauthorized
		}
		return nil, station.Errorf(op, kind, "%w: check the module path, token label and PIN in the URI", err)
	}
	return &PKCS11Keys{kms: k}, nil
}

// objectURI maps a key name to the token object's URI.
func objectURI(name string) string {
	return fmt.Sprintf("pkcs11:id=%s;object=kiln-%s", hex.EncodeToString([]byte("kiln-"+name)), name)
}

// CreateKey implements KeyStore. The key is generated inside the token and
// never leaves it.
func (p *PKCS11Keys) CreateKey(ctx context.Context, name string, t KeyType) (crypto.Signer, error) {
	const op = "create CA key in token"
	req := &apiv1.CreateKeyRequest{Name: objectURI(name)}
	switch t {
	case ECDSAP256, "":
		req.SignatureAlgorithm = apiv1.ECDSAWithSHA256
	case ECDSAP384:
		req.SignatureAlgorithm = apiv1.ECDSAWithSHA384
	case ECDSAP521:
		req.SignatureAlgorithm = apiv1.ECDSAWithSHA512
	case RSA2048, RSA3072, RSA4096:
		req.SignatureAlgorithm = apiv1.SHA256WithRSA
		req.Bits, _ = strconv.Atoi(strings.TrimPrefix(string(t), "RSA-"))
	default:
		return nil, station.Errorf(op, station.KindInvalid, "key type %q is not supported in a token: use EC-P256, EC-P384 or RSA-2048/3072", t)
	}
	resp, err := p.kms.CreateKey(req)
	if err != nil {
		if errors.As(err, new(apiv1.AlreadyExistsError)) {
			return nil, station.Errorf(op, station.KindConflict, "the token already holds %s: use it or delete it", req.Name)
		}
		return nil, station.E(op, station.KindUnavailable, err)
	}
	s, err := p.kms.CreateSigner(&resp.CreateSignerRequest)
	if err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	return s, nil
}

// Signer implements KeyStore.
func (p *PKCS11Keys) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	const op = "load CA key from token"
	s, err := p.kms.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: objectURI(name)})
	if err != nil {
		if errors.As(err, new(apiv1.NotFoundError)) || strings.Contains(err.Error(), "not found") {
			return nil, station.Errorf(op, station.KindNotFound, "the token holds no %s", objectURI(name))
		}
		return nil, station.E(op, station.KindUnavailable, err)
	}
	return s, nil
}

// Close releases the token. It is safe to call more than once.
func (p *PKCS11Keys) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	return p.kms.Close()
}
