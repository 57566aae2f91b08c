package devserver

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"net/http"
	"strings"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// x509Attestation is X.509 attestation (§6): the device presents its
// certificate (and intermediates) in the TLS handshake and sends no
// Authorization header. The registration ID must be the leaf's subject CN.
// The certificate is matched when the request is read (see attestX509):
// first against the individual enrollment of that registration ID (the
// enrolled certificate or its thumbprints), then by walking the presented
// chain from the leaf up to the signing certificate of an X.509 enrollment
// group, or to a verified CA certificate a group names in caReferences,
// the most specific group winning. A disabled enrollment or group
// is answered with the "disabled" status at assignment, as for TPM and
// symmetric keys. The device has no SAS key in its hub: the hub accepts
// the thumbprints of the certificate it registered with.
type x509Attestation struct{}

// x509Proof is what the TLS client certificate of a request proved.
type x509Proof struct {
	group       *dps.EnrollmentGroup // nil for an individual enrollment
	thumbprints []string             // of the leaf: SHA-1, SHA-256 (upper-case hex)
}

// challenge never answers: an X.509 device without a certificate is
// refused with 401.
func (x509Attestation) challenge(context.Context, http.ResponseWriter, *deviceRequest) (bool, error) {
	return false, nil
}

func (x509Attestation) authenticate(_ context.Context, d *deviceRequest) (*identity, error) {
	if d.x509 == nil {
		return nil, station.Errorf("authenticate X.509 device", station.KindUnauthorized,
			"enrollment %q uses X.509 attestation but the request carries no client certificate (a TLS client may drop one whose issuer the server does not list): present the device certificate in the TLS handshake",
			d.enrollment.RegistrationID)
	}
	return &identity{RegistrationID: d.enrollment.RegistrationID}, nil
}

func (x509Attestation) result(_ context.Context, e *dps.IndividualEnrollment) (*identity, *dps.DeviceRegistrationState, error) {
	return &identity{RegistrationID: e.RegistrationID},
		&dps.DeviceRegistrationState{X509: &dps.X509RegistrationResult{}}, nil
}

