package cloudsync

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
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
	default:
		// X.509 units enroll through their batch's group: an individual
		// entry needs the unit's own certificate, which its record does
		// not carry. Symmetric-key units get theirs from SymKeyEnrollment.
		return nil, station.Errorf(op, station.KindInvalid,
			"unit %s (%s method) has no certificate of its own in its record: enroll it through the batch's enrollment group", u.Serial, u.Method)
	}
	if err := applyTemplate(t, &e.AllocationPolicy, &e.IoTHubs, &e.InitialTwin, &e.Capabilities, &e.ReprovisionPolicy, &e.ProvisioningStatus); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return e, nil
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
	e := &dps.IndividualEnrollment{RegistrationID: u.RegistrationID, Attestation: dps.AttestationMechanism{
		Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(dps.DeriveDeviceKey(key, u.RegistrationID))}}}
	if err := applyTemplate(t, &e.AllocationPolicy, &e.IoTHubs, &e.InitialTwin, &e.Capabilities, &e.ReprovisionPolicy, &e.ProvisioningStatus); err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	return e, nil
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
		ca, cb := primaryCert(a.X509), primaryCert(b.X509)
		return ca != "" && ca == cb
	case a.SymmetricKey != nil && b.SymmetricKey != nil:
		return sameBase64(a.SymmetricKey.PrimaryKey, b.SymmetricKey.PrimaryKey)
	}
	return false
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
