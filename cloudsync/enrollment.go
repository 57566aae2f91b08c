package cloudsync

import (
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"slices"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Group is the enrollment group of a batch whose units use a group method
// (X.509 under a signing certificate, or symmetric keys derived from a
// group key): it is pushed once, with the batch's template.
type Group struct {
	ID string
	// Attestation is the group's: X509 with signing certificates or CA
	// references, or SymmetricKey with the group keys (a secret: it is
	// sent to the target and never stored or logged by cloudsync).
	Attestation dps.AttestationMechanism
}

// UnitGroup returns the enrollment group of groups that group-method unit
// u registers through: the one its record names (Unit.EnrollmentGroup),
// else the first whose attestation fits the unit's method (X.509 or
// symmetric key). Kinds: Invalid (no such group: the message names the
// one to give).
func UnitGroup(u *station.Unit, groups []*Group) (*Group, error) {
	op := "find the enrollment group of unit " + u.Serial
	want := dps.AttestationX509
	if u.Method == station.MethodSymKey {
		want = dps.AttestationSymmetricKey
	}
	for _, g := range groups {
		if g == nil {
			continue
		}
		if u.EnrollmentGroup != "" {
			if strings.EqualFold(g.ID, u.EnrollmentGroup) {
				return g, nil
			}
			continue
		}
		if strings.EqualFold(g.Attestation.Type, want) {
			return g, nil
		}
	}
	if u.EnrollmentGroup != "" {
		return nil, station.Errorf(op, station.KindInvalid,
			"unit %s registers through enrollment group %s: give that enrollment group (its ID and its signing certificate or key)", u.Serial, u.EnrollmentGroup)
	}
	return nil, station.Errorf(op, station.KindInvalid,
		"unit %s (%s method) registers through an enrollment group: give the enrollment group its units register through", u.Serial, u.Method)
}

// groupKey is the outbox key of a batch's enrollment group.
func groupKey(id string) string { return "group:" + id }

// usesGroup reports whether unit u enrolls through its batch's group
// rather than on its own.
func usesGroup(u *station.Unit) bool {
	return u.Method == station.MethodX509 || u.Method == station.MethodSymKey
}

// Enrollment returns the individual enrollment of unit u under template t.
// Units of the TPM method are enrolled by their EK. Kinds: Invalid (the
// unit holds no identity this method can enroll).
func Enrollment(u *station.Unit, t station.EnrollmentTemplate) (*dps.IndividualEnrollment, error) {
	op := "build the enrollment of unit " + u.Serial
	if u.RegistrationID == "" {
		return nil, station.Errorf(op, station.KindInvalid, "unit %s has no registration ID: it was not recorded by a provisioning run", u.Serial)
	}
	var e *dps.IndividualEnrollment
	switch u.Method {
	case station.MethodTPM, "":
		if len(u.EKPublic) == 0 {
			return nil, station.Errorf(op, station.KindInvalid, "unit %s has no EK recorded: provision it again", u.Serial)
		}
		e = dps.NewTPMEnrollment(u.RegistrationID, u.EKPublic)
	case station.MethodX509:
		// An individual X.509 enrollment names the unit's own leaf: the
		// certificate the station CA issued, as its record keeps it.
		if len(u.Certificate) == 0 {
			return nil, station.Errorf(op, station.KindInvalid,
				"unit %s (x509 method) has no certificate of its own in its record (imported, or recorded before certificates were kept): enroll it through its enrollment group", u.Serial)
		}
		leaf, err := x509.ParseCertificate(u.Certificate)
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "unit %s: its recorded certificate does not parse (%v): provision it again", u.Serial, err)
		}
		if !strings.EqualFold(leaf.Subject.CommonName, u.RegistrationID) {
			return nil, station.Errorf(op, station.KindInvalid,
				"unit %s: its certificate's subject CN %.130q is not its registration ID %q, so DPS would refuse its registration: provision it again", u.Serial, leaf.Subject.CommonName, u.RegistrationID)
		}
		e = &dps.IndividualEnrollment{RegistrationID: u.RegistrationID, Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
			X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: CertificatePEM(u.Certificate)}}}}}
	default:
		// Symmetric-key units get theirs from SymKeyEnrollment: the
		// device key is derived from the group's.
		return nil, station.Errorf(op, station.KindInvalid,
			"unit %s (%s method) has no key of its own in its record: enroll it through its enrollment group (with its key, for individual enrollments)", u.Serial, u.Method)
	}
	if err := applyTemplate(t, &e.AllocationPolicy, &e.IoTHubs, &e.InitialTwin, &e.Capabilities, &e.ReprovisionPolicy, &e.ProvisioningStatus); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return e, nil
}

