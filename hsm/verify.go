package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kilnworks/kiln/station"
)

// The TCG OIDs of EK certificates.
var (
	OIDTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1} // tcg-at-tpmManufacturer
	OIDTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2} // tcg-at-tpmModel
	OIDTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3} // tcg-at-tpmVersion
	OIDEKCertificate   = asn1.ObjectIdentifier{2, 23, 133, 8, 1} // tcg-kp-EKCertificate
	oidSAN             = asn1.ObjectIdentifier{2, 5, 29, 17}
)

// TPMIdentity is what an EK certificate's subject alternative name says
// about its TPM, as the TCG attributes hold it (for example "id:00001014",
// "swtpm", "id:20191023").
type TPMIdentity struct {
	Manufacturer string
	Model        string
	Version      string
}

// ParseTPMSAN parses the value of a subjectAltName extension and returns
// the TPM manufacturer, model and version of its directoryName. It fails
// when no directoryName holds all three TCG attributes. Kinds: Invalid.
func ParseTPMSAN(der []byte) (TPMIdentity, error) {
	const op = "parse EK certificate subjectAltName"
	var seq asn1.RawValue
	rest, err := asn1.Unmarshal(der, &seq)
	if err != nil {
		return TPMIdentity{}, station.E(op, station.KindInvalid, err)
	}
	if len(rest) > 0 || seq.Class != asn1.ClassUniversal || seq.Tag != asn1.TagSequence || !seq.IsCompound {
		return TPMIdentity{}, station.Errorf(op, station.KindInvalid, "not a SEQUENCE of GeneralName")
	}
	names := seq.Bytes
	for len(names) > 0 {
		var gn asn1.RawValue
		if names, err = asn1.Unmarshal(names, &gn); err != nil {
			return TPMIdentity{}, station.E(op, station.KindInvalid, err)
		}
		if gn.Class != asn1.ClassContextSpecific || gn.Tag != 4 || !gn.IsCompound {
			continue // not a directoryName
		}
		var rdns pkix.RDNSequence
		if rest, err := asn1.Unmarshal(gn.Bytes, &rdns); err != nil || len(rest) > 0 {
			return TPMIdentity{}, station.Errorf(op, station.KindInvalid, "directoryName is not a Name")
		}
		var id TPMIdentity
		var got int
		for _, rdn := range rdns {
			for _, atv := range rdn {
				s, ok := atv.Value.(string)
				if !ok {
					continue
				}
				switch {
				case atv.Type.Equal(OIDTPMManufacturer):
					id.Manufacturer, got = s, got|1
				case atv.Type.Equal(OIDTPMModel):
					id.Model, got = s, got|2
				case atv.Type.Equal(OIDTPMVersion):
					id.Version, got = s, got|4
				}
			}
		}
		if got == 7 {
			return id, nil
		}
	}
	return TPMIdentity{}, station.Errorf(op, station.KindInvalid,
		"no directoryName with the TPM manufacturer, model and version (2.23.133.2.1/2/3)")
}

// Roots is a store of trusted EK-certificate issuers: the manufacturers'
// root CAs and any intermediates found beside them.
type Roots struct {
	dir           string
	roots         *x509.CertPool
	intermediates *x509.CertPool
	nroots        int
}

var _ station.Verifier = (*Roots)(nil)

// LoadRoots reads every .pem, .crt and .cer file in dir (PEM with one or
// more certificates, or one DER certificate). Self-signed certificates are
// trusted roots; the others are intermediates that may complete a chain.
// Kinds: NotFound (no such folder, or no root in it), Invalid (a file that
// is not a certificate).
func LoadRoots(dir string) (*Roots, error) {
	const op = "load EK roots"
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, station.Errorf(op, station.KindNotFound, "no folder %s: create it and put the TPM manufacturers' root CA certificates there", dir)
		}
		return nil, station.E(op, station.KindInvalid, err)
	}
	r := &Roots{dir: dir, roots: x509.NewCertPool(), intermediates: x509.NewCertPool()}
	for _, e := range entries {
		ext := strings.ToLower(filepath.Ext(e.Name()))
		if e.IsDir() || (ext != ".pem" && ext != ".crt" && ext != ".cer") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, station.E(op, station.KindInvalid, err)
		}
		certs, err := parseCerts(b)
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "%s: %w: remove it or replace it with a PEM or DER certificate", path, err)
		}
		for _, c := range certs {
			r.Add(c)
		}
	}
	if r.nroots == 0 {
		return nil, station.Errorf(op, station.KindNotFound,
			"no self-signed root certificate (.pem, .crt, .cer) in %s: add the TPM manufacturers' root CA certificates there", dir)
	}
	return r, nil
}

