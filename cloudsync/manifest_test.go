package cloudsync_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

func exportFixture(t *testing.T, n int) (*stationDir, *station.Batch, []*station.Unit) {
	t.Helper()
	s := openStation(t, t.TempDir())
	b := s.sealedBatch(t, "exp", n, "", station.EnrollmentTemplate{})
	units, err := s.store.BatchUnits(context.Background(), b.ID)
	if err != nil {
		t.Fatal(err)
	}
	return s, b, units
}

func TestManifestVerifyAndTamper(t *testing.T) {
	s, b, units := exportFixture(t, 12)
	signer, err := cloudsync.LoadSigner(filepath.Join(s.dir, cloudsync.SigningKeyFile), s.sealer)
	if err != nil {
		t.Fatal(err)
	}
	// The key is sealed at rest: the file holds no PKCS#8 in the clear,
	// and loading it again gives the same key.
	raw, err := os.ReadFile(filepath.Join(s.dir, cloudsync.SigningKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(filepath.Join(s.dir, cloudsync.SigningKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("signing key file mode %v; want 0600", fi.Mode().Perm())
	}
	if bytes.Contains(raw, []byte{0x30, 0x81}) && bytes.HasPrefix(raw, []byte{0x30}) {
		t.Error("the signing key file looks like DER in the clear")
	}
	again, err := cloudsync.LoadSigner(filepath.Join(s.dir, cloudsync.SigningKeyFile), s.sealer)
	if err != nil || again.KeyID() != signer.KeyID() {
		t.Fatalf("reloaded signer %v, %v; want the same key", again, err)
	}

	m, err := cloudsync.SignManifest(b, units, signer, time.Now(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := cloudsync.WriteManifest(&buf, m); err != nil {
		t.Fatal(err)
	}
	pub, err := cloudsync.ParsePublicKeyPEM(signer.PublicKeyPEM())
	if err != nil {
		t.Fatal(err)
	}
	decoded, err := cloudsync.DecodeManifest(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	claims, err := cloudsync.VerifyManifest(decoded, pub)
	if err != nil {
		t.Fatalf("the exported manifest does not verify: %v", err)
	}
	if len(claims) != 12 || claims[3].Serial != units[3].Serial || claims[3].RegistrationID != units[3].RegistrationID ||
		claims[3].EKPublic != base64.StdEncoding.EncodeToString(units[3].EKPublic) || claims[3].Station != "line-1" ||
		claims[3].Operator != "ada" || claims[3].Model != "KX-1" || claims[3].Batch != "exp" || claims[3].Provisioned.IsZero() {
		t.Errorf("claims[3] = %+v; want unit %s's", claims[3], units[3].Serial)
	}

	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	flip := func(jws string) string {
		// Change one character of the payload: another serial.
		parts := strings.Split(jws, ".")
		p, _ := base64.RawURLEncoding.DecodeString(parts[1])
		p = bytes.Replace(p, []byte("exp-0000"), []byte("exp-9999"), 1)
		parts[1] = base64.RawURLEncoding.EncodeToString(p)
		return strings.Join(parts, ".")
	}
	tests := []struct {
		name   string
		edit   func(m *cloudsync.Manifest)
		key    *ecdsa.PublicKey
		reason string
	}{
		{"payload changed", func(m *cloudsync.Manifest) { m.Entries[2] = flip(m.Entries[2]) }, pub, "entry 3 (serial \"exp-99992\"): verify JWS: the signature does not match"},
		{"entry removed", func(m *cloudsync.Manifest) { m.Entries = append(m.Entries[:5], m.Entries[6:]...) }, pub, "the list of entries was changed after signing"},
		{"entries swapped", func(m *cloudsync.Manifest) { m.Entries[0], m.Entries[1] = m.Entries[1], m.Entries[0] }, pub, "the list of entries was changed"},
		{"entry repeated", func(m *cloudsync.Manifest) { m.Entries[1] = m.Entries[0] }, pub, "entry 2 repeats serial"},
		{"another key", func(*cloudsync.Manifest) {}, &other.PublicKey, "not the key you trust"},
		{"alg none", func(m *cloudsync.Manifest) {
			parts := strings.Split(m.Entries[0], ".")
			parts[0] = base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","kid":"` + m.KeyID + `"}`))
			m.Entries[0] = parts[0] + "." + parts[1] + "."
		}, pub, "not ES256: refused"},
		{"batch changed", func(m *cloudsync.Manifest) { m.BatchID++ }, pub, "was signed for batch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := cloudsync.DecodeManifest(buf.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			tt.edit(m)
			_, err = cloudsync.VerifyManifest(m, tt.key)
			if err == nil {
				t.Fatal("a tampered manifest verifies")
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("error %q; want it to say %q", err, tt.reason)
			}
		})
	}
}

func TestExportBulkJSONAndCSV(t *testing.T) {
	_, b, units := exportFixture(t, 23)
	units[0].Model = "=HYPERLINK(\"x\")"
	f, err := cloudsync.BulkExport(b, units, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := cloudsync.WriteBulkJSON(&buf, f); err != nil {
		t.Fatal(err)
	}
	var back struct {
		Ops []json.RawMessage `json:"enrollmentOperations"`
	}
	if err := json.Unmarshal(buf.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Ops) != 3 {
		t.Fatalf("%d operations for 23 units; want 3 (10, 10, 3)", len(back.Ops))
	}
	n := 0
	for _, op := range back.Ops {
		// Each operation is what the DPS service API takes.
		mode, items, err := devserver.DecodeBulkOperation(op, false)
		if err != nil || mode != dps.BulkCreate {
			t.Fatalf("operation: mode %q, %v", mode, err)
		}
		for _, it := range items {
			e, err := devserver.DecodeEnrollment(it, units[n].RegistrationID)
			if err != nil {
				t.Fatalf("item %d: %v", n, err)
			}
			if e.Attestation.TPM.EndorsementKey != base64.StdEncoding.EncodeToString(units[n].EKPublic) {
				t.Errorf("item %d holds another EK", n)
			}
			n++
		}
	}
	if n != 23 {
		t.Errorf("%d enrollments exported; want 23", n)
	}

	buf.Reset()
	if err := cloudsync.WriteCSV(&buf, b, units, nil); err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(&buf).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 24 || strings.Join(rows[0], ",") != strings.Join(cloudsync.CSVHeader, ",") {
		t.Fatalf("%d rows, header %v", len(rows), rows[0])
	}
	if rows[1][0] != units[0].Serial || rows[1][1] != units[0].RegistrationID || rows[1][3] != `'=HYPERLINK("x")` {
		t.Errorf("row 1 = %q", rows[1])
	}
	if ek, _ := base64.StdEncoding.DecodeString(rows[5][6]); !bytes.Equal(ek, units[4].EKPublic) {
		t.Errorf("row 5's EK does not decode to unit 4's")
	}
}
