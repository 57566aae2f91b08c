package cloudsync

import (
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"io"
	"slices"
	"strconv"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// BulkFile is the DPS bulk-operation export of a batch: the operations a
// customer sends, one POST each, to their DPS's service API (POST
// /enrollments and /enrollmentGroups), at most ten items each.
type BulkFile struct {
	Groups      []dps.BulkEnrollmentGroupOperation `json:"enrollmentGroupOperations,omitempty"`
	Enrollments []dps.BulkEnrollmentOperation      `json:"enrollmentOperations"`
	// Units is the identity of each unit, for the customer's records: not
	// sent to DPS. It never holds a key.
	Units []UnitIdentity `json:"units,omitempty"`
}

// UnitIdentity is how a unit is known to DPS, by method, without secrets:
// a TPM unit by its EK's SHA-256, an X.509 unit by its certificate and its
// thumbprint, a symmetric-key unit by its group and its key's SHA-256.
type UnitIdentity struct {
	Serial         string `json:"serial"`
	RegistrationID string `json:"registrationId"`
	Method         string `json:"method"`
	EKSHA256       string `json:"ekSha256,omitempty"`
	// Certificate is the X.509 unit's leaf, base64 DER.
	Certificate      string `json:"certificate,omitempty"`
	CertSerial       string `json:"certificateSerial,omitempty"`
	SHA256Thumbprint string `json:"sha256Thumbprint,omitempty"`
	// EnrollmentGroup is the group a unit of a group method registers
	// through.
	EnrollmentGroup string `json:"enrollmentGroupId,omitempty"`
	SymKeySHA256    string `json:"symmetricKeySha256,omitempty"`
}

// Identity returns the identity of unit u; group is the ID of the
// enrollment group it registers through ("" for none or unknown).
func Identity(u *station.Unit, group string) UnitIdentity {
	id := UnitIdentity{Serial: u.Serial, RegistrationID: u.RegistrationID, Method: string(u.Method), EKSHA256: u.EKHash,
		CertSerial: u.CertSerial, EnrollmentGroup: group, SymKeySHA256: u.SymKeySHA256}
	if group == "" {
		id.EnrollmentGroup = u.EnrollmentGroup
	}
	if len(u.Certificate) > 0 {
		id.Certificate = base64.StdEncoding.EncodeToString(u.Certificate)
		_, id.SHA256Thumbprint = station.Thumbprints(u.Certificate)
	}
	if id.SHA256Thumbprint == "" {
		id.SHA256Thumbprint = u.CertThumbprint
	}
	return id
}

// BulkExport returns the bulk-operation export of batch b's units under
// its template. Units of group methods are covered by g (required when
// there are such units); perUnit also lists them on their own. Kinds:
// Invalid (a unit cannot be enrolled as recorded; the message names it).
func BulkExport(b *station.Batch, units []*station.Unit, g *Group, perUnit bool) (*BulkFile, error) {
	var gs []*Group
	if g != nil {
		gs = []*Group{g}
	}
	return BulkExportGroups(b, units, gs, perUnit)
}

// BulkExportGroups is BulkExport with the enrollment groups the units
// register through chosen per unit, as a push chooses them (UnitGroup);
// only the groups some unit registers through are written. Kinds: Invalid.
func BulkExportGroups(b *station.Batch, units []*station.Unit, groups []*Group, perUnit bool) (*BulkFile, error) {
	f := &BulkFile{Enrollments: []dps.BulkEnrollmentOperation{}}
	var cur []dps.IndividualEnrollment
	flush := func() {
		if len(cur) > 0 {
			f.Enrollments = append(f.Enrollments, dps.BulkEnrollmentOperation{Mode: dps.BulkCreate, Enrollments: cur})
			cur = nil
		}
	}
	var used []*Group
	for _, u := range units {
		var g *Group
		if usesGroup(u) {
			var err error
			if g, err = UnitGroup(u, groups); err != nil {
				return nil, station.Errorf("export batch "+b.Name, station.KindInvalid,
					"batch %d has X.509 or symmetric-key units: %w", b.ID, err)
			}
			if !slices.Contains(used, g) {
				used = append(used, g)
			}
		}
		f.Units = append(f.Units, Identity(u, groupID(g)))
		if g != nil && !perUnit {
			continue
		}
		e, err := unitEnrollment(u, b.Template, g)
		if err != nil {
			return nil, err
		}
		cur = append(cur, *e)
		if len(cur) == dps.MaxBulkItems {
			flush()
		}
	}
	flush()
	var egs []dps.EnrollmentGroup
	for _, g := range used {
		eg, err := EnrollmentGroup(g, b.Template)
		if err != nil {
			return nil, err
		}
		egs = append(egs, *eg)
	}
	for i := 0; i < len(egs); i += dps.MaxBulkItems {
		f.Groups = append(f.Groups, dps.BulkEnrollmentGroupOperation{Mode: dps.BulkCreate, EnrollmentGroups: egs[i:min(i+dps.MaxBulkItems, len(egs))]})
	}
	return f, nil
}

func groupID(g *Group) string {
	if g == nil {
		return ""
	}
	return g.ID
}

// WriteBulkJSON writes f as indented JSON.
func WriteBulkJSON(w io.Writer, f *BulkFile) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(f)
}

// CSVHeader is the header row of the CSV export.
// The last five name the X.509 and symmetric-key units: the leaf (base64
// DER), its serial and SHA-256 thumbprint, the enrollment group and the
// SHA-256 of the device key (never the key).
var CSVHeader = []string{"serial", "registration_id", "method", "model", "firmware", "ek_sha256",
	"ek_public_base64", "ek_cert_base64", "station", "operator", "recorded_utc", "batch_id", "batch",
	"certificate_base64", "certificate_serial", "certificate_sha256_thumbprint", "enrollment_group", "symmetric_key_sha256"}

// WriteCSV writes one row per unit of batch b, under CSVHeader. progress,
// when set, is called after each row.
func WriteCSV(w io.Writer, b *station.Batch, units []*station.Unit, progress func(done int)) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(CSVHeader); err != nil {
		return err
	}
	enc := base64.StdEncoding.EncodeToString
	for i, u := range units {
		id := Identity(u, "")
		row := []string{u.Serial, u.RegistrationID, string(u.Method), u.Model, u.Firmware, u.EKHash,
			enc(u.EKPublic), enc(u.EKCert), u.Station, u.Operator, u.Created.UTC().Format(time.RFC3339Nano),
			strconv.FormatInt(b.ID, 10), b.Name,
			id.Certificate, id.CertSerial, id.SHA256Thumbprint, id.EnrollmentGroup, id.SymKeySHA256}
		for _, j := range []int{0, 3, 4, 8, 9, 12, 16} { // the free-text fields
			row[j] = csvSafe(row[j])
		}
		if err := cw.Write(row); err != nil {
			return err
		}
		if progress != nil {
			progress(i + 1)
		}
	}
	cw.Flush()
	return cw.Error()
}

// csvSafe keeps a spreadsheet from reading a field as a formula (a serial
// a device reported could start with '=').
func csvSafe(v string) string {
	if v != "" && (v[0] == '=' || v[0] == '+' || v[0] == '-' || v[0] == '@') {
		return "'" + v
	}
	return v
}
