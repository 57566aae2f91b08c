package dps_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

func readGolden(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return bytes.TrimRight(b, "\n")
}

// TestGoldenRoundTrip decodes bodies written after the protocol notes (and
// one real DPS challenge) and encodes them again: the bytes must come back
// exactly, so key order, omitted keys and nulls cannot drift.
func TestGoldenRoundTrip(t *testing.T) {
	tests := []struct {
		file string
		v    any
	}{
		{"register-assigning.json", new(dps.RegistrationOperationStatus)},
		{"poll-assigning.json", new(dps.RegistrationOperationStatus)},
		{"poll-assigned-tpm.json", new(dps.RegistrationOperationStatus)},
		{"poll-assigned-x509.json", new(dps.RegistrationOperationStatus)},
		{"poll-assigned-symkey-group.json", new(dps.RegistrationOperationStatus)},
		{"poll-failed.json", new(dps.RegistrationOperationStatus)},
		{"tpm-challenge-real.json", new(dps.TPMChallenge)},
		{"error-unauthorized.json", new(dps.ErrorDetails)},
		{"device-registration-tpm.json", new(dps.DeviceRegistration)},
		{"enrollment-tpm.json", new(dps.IndividualEnrollment)},
		{"enrollment-symkey-put.json", new(dps.IndividualEnrollment)},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			want := readGolden(t, tt.file)
			if err := dps.Decode(want, tt.v); err != nil {
				t.Fatal(err)
			}
			got, err := json.Marshal(tt.v)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("re-encoded body differs\n got %s\nwant %s", got, want)
			}
		})
	}
}

var (
	created = time.Date(2023, 1, 10, 21, 52, 50, 589840500, time.UTC)
	updated = time.Date(2023, 1, 10, 21, 52, 52, 192826700, time.UTC)
)

const (
	opID = "4.0f3a5c1e7b9d2e11.8c2b7a9e-3f4d-4a5b-9c6d-7e8f9a0b1c2d"
	etag = "IjYyMDI0NGRkLTAwMDAtMDcwMC0wMDAwLTYzYmRkZTM0MDAwMCI="
)

// TestGoldenFromGo builds the bodies a server sends from Go values, as
// devserver will, and compares them with the golden files.
func TestGoldenFromGo(t *testing.T) {
	challenge := new(dps.TPMChallenge)
	if err := json.Unmarshal(readGolden(t, "tpm-challenge-real.json"), challenge); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		file string
		v    any
	}{
		{"register-assigning.json", dps.RegistrationOperationStatus{OperationID: opID, Status: dps.StatusAssigning}},
		{"poll-assigning.json", dps.RegistrationOperationStatus{
			OperationID: opID, Status: dps.StatusAssigning,
			RegistrationState: &dps.DeviceRegistrationState{RegistrationID: "device-1", Status: dps.StatusAssigning},
		}},
		{"poll-assigned-tpm.json", dps.RegistrationOperationStatus{
			OperationID: opID, Status: dps.StatusAssigned,
			RegistrationState: &dps.DeviceRegistrationState{
				TPM:                    &dps.TPMRegistrationResult{AuthenticationKey: "AAEC"},
				RegistrationID:         "device-1",
				CreatedDateTimeUTC:     dps.Time{Time: created},
				AssignedHub:            "myhub.azure-devices.net",
				DeviceID:               "device-1",
				Status:                 dps.StatusAssigned,
				Substatus:              dps.SubstatusInitialAssignment,
				LastUpdatedDateTimeUTC: dps.Time{Time: updated.In(time.FixedZone("CET", 3600))},
				ETag:                   etag,
				Payload:                json.RawMessage(`{"site":"line-3","slots":[1,2]}`),
			},
		}},
		{"poll-assigned-x509.json", dps.RegistrationOperationStatus{
			OperationID: opID, Status: dps.StatusAssigned,
			RegistrationState: &dps.DeviceRegistrationState{
				X509:                   &dps.X509RegistrationResult{},
				RegistrationID:         "device-1",
				CreatedDateTimeUTC:     dps.Time{Time: created},
				AssignedHub:            "myhub.azure-devices.net",
				DeviceID:               "device-1",
				Status:                 dps.StatusAssigned,
				Substatus:              dps.SubstatusInitialAssignment,
				LastUpdatedDateTimeUTC: dps.Time{Time: updated},
				ETag:                   etag,
			},
		}},
		{"poll-failed.json", dps.RegistrationOperationStatus{
			OperationID: opID, Status: dps.StatusFailed,
			RegistrationState: &dps.DeviceRegistrationState{
				RegistrationID:         "device-1",
				CreatedDateTimeUTC:     dps.Time{Time: created},
				Status:                 dps.StatusFailed,
				ErrorCode:              dps.CodeAllocationFailed,
				ErrorMessage:           "Custom allocation failed with status code: 401",
				LastUpdatedDateTimeUTC: dps.Time{Time: updated},
				ETag:                   etag,
			},
		}},
		{"tpm-challenge-real.json", dps.NewTPMChallenge(challenge.AuthenticationKey)},
		{"error-unauthorized.json", &dps.ErrorDetails{
			ErrorCode: dps.CodeUnauthorized, TrackingID: "5b1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
			Message: "Unauthorized", TimestampUTC: dps.Time{Time: created},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got, err := json.Marshal(tt.v)
			if err != nil {
				t.Fatal(err)
			}
			if want := readGolden(t, tt.file); !bytes.Equal(got, want) {
				t.Errorf("body differs\n got %s\nwant %s", got, want)
			}
		})
	}
}

