package sqlite_test

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kilnworks/kiln/station"
)

func TestFinishRunEndToEndFields(t *testing.T) {
	s := open(t)
	ctx := t.Context()
	started := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	r := &station.Run{Serial: "SN-1", Port: "/dev/pts/1", Method: station.MethodTPM, Started: started, Result: station.ResultRunning}
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	r.Result = station.ResultPass
	r.Finished = started.Add(3 * time.Second)
	r.DPSStatus, r.AssignedHub, r.DeviceID = "assigned", "127.0.0.1:8883", "sn-1"
	r.TelemetryAt = started.Add(2500 * time.Millisecond)
	if err := s.FinishRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	got, err := s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("run after FinishRun (-want +got):\n%s", diff)
	}
}
