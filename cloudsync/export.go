package cloudsync

import (
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"io"
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
}

// BulkExport returns the bulk-operation export of batch b's units under
// its template. Units of group methods are covered by g (required when
// there are such units); perUnit also lists them on their own. Kinds:
// Invalid (a unit cannot be enrolled as recorded; the message names it).
func BulkExport(b *station.Batch, units []*station.Unit, g *Group, perUnit bool) (*BulkFile, error) {
	f := &BulkFile{Enrollments: []dps.BulkEnrollmentOperation{}}
	var cur []dps.IndividualEnrollment
	flush := func() {
		if len(cur) > 0 {
			f.Enrollments = append(f.Enrollments, dps.BulkEnrollmentOperation{Mode: dps.BulkCreate, Enrollments: cur})
			cur = nil
		}
	}
	needGroup := false
	for _, u := range units {
		if usesGroup(u) {
			needGroup = true
			if !perUnit {
				continue
			}
		}
		e, err := Enrollment(u, b.Template)
		if err != nil {
			return nil, err
		}
		cur = append(cur, *e)
		if len(cur) == dps.MaxBulkItems {
			flush()
		}
	}
	flush()
	if needGroup {
		if g == nil {
			return nil, station.Errorf("export batch "+b.Name, station.KindInvalid,
				"batch %d has X.509 or symmetric-key units: give the enrollment group they register through", b.ID)
		}
		eg, err := EnrollmentGroup(g, b.Template)
		if err != nil {
			return nil, err
		}
		f.Groups = []dps.BulkEnrollmentGroupOperation{{Mode: dps.BulkCreate, EnrollmentGroups: []dps.EnrollmentGroup{*eg}}}
	}
	return f, nil
}

// WriteBulkJSON writes f as indented JSON.
func WriteBulkJSON(w io.Writer, f *BulkFile) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(f)
}

// CSVHeader is the header row of the CSV export.
var CSVHeader = []string{"serial", "registration_id", "method", "model", "firmware", "ek_sha256",
	"ek_public_base64", "ek_cert_base64", "station", "operator", "recorded_utc", "batch_id", "batch"}

// WriteCSV writes one row per unit of batch b, under CSVHeader. progress,
// when set, is called after each row.
func WriteCSV(w io.Writer, b *station.Batch, units []*station.Unit, progress func(done int)) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(CSVHeader); err != nil {
		return err
	}
	enc := base64.StdEncoding.EncodeToString
	for i, u := range units {
		row := []string{u.Serial, u.RegistrationID, string(u.Method), u.Model, u.Firmware, u.EKHash,
			enc(u.EKPublic), enc(u.EKCert), u.Station, u.Operator, u.Created.UTC().Format(time.RFC3339Nano),
			strconv.FormatInt(b.ID, 10), b.Name}
		for _, j := range []int{0, 3, 4, 8, 9, 12} { // the free-text fields
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
