package devserver

import (
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net/http"
	"strings"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// CA certificates with proof of possession (§6; the resource of DPS's
// management plane, served here on the service API):
//
//	GET    /certificates                                 list
//	PUT    /certificates/{name}                          upload {"properties":{"certificate":PEM,"isVerified":false}}
//	GET    /certificates/{name}
//	DELETE /certificates/{name}                          (If-Match optional)
//	POST   /certificates/{name}/generateVerificationCode a new code (If-Match optional)
//	POST   /certificates/{name}/verify                   {"certificate":PEM}: CN = the code, signed by the CA
//
// Every call needs the ServiceConfig right. Enrollment groups whose
// attestation names the certificate in x509.caReferences accept a device
// chain that leads to it only once it is verified (see matchGroup).

// serveCertificates answers GET /certificates.
func (s *Server) serveCertificates(w http.ResponseWriter, r *http.Request, trackingID string) {
	if err := s.authorize(r, RightServiceConfig); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	certs, err := s.db.listCertificates(r.Context())
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	out := dps.CertificateList{Value: []dps.Certificate{}}
	for _, c := range certs {
		out.Value = append(out.Value, certificateResource(c, false))
	}
	writeJSON(w, http.StatusOK, out)
}

// serveCertificate answers PUT, GET and DELETE /certificates/{name}.
func (s *Server) serveCertificate(w http.ResponseWriter, r *http.Request, trackingID, name string) {
	if err := s.authorize(r, RightServiceConfig); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if err := checkCertificateName(name); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	serveResource(s, w, r, trackingID, resource[dps.Certificate]{
		kind: "CA certificate", idKey: "name", id: name,
		put: func(ctx context.Context) (dps.Certificate, string, []any, error) {
			b, err := readBody(r)
			if err != nil {
				return dps.Certificate{}, "", nil, err
			}
			cert, verified, err := DecodeCertificateUpload(b)
			if err != nil {
				return dps.Certificate{}, "", nil, err
			}
			c, err := s.db.putCertificate(ctx, name, cert, verified, r.Header.Get("If-Match"), dps.MaxCertificates, s.now())
			if err != nil {
				return dps.Certificate{}, "", nil, err
			}
			return certificateResource(c, false), c.ETag, []any{"subject", cert.Subject.String(), "verified", c.Verified}, nil
		},
		get: func(ctx context.Context) (dps.Certificate, string, error) {
			c, err := s.db.certificate(ctx, name)
			if err != nil {
				return dps.Certificate{}, "", err
			}
			return certificateResource(c, false), c.ETag, nil
		},
		del: func(ctx context.Context, ifMatch string) error { return s.db.deleteCertificate(ctx, name, ifMatch) },
	})
}

// generateVerificationCode answers POST
// /certificates/{name}/generateVerificationCode: a fresh code, which
// replaces any earlier one. A verified certificate stays verified.
func (s *Server) generateVerificationCode(w http.ResponseWriter, r *http.Request, trackingID, name string) {
	ctx := r.Context()
	if err := s.authorize(r, RightServiceConfig); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	c, err := s.db.certificate(ctx, name)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	code := newVerificationCode()
	c, err = s.db.updateCertificate(ctx, name, c.ETag, r.Header.Get("If-Match"), c.Verified, code, s.now())
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	s.log.Info("CA certificate verification code generated", "trackingId", trackingID, "name", name)
	w.Header().Set("ETag", c.ETag)
	writeJSON(w, http.StatusOK, certificateResource(c, true))
}

// verifyCertificate answers POST /certificates/{name}/verify: the posted
// certificate must have the current verification code as its subject CN,
// be signed by the CA certificate's key and be valid now. The CA is then
// verified and the code used up.
func (s *Server) verifyCertificate(w http.ResponseWriter, r *http.Request, trackingID, name string) {
	ctx := r.Context()
	if err := s.authorize(r, RightServiceConfig); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	b, err := readBody(r)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	proof, err := DecodeVerificationRequest(b)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	c, err := s.db.certificate(ctx, name)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if err := checkProofOfPossession(c, proof, s.now()); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	c, err = s.db.updateCertificate(ctx, name, c.ETag, r.Header.Get("If-Match"), true, "", s.now())
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	s.log.Info("CA certificate verified", "trackingId", trackingID, "name", name, "subject", c.Cert.Subject.String())
	w.Header().Set("ETag", c.ETag)
	writeJSON(w, http.StatusOK, certificateResource(c, false))
}

// checkProofOfPossession checks a proof-of-possession certificate for the
// CA certificate c. Kinds: Invalid.
func checkProofOfPossession(c *caCertificate, proof *x509.Certificate, now time.Time) error {
	const op = "verify CA certificate"
	switch {
	case c.Code == "":
		return station.Errorf(op, station.KindInvalid,
			"CA certificate %q has no verification code: generate one (POST /certificates/%s/generateVerificationCode), then post a certificate with that code as its CN", c.Name, c.Name)
	case !strings.EqualFold(strings.TrimSpace(proof.Subject.CommonName), c.Code):
		return station.Errorf(op, station.KindInvalid,
			"the verification certificate's subject CN is %.80q, not the verification code of CA certificate %q: issue a certificate with CN=%s signed by the CA's private key (generating a new code replaces the old one)",
			proof.Subject.CommonName, c.Name, c.Code)
	}
	if err := proof.CheckSignatureFrom(c.Cert); err != nil {
		return station.Errorf(op, station.KindInvalid,
			"the verification certificate (CN=%s) is not signed by the key of CA certificate %q (%v): sign it with that CA's private key", c.Code, c.Name, err)
	}
	if now.Before(proof.NotBefore) || now.After(proof.NotAfter) {
		return station.Errorf(op, station.KindInvalid,
			"the verification certificate is valid from %s to %s only: issue a current one",
			proof.NotBefore.UTC().Format(time.RFC3339), proof.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// DecodeCertificateUpload reads the body of PUT /certificates/{name}:
// {"properties":{"certificate":..., "isVerified":bool}} as DPS's management
// plane sends it (a bare {"certificate":..., "isVerified":bool} is
// accepted too). The certificate is PEM, base64 DER or base64 of PEM, and
// must be a CA certificate (basicConstraints CA:TRUE), since it is to sign
// device certificates. Kinds: Invalid.
func DecodeCertificateUpload(body []byte) (cert *x509.Certificate, verified bool, err error) {
	const op = "read CA certificate upload"
	var v struct {
		Properties *dps.CertificateUpload `json:"properties"`
		dps.CertificateUpload
	}
	if err := dps.Decode(body, &v); err != nil {
		return nil, false, err
	}
	u := v.CertificateUpload
	if v.Properties != nil {
		u = *v.Properties
	}
	if strings.TrimSpace(u.Certificate) == "" {
		return nil, false, station.Errorf(op, station.KindInvalid, `the body has no certificate: send {"properties":{"certificate":"<PEM>"}}`)
	}
	cert, err = parseEnrolledCertificate(u.Certificate)
	if err != nil {
		return nil, false, station.E(op, station.KindInvalid, err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, false, station.Errorf(op, station.KindInvalid,
			"the certificate %.100q is not a CA certificate (basicConstraints CA:TRUE): upload the root or intermediate CA that signs the device certificates", cert.Subject.String())
	}
	return cert, u.IsVerified, nil
}

// DecodeVerificationRequest reads the body of POST
// /certificates/{name}/verify: {"certificate": PEM or base64 DER}.
// Kinds: Invalid.
func DecodeVerificationRequest(body []byte) (*x509.Certificate, error) {
	const op = "read verification certificate"
	var v dps.VerificationCodeRequest
	if err := dps.Decode(body, &v); err != nil {
		return nil, err
	}
	if strings.TrimSpace(v.Certificate) == "" {
		return nil, station.Errorf(op, station.KindInvalid, `the body has no certificate: send {"certificate":"<PEM of the certificate whose CN is the verification code>"}`)
	}
	c, err := parseEnrolledCertificate(v.Certificate)
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return c, nil
}

// certificateResource returns a CA certificate as the service API shows
// it; withCode adds the verification code (generateVerificationCode only).
func certificateResource(c *caCertificate, withCode bool) dps.Certificate {
	sum := sha1.Sum(c.Cert.Raw)
	out := dps.Certificate{
		Properties: dps.CertificateProperties{
			Subject:     c.Cert.Subject.String(),
			Expiry:      c.Cert.NotAfter.UTC().Format(http.TimeFormat),
			Thumbprint:  strings.ToUpper(hex.EncodeToString(sum[:])),
			IsVerified:  c.Verified,
			Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Cert.Raw})),
			Created:     c.Created.UTC().Format(http.TimeFormat),
			Updated:     c.Updated.UTC().Format(http.TimeFormat),
		},
		ID:   "/certificates/" + c.Name,
		Name: c.Name,
		Type: dps.CertificateType,
		ETag: c.ETag,
	}
	if withCode {
		out.Properties.VerificationCode = c.Code
	}
	return out
}

// newVerificationCode returns a fresh verification code: 48 upper-case hex
// digits (it must fit a CN, at most 64 characters).
func newVerificationCode() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail
	}
	return strings.ToUpper(hex.EncodeToString(b))
}

// checkCertificateName checks a CA certificate name: 1 to 128 letters,
// digits and - . _ (DPS's resource names are narrower still).
// Kinds: Invalid.
func checkCertificateName(name string) error {
	ok := name != "" && len(name) <= 128
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._", c) >= 0
	}
	if !ok {
		return station.Errorf("check certificate name", station.KindInvalid,
			"CA certificate name %.130q: use 1 to 128 letters, digits and - . _", name)
	}
	return nil
}