// attestX509 identifies the device of a request from its client
// certificate chain and sets d.enrollment (for a group: the group seen as
// an enrollment of this registration ID, see groupEnrollment) and d.x509.
// Kinds: Unauthorized (a CN that is not the registration ID, an expired
// certificate, no matching enrollment), Unavailable, Internal.
func (s *Server) attestX509(ctx context.Context, d *deviceRequest, chain []*x509.Certificate) error {
	const op = "attest X.509 device"
	leaf := chain[0]
	if !strings.EqualFold(leaf.Subject.CommonName, d.registrationID) {
		return station.Errorf(op, station.KindUnauthorized,
			"the client certificate's subject CN %.130q is not the registration ID %q: register with the certificate's CN as the registration ID",
			leaf.Subject.CommonName, d.registrationID)
	}
	if d.now.Before(leaf.NotBefore) || d.now.After(leaf.NotAfter) {
		return station.Errorf(op, station.KindUnauthorized,
			"the client certificate of %q is valid from %s to %s only: issue a current certificate",
			d.registrationID, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	sha1Hex, sha256Hex := thumbprints(leaf)
	proof := &x509Proof{thumbprints: []string{sha1Hex, sha256Hex}}

	// An individual enrollment for the leaf first (§6).
	e, err := s.db.enrollment(ctx, d.registrationID)
	switch {
	case err == nil:
		x := e.Attestation.X509
		if strings.EqualFold(e.Attestation.Type, dps.AttestationX509) && x != nil && matchClientCertificate(x.ClientCertificates, leaf, sha1Hex, sha256Hex) {
			d.enrollment, d.x509 = e, proof
			return nil
		}
	case station.KindOf(err) != station.KindNotFound:
		return err
	}

	// Then the groups, walking the presented chain up from the leaf.
	g, err := s.matchGroup(ctx, chain, d.now)
	if err != nil {
		return err
	}
	if g == nil {
		return station.Errorf(op, station.KindUnauthorized,
			"the client certificate of %q (SHA-256 %s) matches no X.509 individual enrollment and its chain leads to no enrollment group's signing certificate: enroll the device or its CA, and send the intermediates with the leaf",
			d.registrationID, sha256Hex)
	}
	proof.group = g
	d.enrollment, d.x509, d.group = groupEnrollment(g, d.registrationID), proof, g
	return nil
}

// matchClientCertificate reports whether the leaf is one of an individual
// enrollment's client certificates: the same DER, or the same SHA-1 or
// SHA-256 thumbprint (§6).
func matchClientCertificate(certs *dps.X509Certificates, leaf *x509.Certificate, sha1Hex, sha256Hex string) bool {
	if certs == nil {
		return false
	}
	for _, c := range []*dps.X509CertificateWithInfo{certs.Primary, certs.Secondary} {
		if c == nil {
			continue
		}
		if c.Certificate != "" {
			if enrolled, err := parseEnrolledCertificate(c.Certificate); err == nil && bytes.Equal(enrolled.Raw, leaf.Raw) {
				return true
			}
		}
		if c.Info != nil {
			if t := c.Info.SHA1Thumbprint; t != "" && strings.EqualFold(stripThumbprint(t), sha1Hex) {
				return true
			}
			if t := c.Info.SHA256Thumbprint; t != "" && strings.EqualFold(stripThumbprint(t), sha256Hex) {
				return true
			}
		}
	}
	return false
}

// stripThumbprint removes the separators a thumbprint may be written with.
func stripThumbprint(t string) string {
	return strings.NewReplacer(":", "", " ", "", "-", "").Replace(t)
}

// parseEnrolledCertificate reads a certificate as enrollments hold it: PEM,
// or base64 DER (or base64 of PEM). Kinds: Invalid.
func parseEnrolledCertificate(s string) (*x509.Certificate, error) {
	const op = "read enrolled certificate"
	b := []byte(strings.TrimSpace(s))
	if !bytes.HasPrefix(b, []byte("-----BEGIN")) {
		dec, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(string(b)), ""))
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "the certificate is neither PEM nor base64 DER: %w", err)
		}
		b = dec
	}
	if bytes.HasPrefix(bytes.TrimSpace(b), []byte("-----BEGIN")) {
		blk, _ := pem.Decode(bytes.TrimSpace(b))
		if blk == nil {
			return nil, station.Errorf(op, station.KindInvalid, "the certificate's PEM does not decode")
		}
		b = blk.Bytes
	}
	c, err := x509.ParseCertificate(b)
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return c, nil
}

// groupCA is one signing certificate of an X.509 enrollment group: one of
// its signingCertificates, or a CA certificate its caReferences name.
type groupCA struct {
	group *dps.EnrollmentGroup
	cert  *x509.Certificate
	// caName is the name of the referenced CA certificate; "" for a
	// signing certificate held by the group.
	caName string
	// verified is false for a referenced CA certificate whose proof of
	// possession is still missing: it matches nothing.
	verified bool
}

// matchGroup walks the presented chain from the leaf up and returns the
// first X.509 enrollment group (by ID among those at the same level) whose
// signing certificate, or verified CA certificate named in caReferences,
// signed the certificate reached, once the whole path from the leaf
// verifies (signatures, validity, CA constraints); nil when none does. A
// chain that leads only to a referenced CA certificate that is not
// verified is refused with Unauthorized, saying so.
func (s *Server) matchGroup(ctx context.Context, chain []*x509.Certificate, now time.Time) (*dps.EnrollmentGroup, error) {
	var cas []groupCA
	var certs map[string]*caCertificate // by lower-cased name, read at the first caReferences
	for after := ""; ; {
		page, err := s.db.listGroups(ctx, after, 100)
		if err != nil {
			return nil, err
		}
		for i := range page {
			g := &page[i]
			x := g.Attestation.X509
			if !strings.EqualFold(g.Attestation.Type, dps.AttestationX509) || x == nil {
				continue
			}
			if x.SigningCertificates != nil {
				for _, c := range []*dps.X509CertificateWithInfo{x.SigningCertificates.Primary, x.SigningCertificates.Secondary} {
					if c == nil || c.Certificate == "" {
						continue
					}
					if cert, err := parseEnrolledCertificate(c.Certificate); err == nil {
						cas = append(cas, groupCA{group: g, cert: cert, verified: true})
					}
				}
			}
			if x.CAReferences != nil {
				if certs == nil {
					list, err := s.db.listCertificates(ctx)
					if err != nil {
						return nil, err
					}
					certs = map[string]*caCertificate{}
					for _, c := range list {
						certs[regKey(c.Name)] = c
					}
				}
				for _, name := range []string{x.CAReferences.Primary, x.CAReferences.Secondary} {
					if c := certs[regKey(name)]; name != "" && c != nil {
						cas = append(cas, groupCA{group: g, cert: c.Cert, caName: c.Name, verified: c.Verified})
					}
				}
			}
		}
		if len(page) < 100 {
			break
		}
		after = regKey(page[len(page)-1].EnrollmentGroupID)
	}
	if ca := walkChain(chain, cas, now, true); ca != nil {
		return ca.group, nil
	}
	if ca := walkChain(chain, cas, now, false); ca != nil {
		return nil, station.Errorf("attest X.509 device", station.KindUnauthorized,
			"the certificate chain of %q leads to CA certificate %q, which enrollment group %q references but which is not verified: generate its verification code and post a certificate with that CN signed by the CA (POST /certificates/%s/generateVerificationCode, then /verify)",
			chain[0].Subject.CommonName, ca.caName, ca.group.EnrollmentGroupID, ca.caName)
	}
	return nil, nil
}