// CertificatePEM returns a certificate's DER as PEM, as DPS takes it.
func CertificatePEM(der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// SymKeyEnrollment returns the individual enrollment of symmetric-key unit
// u under template t, with the device key derived from the group's primary
// key (base64) as the device derives it: HMAC-SHA256(group key,
// registration ID). The enrollment holds a secret: send it, never store or
// log it. Kinds: Invalid.
func SymKeyEnrollment(u *station.Unit, t station.EnrollmentTemplate, groupKey string) (*dps.IndividualEnrollment, error) {
	op := "build the enrollment of unit " + u.Serial
	key, err := dps.DecodeKey(groupKey)
	if err != nil || u.RegistrationID == "" {
		return nil, station.Errorf(op, station.KindInvalid, "unit %s: a symmetric-key enrollment needs the group's key and the unit's registration ID", u.Serial)
	}
	dk := dps.DeriveDeviceKey(key, u.RegistrationID)
	if u.SymKeySHA256 != "" && !strings.EqualFold(station.KeyFingerprint(dk), u.SymKeySHA256) {
		// The device holds a key derived from another group key: this
		// enrollment would refuse it.
		return nil, station.Errorf(op, station.KindInvalid,
			"unit %s holds a device key (sha256 %.12s…) not derived from this group key: give the key of group %s, the one the unit was provisioned with", u.Serial, u.SymKeySHA256, orGroup(u.EnrollmentGroup))
	}
	e := &dps.IndividualEnrollment{RegistrationID: u.RegistrationID, Attestation: dps.AttestationMechanism{
		Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(dk)}}}
	if err := applyTemplate(t, &e.AllocationPolicy, &e.IoTHubs, &e.InitialTwin, &e.Capabilities, &e.ReprovisionPolicy, &e.ProvisioningStatus); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return e, nil
}

func orGroup(id string) string {
	if id == "" {
		return "it was provisioned with"
	}
	return id
}

// EnrollmentGroup returns the group enrollment of g under template t.
// Kinds: Invalid.
func EnrollmentGroup(g *Group, t station.EnrollmentTemplate) (*dps.EnrollmentGroup, error) {
	op := "build enrollment group " + g.ID
	if g.ID == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the enrollment group has no ID: give one")
	}
	switch g.Attestation.Type {
	case dps.AttestationX509:
		if g.Attestation.X509 == nil {
			return nil, station.Errorf(op, station.KindInvalid, "an X.509 group needs a signing certificate or a CA reference")
		}
	case dps.AttestationSymmetricKey:
	default:
		return nil, station.Errorf(op, station.KindInvalid, "attestation %q: a group uses x509 or symmetricKey", g.Attestation.Type)
	}
	e := &dps.EnrollmentGroup{EnrollmentGroupID: g.ID, Attestation: g.Attestation}
	if err := applyTemplate(t, &e.AllocationPolicy, &e.IoTHubs, &e.InitialTwin, &e.Capabilities, &e.ReprovisionPolicy, &e.ProvisioningStatus); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return e, nil
}

func applyTemplate(t station.EnrollmentTemplate, policy *string, hubs *[]string, twin **dps.InitialTwin,
	caps **dps.DeviceCapabilities, rp **dps.ReprovisionPolicy, status *string) error {
	if err := t.Validate(); err != nil {
		return err
	}
	*policy = t.AllocationPolicy
	*hubs = slices.Clone(t.IoTHubs)
	if len(t.InitialTwin) > 0 {
		var v struct {
			Tags       json.RawMessage `json:"tags"`
			Properties struct {
				Desired json.RawMessage `json:"desired"`
			} `json:"properties"`
		}
		if err := json.Unmarshal(t.InitialTwin, &v); err != nil {
			return err
		}
		it := &dps.InitialTwin{Tags: v.Tags}
		if len(v.Properties.Desired) > 0 {
			it.Properties = &dps.InitialTwinProperties{Desired: v.Properties.Desired}
		}
		*twin = it
	}
	if t.Capabilities.IoTEdge {
		*caps = &dps.DeviceCapabilities{IoTEdge: true}
	}
	if t.ReprovisionPolicy != nil {
		*rp = &dps.ReprovisionPolicy{UpdateHubAssignment: t.ReprovisionPolicy.UpdateHubAssignment, MigrateDeviceData: t.ReprovisionPolicy.MigrateDeviceData}
	}
	*status = string(t.ProvisioningStatus)
	if *status == "" {
		*status = dps.ProvisioningEnabled
	}
	return nil
}

// match is how an enrollment read back from the target compares with the
// one the batch wants.
type match int

const (
	matchSame    match = iota // same identity and settings: nothing to do
	matchStale                // same identity, other settings: update it
	matchForeign              // another identity holds the registration ID
)