// Add adds c: as a root when it is self-signed, else as an intermediate.
func (r *Roots) Add(c *x509.Certificate) {
	if bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil {
		r.roots.AddCert(c)
		r.nroots++
		return
	}
	r.intermediates.AddCert(c)
}

func parseCerts(b []byte) ([]*x509.Certificate, error) {
	if !bytes.Contains(b, []byte("-----BEGIN")) {
		c, err := x509.ParseCertificate(b)
		if err != nil {
			return nil, err
		}
		return []*x509.Certificate{c}, nil
	}
	var certs []*x509.Certificate
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
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no CERTIFICATE block")
	}
	return certs, nil
}

// VerifyEKCert implements station.Verifier: e.EKCert must chain to one of
// the roots and certify e's EK (read from e.EKPublic, or e.EKKeyDER when
// that is empty). Kinds: NotFound (no certificate), Unauthorized (chain or
// key mismatch), Invalid (unparseable).
func (r *Roots) VerifyEKCert(ctx context.Context, e *station.Endorsement) error {
	const op = "verify EK certificate"
	if e == nil || len(e.EKCert) == 0 {
		return station.Errorf(op, station.KindNotFound, "the TPM has no EK certificate in NV 0x01C00002")
	}
	cert, err := x509.ParseCertificate(e.EKCert)
	if err != nil {
		return station.Errorf(op, station.KindInvalid, "EK certificate in NV 0x01C00002 does not parse: %w", err)
	}
	var ek crypto.PublicKey
	switch {
	case len(e.EKPublic) > 0:
		if ek, _, err = ParsePublic(e.EKPublic); err != nil {
			return station.E(op, station.KindInvalid, err)
		}
	case len(e.EKKeyDER) > 0:
		if ek, err = x509.ParsePKIXPublicKey(e.EKKeyDER); err != nil {
			return station.Errorf(op, station.KindInvalid, "EK key: %w", err)
		}
	default:
		return station.Errorf(op, station.KindInvalid, "the endorsement has no EK to compare the certificate with")
	}
	return r.VerifyCert(cert, ek)
}

// VerifyCert checks an EK certificate: its critical TPM subjectAltName, its
// chain to a root (for any key usage) and that it certifies ek (the EK read
// from the TPM). Kinds: Unauthorized, Invalid.
func (r *Roots) VerifyCert(cert *x509.Certificate, ek crypto.PublicKey) error {
	const op = "verify EK certificate"
	c := *cert // Verify must not see the SAN we handle; the caller's cert stays as it is
	for _, ext := range cert.Extensions {
		if !ext.Id.Equal(oidSAN) || !ext.Critical {
			continue
		}
		i := slices.IndexFunc(c.UnhandledCriticalExtensions, func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSAN) })
		if i < 0 {
			continue // Go understood the SAN itself
		}
		if _, err := ParseTPMSAN(ext.Value); err != nil {
			return station.Errorf(op, station.KindInvalid, "EK certificate of %s: critical subjectAltName: %w", name(cert.Subject), err)
		}
		c.UnhandledCriticalExtensions = slices.Delete(slices.Clone(c.UnhandledCriticalExtensions), i, i+1)
	}
	_, err := c.Verify(x509.VerifyOptions{
		Roots:         r.roots,
		Intermediates: r.intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			return station.Errorf(op, station.KindUnauthorized,
				"EK certificate of %s issued by %s does not chain to a trusted manufacturer root in %s: add the manufacturer's root CA there, or set the EK-certificate policy to warn",
				name(cert.Subject), name(cert.Issuer), r.dir)
		}
		return station.Errorf(op, station.KindUnauthorized, "EK certificate of %s issued by %s: %w", name(cert.Subject), name(cert.Issuer), err)
	}
	if !sameKey(cert.PublicKey, ek) {
		return station.Errorf(op, station.KindUnauthorized, "EK certificate key does not match the TPM's EK: the certificate belongs to another TPM")
	}
	return nil
}

func name(n pkix.Name) string {
	if s := n.String(); s != "" {
		return fmt.Sprintf("%q", s)
	}
	return "(empty subject)"
}

// sameKey compares two public keys by value: RSA modulus and exponent, or
// curve and point.
func sameKey(a, b crypto.PublicKey) bool {
	ka, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && b != nil && ka.Equal(b)
}
