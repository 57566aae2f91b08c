package sqlite_test

import (
	"context"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/station"
)

// Units of the X.509 and symmetric-key methods keep their identities, have
// no EK hash (so they never clash on it), and one certificate cannot be
// recorded for two units.
func TestRecordUnitIdentities(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	x := &station.Unit{Serial: "X-1", RegistrationID: "x-1", Method: station.MethodX509,
		Certificate: []byte{0x30, 0x01, 0x02}, CertSerial: "0a1b", CertThumbprint: "ABCDEF", KeyStorage: station.KeyInTPM}
	k := &station.Unit{Serial: "K-1", RegistrationID: "k-1", Method: station.MethodSymKey,
		EnrollmentGroup: "kiln-symkey", SymKeySHA256: "00ff"}
	for _, u := range []*station.Unit{x, k} {
		if err := s.RecordUnit(ctx, u); err != nil {
			t.Fatalf("RecordUnit(%s): %v", u.Serial, err)
		}
		got, err := s.UnitBySerial(ctx, u.Serial)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(u, got); diff != "" {
			t.Errorf("unit %s read back differs (-wrote +read):\n%s", u.Serial, diff)
		}
	}
	dup := &station.Unit{Serial: "X-2", RegistrationID: "x-2", Method: station.MethodX509, Certificate: []byte{1}, CertThumbprint: "ABCDEF"}
	if err := s.RecordUnit(ctx, dup); station.KindOf(err) != station.KindConflict {
		t.Errorf("a second unit with certificate thumbprint ABCDEF: err = %v, want a Conflict", err)
	} else if !strings.Contains(err.Error(), "thumbprint ABCDEF") {
		t.Errorf("the conflict does not name the thumbprint: %v", err)
	}
	if _, err := s.UnitBySerial(ctx, "X-2"); station.KindOf(err) != station.KindNotFound {
		t.Errorf("the refused unit is in the store: %v", err)
	}
}