func TestTPMChallengeHasNoStatus(t *testing.T) {
	b, err := json.Marshal(dps.NewTPMChallenge("AAEC"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if _, ok := m["status"]; ok {
		t.Errorf("the TPM challenge has a status key (the C SDK reads it as a registration status): %s", b)
	}
	if v, ok := m["unencryptedAuthenticationKey"]; !ok || v != nil {
		t.Errorf("unencryptedAuthenticationKey = %v (present %v), want null", v, ok)
	}
}

func TestTimeMarshal(t *testing.T) {
	tests := []struct {
		in   time.Time
		want string
	}{
		{time.Date(2023, 1, 10, 21, 52, 50, 589840599, time.UTC), `"2023-01-10T21:52:50.5898405Z"`},
		{time.Date(2023, 1, 10, 21, 52, 50, 0, time.UTC), `"2023-01-10T21:52:50.0000000Z"`},
		{time.Date(2023, 1, 10, 22, 52, 50, 100, time.FixedZone("", 3600)), `"2023-01-10T21:52:50.0000001Z"`},
	}
	for _, tt := range tests {
		got, err := json.Marshal(dps.Time{Time: tt.in})
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != tt.want {
			t.Errorf("Marshal(%v) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

func TestTimeUnmarshal(t *testing.T) {
	tests := []struct {
		in   string
		want time.Time
	}{
		{`"2023-01-10T21:52:50.5898405Z"`, time.Date(2023, 1, 10, 21, 52, 50, 589840500, time.UTC)},
		{`"2023-01-10T21:52:50Z"`, time.Date(2023, 1, 10, 21, 52, 50, 0, time.UTC)},
		{`"2023-01-10T22:52:50.5+01:00"`, time.Date(2023, 1, 10, 21, 52, 50, 500000000, time.UTC)},
		{`"2023-01-10T21:52:50.12"`, time.Date(2023, 1, 10, 21, 52, 50, 120000000, time.UTC)},
		{`null`, time.Time{}},
	}
	for _, tt := range tests {
		var got dps.Time
		if err := json.Unmarshal([]byte(tt.in), &got); err != nil {
			t.Errorf("Unmarshal(%s): %v", tt.in, err)
			continue
		}
		if !got.Equal(tt.want) {
			t.Errorf("Unmarshal(%s) = %v, want %v", tt.in, got.Time, tt.want)
		}
	}
	for _, in := range []string{`"yesterday"`, `12`, `"2023-13-10T21:52:50Z"`} {
		var got dps.Time
		err := json.Unmarshal([]byte(in), &got)
		if station.KindOf(err) != station.KindInvalid {
			t.Errorf("Unmarshal(%s) error %v, want an Invalid error", in, err)
		}
	}
}

func TestZeroTimesOmitted(t *testing.T) {
	b, err := json.Marshal(dps.IndividualEnrollment{RegistrationID: "d", Attestation: dps.AttestationMechanism{Type: dps.AttestationNone}})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"registrationId":"d","attestation":{"type":"none"}}`; string(b) != want {
		t.Errorf("got %s, want %s", b, want)
	}
}

func TestReprovisionPolicyDefaults(t *testing.T) {
	tests := []struct {
		in   string
		want dps.ReprovisionPolicy
	}{
		{`{}`, dps.ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}},
		{`{"migrateDeviceData":false}`, dps.ReprovisionPolicy{UpdateHubAssignment: true}},
		{`{"updateHubAssignment":false,"migrateDeviceData":true}`, dps.ReprovisionPolicy{MigrateDeviceData: true}},
	}
	for _, tt := range tests {
		var got dps.ReprovisionPolicy
		if err := json.Unmarshal([]byte(tt.in), &got); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%s: (-want +got)\n%s", tt.in, diff)
		}
	}
}

func TestDecode(t *testing.T) {
	for _, body := range []string{"", " ", "\n\t"} {
		r := dps.DeviceRegistration{RegistrationID: "kept"}
		if err := dps.Decode([]byte(body), &r); err != nil || r.RegistrationID != "kept" {
			t.Errorf("Decode(%q) = %v, %+v; want no error and v untouched", body, err, r)
		}
	}
	var r dps.DeviceRegistration
	if err := dps.Decode([]byte(`{"registrationId":"a","unknown":1}`), &r); err != nil || r.RegistrationID != "a" {
		t.Errorf("unknown fields: %v, %+v", err, r)
	}
	for _, body := range []string{`{"registrationId":`, `{} {}`, `{}}`, `[]`} {
		var r dps.DeviceRegistration
		if err := dps.Decode([]byte(body), &r); station.KindOf(err) != station.KindInvalid {
			t.Errorf("Decode(%q) error %v, want Invalid", body, err)
		}
	}
}

func TestErrorDetails(t *testing.T) {
	e := &dps.ErrorDetails{ErrorCode: dps.CodeAllocationFailed, Message: "Custom allocation failed with status code: 401"}
	if got := e.HTTPStatus(); got != 400 {
		t.Errorf("HTTPStatus() = %d, want 400", got)
	}
	var err error = e
	if got, want := err.Error(), "DPS error 400209: Custom allocation failed with status code: 401"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// The real DPS blob of the Java SDK's challenge splits into the sizes of
// the protocol notes (§4.4), and our ID key's public area has the same
// bytes as DPS's but for the unique digest.
func TestRealChallengeBlob(t *testing.T) {
	var c dps.TPMChallenge
	if err := json.Unmarshal(readGolden(t, "tpm-challenge-real.json"), &c); err != nil {
		t.Fatal(err)
	}
	blob, err := base64.StdEncoding.DecodeString(c.AuthenticationKey)
	if err != nil {
		t.Fatal(err)
	}
	a := parseBlob(t, blob)
	got := []int{len(a.Credential), len(a.CredentialSeed), len(a.Duplicate), len(a.DuplicateSeed), len(a.Public), len(a.Data)}
	if diff := cmp.Diff([]int{52, 256, 142, 256, 48, 154}, got); diff != "" {
		t.Errorf("field sizes (-want +got)\n%s", diff)
	}

	ours := newActivation(t)
	mine := parseBlob(t, ours.Blob)
	if !bytes.Equal(mine.Public[:len(mine.Public)-32], a.Public[:len(a.Public)-32]) {
		t.Errorf("ID key public area\n ours %x\n DPS's %x\n(they may differ only in the last 32 bytes, the unique digest)", mine.Public, a.Public)
	}
}
