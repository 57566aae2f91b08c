package sqlite_test

import (
	"testing"

	"github.com/kilnworks/kiln/station"
)

func TestBatchTargetAndOutbox(t *testing.T) {
	s := open(t)
	ctx := t.Context()
	addUnits(t, s, "A1", "A2")
	b := createBatch(t, s, "b", station.BatchOpen)

	tg := &station.Target{Name: "eu", HostName: "eu.azure-devices-provisioning.net", SealedConnectionString: []byte{1, 2, 3}}
	if err := s.PutTarget(ctx, tg); err != nil {
		t.Fatal(err)
	}
	tg.OpsPerMinute = 500
	if err := s.PutTarget(ctx, tg); err != nil {
		t.Fatal(err)
	}
	got, err := s.Target(ctx, "eu")
	if err != nil || got.OpsPerMinute != 500 || string(got.SealedConnectionString) != "\x01\x02\x03" {
		t.Fatalf("Target = %+v, %v", got, err)
	}
	wantKind(t, "PutTarget(bad name)", s.PutTarget(ctx, &station.Target{Name: "a b", SealedConnectionString: []byte{1}}), station.KindInvalid)
	wantKind(t, "Target(none)", func() error { _, err := s.Target(ctx, "none"); return err }(), station.KindNotFound)

	tmpl := station.EnrollmentTemplate{ProvisioningStatus: station.ProvisioningDisabled}
	if err := s.SetBatchTarget(ctx, b.ID, "eu", tmpl); err != nil {
		t.Fatal(err)
	}
	wantKind(t, "SetBatchTarget(no target)", s.SetBatchTarget(ctx, b.ID, "none", tmpl), station.KindNotFound)
	if b2, _ := s.Batch(ctx, b.ID); b2.TargetID != "eu" || b2.Template.ProvisioningStatus != station.ProvisioningDisabled {
		t.Errorf("batch target %q, template %+v", b2.TargetID, b2.Template)
	}

	items := []station.PushItem{{BatchID: b.ID, Op: station.PushEnroll, Key: "a1", Serial: "A1", Mode: station.PushModeCreate},
		{BatchID: b.ID, Op: station.PushEnroll, Key: "a2", Serial: "A2", Mode: station.PushModeCreate}}
	if err := s.AddPushItems(ctx, items); err != nil {
		t.Fatal(err)
	}
	items[0].State, items[0].Attempts = station.PushDone, 1
	if err := s.UpdatePushItems(ctx, items[:1]); err != nil {
		t.Fatal(err)
	}
	// Adding again leaves the items as they are.
	if err := s.AddPushItems(ctx, []station.PushItem{{BatchID: b.ID, Op: station.PushEnroll, Key: "a1"}}); err != nil {
		t.Fatal(err)
	}
	counts, err := s.PushCounts(ctx, b.ID, station.PushEnroll)
	if err != nil || counts[station.PushDone] != 1 || counts[station.PushPending] != 1 {
		t.Errorf("counts %v, %v; want 1 done, 1 pending", counts, err)
	}
	pending, err := s.PushItems(ctx, b.ID, station.PushEnroll, station.PushPending)
	if err != nil || len(pending) != 1 || pending[0].Key != "a2" || pending[0].Mode != station.PushModeCreate {
		t.Errorf("pending %+v, %v", pending, err)
	}
	wantKind(t, "UpdatePushItems(missing)", s.UpdatePushItems(ctx, []station.PushItem{{BatchID: b.ID, Op: station.PushEnable, Key: "a1"}}), station.KindNotFound)
	wantKind(t, "AddPushItems(no batch)", s.AddPushItems(ctx, []station.PushItem{{BatchID: 99, Op: station.PushEnroll, Key: "x"}}), station.KindNotFound)

	if err := s.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	if err := s.Transition(ctx, b.ID, station.BatchSealed, station.BatchPushing); err != nil {
		t.Fatal(err)
	}
	wantKind(t, "SetBatchTarget(pushing)", s.SetBatchTarget(ctx, b.ID, "eu", tmpl), station.KindConflict)
}