// walkChain walks the presented chain from the leaf up and returns the
// first of cas whose verified flag is verified and whose certificate
// signed the certificate reached, with the whole path from the leaf
// verifying at now; nil when none does.
func walkChain(chain []*x509.Certificate, cas []groupCA, now time.Time, verified bool) *groupCA {
	for i, cur := range chain {
		if i > 0 && chain[i-1].CheckSignatureFrom(cur) != nil {
			break // the rest is not the leaf's chain
		}
		for j := range cas {
			ca := &cas[j]
			if ca.verified != verified || cur.CheckSignatureFrom(ca.cert) != nil {
				continue
			}
			roots := x509.NewCertPool()
			roots.AddCert(ca.cert)
			inter := x509.NewCertPool()
			for _, c := range chain[1 : i+1] {
				inter.AddCert(c)
			}
			_, err := chain[0].Verify(x509.VerifyOptions{
				Roots: roots, Intermediates: inter, CurrentTime: now,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
			})
			if err == nil {
				return ca
			}
		}
	}
	return nil
}

// groupEnrollment returns an enrollment group as the enrollment of one of
// its devices: the group's attestation, allocation, twin, status and
// reprovisioning, with the device ID left to default to the registration
// ID (the CN for X.509, §6). The symmetric keys of a symmetric-key group
// become the device's derived keys (§5.2).
func groupEnrollment(g *dps.EnrollmentGroup, registrationID string) *dps.IndividualEnrollment {
	att := g.Attestation
	if sk := att.SymmetricKey; sk != nil && strings.EqualFold(att.Type, dps.AttestationSymmetricKey) {
		att.SymmetricKey = deriveGroupKeys(sk, registrationID)
	}
	return &dps.IndividualEnrollment{
		RegistrationID:             registrationID,
		Attestation:                att,
		Capabilities:               g.Capabilities,
		IoTHubHostName:             g.IoTHubHostName,
		InitialTwin:                g.InitialTwin,
		ProvisioningStatus:         g.ProvisioningStatus,
		ReprovisionPolicy:          g.ReprovisionPolicy,
		AllocationPolicy:           g.AllocationPolicy,
		IoTHubs:                    g.IoTHubs,
		CustomAllocationDefinition: g.CustomAllocationDefinition,
	}
}

// operationEnrollment returns the enrollment an operation is assigned by:
// the device's individual enrollment, or its enrollment group's (with the
// group's ID). Kinds: NotFound (the enrollment or group is gone).
func (s *Server) operationEnrollment(ctx context.Context, o *operation) (*dps.IndividualEnrollment, string, error) {
	if o.Group == "" {
		e, err := s.db.enrollment(ctx, o.RegistrationID)
		return e, "", err
	}
	g, err := s.db.group(ctx, o.Group)
	if err != nil {
		return nil, "", err
	}
	return groupEnrollment(g, o.RegistrationID), g.EnrollmentGroupID, nil
}
