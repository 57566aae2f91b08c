package station_test

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/station"
)

func TestKindOf(t *testing.T) {
	conflict := station.Errorf("check duplicates", station.KindConflict, "serial %s seen", "SN1")
	tests := []struct {
		name string
		err  error
		want station.Kind
	}{
		{"nil", nil, station.KindOther},
		{"plain", io.EOF, station.KindOther},
		{"direct", conflict, station.KindConflict},
		{"wrapped by fmt", fmt.Errorf("provision: %w", conflict), station.KindConflict},
		{"outer other, inner kind", station.E("outer", station.KindOther, conflict), station.KindConflict},
		{"outer kind wins", station.E("outer", station.KindUnavailable, conflict), station.KindUnavailable},
		{"joined", errors.Join(io.EOF, conflict), station.KindConflict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := station.KindOf(tt.err); got != tt.want {
				t.Errorf("KindOf(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
	if station.E("op", station.KindInternal, nil) != nil {
		t.Error("E with a nil error must return nil")
	}
	if !errors.Is(fmt.Errorf("x: %w", station.E("read", station.KindUnavailable, io.EOF)), io.EOF) {
		t.Error("an *Error must unwrap to its cause")
	}
	if got, want := conflict.Error(), "check duplicates: serial SN1 seen"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestRegistrationIDFromEK(t *testing.T) {
	ek := make([]byte, 40)
	for i := range ek {
		ek[i] = byte(i)
	}
	// Computed independently (Python: base64.b32encode(sha256(bytes(range(40)))), lower, no '=').
	const want = "l6ve53bwcfkwqewc25fug7emjgw5h6iq6eaghwabiqpx25only5q"
	if got := station.RegistrationIDFromEK(ek); got != want {
		t.Errorf("RegistrationIDFromEK = %q, want %q", got, want)
	}
	if got := station.EKHash(ek); got != "5faa4eec3611556812c2d74b437c8c49add3f910f10063d801441f7d75cd5e3b" {
		t.Errorf("EKHash = %q", got)
	}
	if err := station.ValidRegistrationID(want); err != nil {
		t.Errorf("the EK-derived registration ID must be valid: %v", err)
	}
}

func TestRegistrationID(t *testing.T) {
	tests := []struct {
		rule    station.RegIDRule
		serial  string
		ek      []byte
		want    string
		wantErr station.Kind
	}{
		{station.RegIDFromSerial, "SN-0001", nil, "sn-0001", 0},
		{station.RegIDFromSerial, "SN 0001", nil, "", station.KindInvalid},
		{station.RegIDFromEK, "SN-0001", nil, "", station.KindInvalid},
		{"guess", "SN-0001", []byte{1}, "", station.KindInvalid},
	}
	for _, tt := range tests {
		t.Run(string(tt.rule)+"/"+tt.serial, func(t *testing.T) {
			got, err := station.RegistrationID(tt.rule, tt.serial, tt.ek)
			if station.KindOf(err) != tt.wantErr || (err != nil) != (tt.wantErr != 0) {
				t.Fatalf("err = %v, want kind %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestValidRegistrationID(t *testing.T) {
	good := []string{"a", "sn-0001", "dev.1_a:b", strings.Repeat("a", 128)}
	bad := []string{"", "UPPER", "has space", "ends.", "ends_", "ends:", "ends-", "-starts", ".starts", "ümlaut", strings.Repeat("a", 129)}
	for _, id := range good {
		if err := station.ValidRegistrationID(id); err != nil {
			t.Errorf("ValidRegistrationID(%q) = %v, want nil", id, err)
		}
	}
	for _, id := range bad {
		if err := station.ValidRegistrationID(id); station.KindOf(err) != station.KindInvalid {
			t.Errorf("ValidRegistrationID(%q) = %v, want an Invalid error", id, err)
		}
	}
}