// compare compares the enrollment got from the target with want. The
// provisioning status is compared only when withStatus is set: a pushed
// enrollment may have been enabled since.
func compare(got, want *dps.IndividualEnrollment, withStatus bool) match {
	if !sameAttestation(got.Attestation, want.Attestation) {
		return matchForeign
	}
	same := strings.EqualFold(got.AllocationPolicy, want.AllocationPolicy) &&
		slices.Equal(got.IoTHubs, want.IoTHubs) &&
		sameCaps(got.Capabilities, want.Capabilities) &&
		sameReprovision(got.ReprovisionPolicy, want.ReprovisionPolicy) &&
		sameTwin(got.InitialTwin, want.InitialTwin)
	if withStatus {
		same = same && strings.EqualFold(got.ProvisioningStatus, want.ProvisioningStatus)
	}
	if same {
		return matchSame
	}
	return matchStale
}

func sameAttestation(a, b dps.AttestationMechanism) bool {
	if !strings.EqualFold(a.Type, b.Type) {
		return false
	}
	switch {
	case a.TPM != nil && b.TPM != nil:
		return sameBase64(a.TPM.EndorsementKey, b.TPM.EndorsementKey)
	case a.X509 != nil && b.X509 != nil:
		if a.X509.ClientCertificates != nil || b.X509.ClientCertificates != nil {
			return sameClientCert(a.X509.ClientCertificates, b.X509.ClientCertificates)
		}
		ca, cb := primaryCert(a.X509), primaryCert(b.X509)
		return ca != "" && ca == cb
	case a.SymmetricKey != nil && b.SymmetricKey != nil:
		return sameBase64(a.SymmetricKey.PrimaryKey, b.SymmetricKey.PrimaryKey)
	}
	return false
}

// sameClientCert reports whether two individual X.509 enrollments name the
// same primary certificate: the same DER, or, when one side holds only the
// info a service answers with (Azure's DPS does not send the certificate
// back), the same SHA-256 thumbprint.
func sameClientCert(a, b *dps.X509Certificates) bool {
	if a == nil || b == nil || a.Primary == nil || b.Primary == nil {
		return false
	}
	tp := func(c *dps.X509CertificateWithInfo) (der []byte, sha256Hex string) {
		if c.Certificate != "" {
			if der = certDER(c.Certificate); der != nil {
				_, sha256Hex = station.Thumbprints(der)
				return der, sha256Hex
			}
		}
		if c.Info != nil {
			sha256Hex = strings.ToUpper(strings.NewReplacer(":", "", " ", "", "-", "").Replace(c.Info.SHA256Thumbprint))
		}
		return nil, sha256Hex
	}
	da, ta := tp(a.Primary)
	db, tb := tp(b.Primary)
	if da != nil && db != nil {
		return bytes.Equal(da, db)
	}
	return ta != "" && ta == tb
}

// certDER reads a certificate as enrollments hold it (PEM or base64 DER);
// nil when it is neither.
func certDER(s string) []byte {
	s = strings.TrimSpace(s)
	if blk, _ := pem.Decode([]byte(s)); blk != nil {
		return blk.Bytes
	}
	b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		return nil
	}
	return b
}

func primaryCert(x *dps.X509Attestation) string {
	for _, c := range []*dps.X509Certificates{x.ClientCertificates, x.SigningCertificates} {
		if c != nil && c.Primary != nil {
			return strings.TrimSpace(c.Primary.Certificate)
		}
	}
	if x.CAReferences != nil {
		return x.CAReferences.Primary
	}
	return ""
}

func sameBase64(a, b string) bool {
	da, ea := base64.StdEncoding.DecodeString(a)
	db, eb := base64.StdEncoding.DecodeString(b)
	return ea == nil && eb == nil && bytes.Equal(da, db)
}

func sameCaps(a, b *dps.DeviceCapabilities) bool {
	return (a != nil && a.IoTEdge) == (b != nil && b.IoTEdge)
}

func sameReprovision(a, b *dps.ReprovisionPolicy) bool {
	// DPS answers the default (both true) when none was given.
	def := dps.ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
	if a == nil {
		a = &def
	}
	if b == nil {
		b = &def
	}
	return *a == *b
}

func sameTwin(a, b *dps.InitialTwin) bool {
	norm := func(t *dps.InitialTwin) string {
		if t == nil {
			return ""
		}
		var tags, desired any
		_ = json.Unmarshal(t.Tags, &tags)
		if t.Properties != nil {
			_ = json.Unmarshal(t.Properties.Desired, &desired)
		}
		if tags == nil && desired == nil {
			return ""
		}
		b, _ := json.Marshal([]any{tags, desired})
		return string(b)
	}
	return norm(a) == norm(b)
}
