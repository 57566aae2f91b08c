package devserver

import (
	"context"
	"net/http"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Limits of enrollment groups per attestation type, as DPS's (§10).
const (
	MaxSymmetricKeyGroups = 100
	MaxX509Groups         = 100
)

// groupLimit is the most groups of an attestation type the service holds
// (Config.Quotas); zero: no limit.
func (s *Server) groupLimit(attestationType string) int {
	return s.cfg.Quotas.groups(attestationType != dps.AttestationX509)
}

// serveGroup answers PUT, GET and DELETE /enrollmentGroups/{id} (§7.1).
func (s *Server) serveGroup(w http.ResponseWriter, r *http.Request, trackingID, groupID string) {
	if err := s.authorize(r, readOrWrite(r, RightEnrollmentRead, RightEnrollmentWrite)); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if err := checkRegistrationID(groupID); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	serveResource(s, w, r, trackingID, resource[*dps.EnrollmentGroup]{
		kind: "enrollment group", idKey: "enrollmentGroupId", id: groupID,
		put: func(ctx context.Context) (*dps.EnrollmentGroup, string, []any, error) {
			b, err := readBody(r)
			if err != nil {
				return nil, "", nil, err
			}
			g, err := DecodeEnrollmentGroup(b, groupID)
			if err != nil {
				return nil, "", nil, err
			}
			ifMatch := r.Header.Get("If-Match")
			if ifMatch == "" {
				ifMatch = g.ETag // Node sends If-Match itself; the body's etag counts the same
			}
			stored, err := s.putGroup(ctx, g, ifMatch)
			if err != nil {
				return nil, "", nil, err
			}
			return stored, stored.ETag, nil, nil
		},
		get: func(ctx context.Context) (*dps.EnrollmentGroup, string, error) {
			g, err := s.db.group(ctx, groupID)
			if err != nil {
				return nil, "", err
			}
			return g, g.ETag, nil
		},
		del: func(ctx context.Context, ifMatch string) error { return s.db.deleteGroup(ctx, groupID, ifMatch) },
	})
}

// putGroup stores a decoded group, generating the symmetric keys a caller
// left out, as DPS does. Kinds: Conflict (etag, exists, quota),
// Unavailable, Internal.
func (s *Server) putGroup(ctx context.Context, g *dps.EnrollmentGroup, ifMatch string) (*dps.EnrollmentGroup, error) {
	fillSymmetricKeys(&g.Attestation)
	return s.db.putGroup(ctx, *g, ifMatch, s.groupLimit(g.Attestation.Type), s.now())
}

// groupAttestationMechanism answers POST
// /enrollmentGroups/{id}/attestationmechanism: the group's attestation,
// keys included.
func (s *Server) groupAttestationMechanism(w http.ResponseWriter, r *http.Request, trackingID, groupID string) {
	if err := s.authorize(r, RightEnrollmentRead); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	g, err := s.db.group(r.Context(), groupID)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	writeJSON(w, http.StatusOK, g.Attestation)
}

// DecodeEnrollmentGroup reads the body of PUT /enrollmentGroups/{id}: an
// EnrollmentGroup whose enrollmentGroupId, when set, equals the URL's
// (ignoring case), with symmetricKey attestation (keys, when given, base64
// of 16 to 64 bytes) or x509 attestation with signingCertificates or
// caReferences, stored as given. The read-only times are cleared.
// Kinds: Invalid.
func DecodeEnrollmentGroup(body []byte, groupID string) (*dps.EnrollmentGroup, error) {
	const op = "read enrollment group"
	var g dps.EnrollmentGroup
	if err := dps.Decode(body, &g); err != nil {
		return nil, err
	}
	if g.EnrollmentGroupID == "" {
		g.EnrollmentGroupID = groupID
	}
	if !strings.EqualFold(g.EnrollmentGroupID, groupID) {
		return nil, station.Errorf(op, station.KindInvalid,
			"the body's enrollmentGroupId %.130q is not the URL's %.130q: send the same ID in both", g.EnrollmentGroupID, groupID)
	}
	g.CreatedDateTimeUTC, g.LastUpdatedDateTimeUTC = dps.Time{}, dps.Time{}
	status, err := provisioningStatus(g.ProvisioningStatus)
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	g.ProvisioningStatus = status
	a := &g.Attestation
	switch strings.ToLower(a.Type) {
	case strings.ToLower(dps.AttestationSymmetricKey):
		a.Type = dps.AttestationSymmetricKey
		a.TPM, a.X509 = nil, nil
		if err := checkSymmetricKeys(op, a); err != nil {
			return nil, err
		}
	case strings.ToLower(dps.AttestationX509):
		a.Type = dps.AttestationX509
		a.TPM, a.SymmetricKey = nil, nil
		x := a.X509
		switch {
		case x == nil || x.SigningCertificates == nil && x.CAReferences == nil:
			return nil, station.Errorf(op, station.KindInvalid, "an X.509 enrollment group needs attestation.x509.signingCertificates or caReferences")
		case x.ClientCertificates != nil:
			return nil, station.Errorf(op, station.KindInvalid, "an enrollment group has no clientCertificates: use signingCertificates or caReferences")
		case x.SigningCertificates != nil && x.CAReferences != nil:
			return nil, station.Errorf(op, station.KindInvalid, "attestation.x509 holds both signingCertificates and caReferences: send one")
		case x.SigningCertificates != nil && (x.SigningCertificates.Primary == nil || x.SigningCertificates.Primary.Certificate == ""):
			return nil, station.Errorf(op, station.KindInvalid, "attestation.x509.signingCertificates needs a primary certificate")
		case x.CAReferences != nil && x.CAReferences.Primary == "":
			return nil, station.Errorf(op, station.KindInvalid, "attestation.x509.caReferences needs a primary CA name")
		}
	case strings.ToLower(dps.AttestationTPM):
		return nil, station.Errorf(op, station.KindInvalid, "DPS has no TPM enrollment groups: enroll TPM devices individually")
	case "":
		return nil, station.Errorf(op, station.KindInvalid, "the enrollment group has no attestation.type: use symmetricKey or x509")
	default:
		return nil, station.Errorf(op, station.KindInvalid, "attestation.type %.20q: use symmetricKey or x509", a.Type)
	}
	if len(g.IoTHubs) == 0 && g.IoTHubHostName == "" && strings.EqualFold(g.AllocationPolicy, dps.AllocationStatic) {
		return nil, station.Errorf(op, station.KindInvalid, "static allocation needs one hub in iotHubs")
	}
	return &g, nil
}

// provisioningStatus returns the canonical spelling of a provisioningStatus
// (enabled when empty).
func provisioningStatus(v string) (string, error) {
	switch {
	case v == "", strings.EqualFold(v, dps.ProvisioningEnabled):
		return dps.ProvisioningEnabled, nil
	case strings.EqualFold(v, dps.ProvisioningDisabled):
		return dps.ProvisioningDisabled, nil
	}
	return "", station.Errorf("read provisioningStatus", station.KindInvalid, "provisioningStatus %.20q: use enabled or disabled", v)
}
