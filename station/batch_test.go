package station_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/station"
)

func TestCheckTransition(t *testing.T) {
	legal := map[[2]station.BatchState]bool{
		{station.BatchOpen, station.BatchSealed}:     true,
		{station.BatchSealed, station.BatchPushing}:  true,
		{station.BatchPushing, station.BatchPushed}:  true,
		{station.BatchSealed, station.BatchExported}: true,
		{station.BatchPushing, station.BatchSealed}:  true, // abort
	}
	// Every pair of states: the legal five pass, every other is a Conflict
	// that names both states.
	for _, from := range station.BatchStates {
		for _, to := range station.BatchStates {
			t.Run(string(from)+"→"+string(to), func(t *testing.T) {
				err := station.CheckTransition(from, to)
				if legal[[2]station.BatchState{from, to}] {
					if err != nil {
						t.Fatalf("CheckTransition(%s, %s) = %v; want nil", from, to, err)
					}
					return
				}
				if got := station.KindOf(err); got != station.KindConflict {
					t.Fatalf("CheckTransition(%s, %s) = %v (kind %v); want a conflict", from, to, err, got)
				}
				if msg := err.Error(); !strings.Contains(msg, "from "+string(from)+" to "+string(to)) {
					t.Errorf("message %q does not name both states", msg)
				}
			})
		}
	}
	for _, tt := range [][2]station.BatchState{{"", station.BatchSealed}, {station.BatchOpen, "closed"}} {
		if got := station.KindOf(station.CheckTransition(tt[0], tt[1])); got != station.KindInvalid {
			t.Errorf("CheckTransition(%q, %q): kind %v; want invalid", tt[0], tt[1], got)
		}
	}
}

func TestEnrollmentTemplateValidate(t *testing.T) {
	tests := []struct {
		name string
		t    station.EnrollmentTemplate
		ok   bool
	}{
		{"zero", station.EnrollmentTemplate{}, true},
		{"full", station.EnrollmentTemplate{
			AllocationPolicy:   station.AllocationHashed,
			IoTHubs:            []string{"a.azure-devices.net", "b.azure-devices.net"},
			InitialTwin:        json.RawMessage(`{"tags":{"line":"1"}}`),
			Capabilities:       station.Capabilities{IoTEdge: true},
			ReprovisionPolicy:  &station.ReprovisionPolicy{UpdateHubAssignment: true},
			ProvisioningStatus: station.ProvisioningDisabled,
		}, true},
		{"unknown policy", station.EnrollmentTemplate{AllocationPolicy: "random"}, false},
		{"static needs one hub", station.EnrollmentTemplate{AllocationPolicy: station.AllocationStatic, IoTHubs: []string{"a", "b"}}, false},
		{"empty hub", station.EnrollmentTemplate{IoTHubs: []string{" "}}, false},
		{"twin not an object", station.EnrollmentTemplate{InitialTwin: json.RawMessage(`[1]`)}, false},
		{"twin null", station.EnrollmentTemplate{InitialTwin: json.RawMessage(`null`)}, false},
		{"bad status", station.EnrollmentTemplate{ProvisioningStatus: "on"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.t.Validate()
			if tt.ok && err != nil {
				t.Fatalf("Validate() = %v; want nil", err)
			}
			if !tt.ok && station.KindOf(err) != station.KindInvalid {
				t.Fatalf("Validate() = %v; want an invalid error", err)
			}
		})
	}
}

func TestBatchName(t *testing.T) {
	at := time.Date(2025, 3, 14, 23, 30, 0, 0, time.FixedZone("CET", 3600))
	if got, want := station.BatchName(at), "2025-03-14"; got != want {
		t.Errorf("BatchName = %q; want %q", got, want)
	}
}
