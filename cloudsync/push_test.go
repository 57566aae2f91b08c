package cloudsync_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

func TestPushUnderQuota(t *testing.T) {
	d := startTarget(t, 20, time.Second)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	tmpl := station.EnrollmentTemplate{AllocationPolicy: station.AllocationHashed, InitialTwin: []byte(`{"tags":{"line":"1"}}`)}
	b := s.sealedBatch(t, "b1", 200, tg.Name, tmpl)
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 20, Window: time.Second})
	var last cloudsync.Progress
	p.Progress = func(pr cloudsync.Progress) { last = pr }
	p.Verify = cloudsync.VerifyAll
	rep, err := p.Push(t.Context(), b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Total != 200 || rep.Done != 200 || rep.Failed != 0 {
		t.Errorf("report total %d, done %d, failed %d; want 200, 200, 0", rep.Total, rep.Done, rep.Failed)
	}
	if rep.Throttled != 0 {
		t.Errorf("%d requests were throttled pacing at the quota; want 0", rep.Throttled)
	}
	if rep.Verified != 200 {
		t.Errorf("verified %d; want all 200", rep.Verified)
	}
	if last.Phase != "verify" || last.Done != 200 || last.Total != 200 {
		t.Errorf("last progress %+v; want verify 200/200", last)
	}
	checkHoldsExactly(t, s, d, b.ID)
	got, err := s.store.Batch(t.Context(), b.ID)
	if err != nil || got.State != station.BatchPushed {
		t.Errorf("batch state %v, %v; want pushed", got.State, err)
	}
	// The template reached the DPS.
	for _, e := range d.enrollments(t) {
		if e.AllocationPolicy != "hashed" || e.InitialTwin == nil || !strings.Contains(string(e.InitialTwin.Tags), `"line"`) {
			t.Fatalf("enrollment %s: allocation %q, twin %+v; want the template's", e.RegistrationID, e.AllocationPolicy, e.InitialTwin)
		}
	}
	// A pushed batch is not pushed again.
	if _, err := p.Push(t.Context(), b.ID); station.KindOf(err) != station.KindConflict {
		t.Errorf("second push = %v; want a Conflict", err)
	}
}

func TestPushThrottledAndFailing(t *testing.T) {
	// The pusher believes in a quota four times the service's, and the
	// service fails every 9th request it lets through with a 503.
	d := startTarget(t, 10, time.Second)
	d.th.fail5xx = 9
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	b := s.sealedBatch(t, "b1", 150, tg.Name, station.EnrollmentTemplate{})
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 40, Window: time.Second})
	rep, err := p.Push(t.Context(), b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Done != 150 || rep.Failed != 0 {
		t.Errorf("done %d, failed %d; want 150, 0", rep.Done, rep.Failed)
	}
	throttled, failed := d.th.stats()
	if rep.Throttled == 0 || throttled == 0 {
		t.Errorf("throttled %d (service: %d); want some", rep.Throttled, throttled)
	}
	if failed == 0 || rep.Retries < rep.Throttled+failed {
		t.Errorf("retries %d for %d throttled and %d failed answers", rep.Retries, rep.Throttled, failed)
	}
	checkHoldsExactly(t, s, d, b.ID)
}

// A pusher that believes in more than the target's quota is held back by
// the devserver's own throttle (DPS's semantics: N operations in any
// minute, 429 with a retry-after beyond) and honours its retry-after:
// one request is refused, every worker waits, and the push completes
// without a second refusal. It waits out the minute of the quota's
// window, so it runs in parallel with the other tests.
func TestPushOverDevserverQuota(t *testing.T) {
	t.Parallel()
	const quota = 5
	d := startQuotaTarget(t, quota)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	b := s.sealedBatch(t, "over", 60, tg.Name, station.EnrollmentTemplate{}) // 6 bulk operations
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 600, Window: time.Minute})
	p.Workers, p.Verify = 4, cloudsync.VerifyNone
	t0 := time.Now()
	rep, err := p.Push(t.Context(), b.ID)
	el := time.Since(t0)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pushed 60 in %d requests, %d throttled, in %v", rep.Requests, rep.Throttled, el.Round(time.Millisecond))
	if rep.Done != 60 || rep.Failed != 0 {
		t.Errorf("done %d, failed %d; want 60, 0", rep.Done, rep.Failed)
	}
	if rep.Throttled != 1 || rep.Requests != 7 {
		t.Errorf("%d requests, %d throttled; want 7 and 1: the sixth refused once, then sent after its retry-after", rep.Requests, rep.Throttled)
	}
	if el < 55*time.Second {
		t.Errorf("the push took %v; the quota's window is a minute, so the sixth request cannot have waited its retry-after", el)
	}
	checkHoldsExactly(t, s, d, b.ID)
}

func TestPushRefusedItems(t *testing.T) {
	d := startQuotaTarget(t, 6000)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	ctx := t.Context()
	b := &station.Batch{Name: "mixed"}
	if err := s.store.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	bad := map[string]bool{}
	for i := range 25 {
		ek := fakeEK(t)
		if i%8 == 3 {
			ek = []byte("not a TPM2B_PUBLIC at all")
			bad[station.RegistrationIDFromEK(ek)+string(rune('a'+i))] = true
		}
		u := &station.Unit{Serial: "m-" + string(rune('a'+i)), RegistrationID: station.RegistrationIDFromEK(ek), Method: station.MethodTPM,
			EKHash: station.EKHash(ek), EKPublic: ek}
		if i%8 == 3 {
			u.RegistrationID += string(rune('a' + i))
			u.EKHash = ""
		}
		if err := s.store.RecordUnit(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.store.AddUnit(ctx, b.ID, u.Serial); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.store.SetBatchTarget(ctx, b.ID, tg.Name, station.EnrollmentTemplate{}); err != nil {
		t.Fatal(err)
	}
	if err := s.store.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}

	t.Run("wrong key", func(t *testing.T) {
		wrong := s.addTarget(t, d, strings.Replace(d.conn, "SharedAccessKey=", "SharedAccessKey=AAAA", 1))
		p := s.pusher(t, wrong, cloudsync.Quota{Operations: 6000, Window: time.Minute})
		rep, err := p.Push(ctx, b.ID)
		if station.KindOf(err) != station.KindUnauthorized {
			t.Errorf("push with a wrong key = %v; want Unauthorized", err)
		}
		if rep == nil || rep.Failed != 25 || rep.Done != 0 {
			t.Fatalf("report %+v; want all 25 failed", rep)
		}
		for _, it := range rep.Failures {
			if it.ErrorCode/1000 != 401 || !strings.Contains(it.Error, "401") {
				t.Errorf("item %s: code %d, error %q; want the DPS's 401", it.Key, it.ErrorCode, it.Error)
			}
		}
		if n := len(d.enrollments(t)); n != 0 {
			t.Errorf("the DPS holds %d enrollments; want 0", n)
		}
		if rep.Requests > 4 {
			t.Errorf("%d requests with refused credentials; want the push to stop at the first (at most the 4 workers' in flight)", rep.Requests)
		}
	})
	t.Run("invalid items", func(t *testing.T) {
		tg := s.addTarget(t, d, d.conn) // the right key again, same target name
		p := s.pusher(t, tg, cloudsync.Quota{Operations: 6000, Window: time.Minute})
		p.Verify = cloudsync.VerifyAll
		rep, err := p.Push(ctx, b.ID)
		if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "refused") {
			t.Errorf("push = %v; want Invalid, saying items were refused", err)
		}
		if rep.Done != 25-len(bad) || rep.Failed != len(bad) {
			t.Fatalf("done %d, failed %d; want %d, %d", rep.Done, rep.Failed, 25-len(bad), len(bad))
		}
		for _, it := range rep.Failures {
			if !bad[it.Key] {
				t.Errorf("item %s failed; it is valid", it.Key)
			}
			if it.ErrorCode/1000 != 400 || !strings.Contains(it.Error, "endorsementKey") {
				t.Errorf("item %s: code %d, error %q; want the DPS's 400 about the EK", it.Key, it.ErrorCode, it.Error)
			}
		}
		held := d.enrollments(t)
		if len(held) != 25-len(bad) {
			t.Errorf("the DPS holds %d; want %d", len(held), 25-len(bad))
		}
		got, _ := s.store.Batch(ctx, b.ID)
		if got.State != station.BatchPushing {
			t.Errorf("batch is %s; want pushing while items are refused", got.State)
		}
	})
}

func TestPushTwoPhaseEnable(t *testing.T) {
	d := startQuotaTarget(t, 6000)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	b := s.sealedBatch(t, "qa", 23, tg.Name, station.EnrollmentTemplate{ProvisioningStatus: station.ProvisioningDisabled})
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 6000, Window: time.Minute})
	if _, err := p.Push(t.Context(), b.ID); err != nil {
		t.Fatal(err)
	}
	for id, e := range d.enrollments(t) {
		if e.ProvisioningStatus != dps.ProvisioningDisabled {
			t.Fatalf("%s is %s after the push; want disabled", id, e.ProvisioningStatus)
		}
	}
	rep, err := p.Enable(t.Context(), b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Done != 23 {
		t.Errorf("enabled %d; want 23", rep.Done)
	}
	for id, e := range d.enrollments(t) {
		if e.ProvisioningStatus != dps.ProvisioningEnabled {
			t.Errorf("%s is %s after enable; want enabled", id, e.ProvisioningStatus)
		}
	}
	// Again: nothing left to do, nothing sent.
	rep, err = p.Enable(t.Context(), b.ID)
	if err != nil || rep.Sent != 0 || rep.Done != 23 {
		t.Errorf("second enable: %+v, %v; want 23 done, 0 sent", rep, err)
	}
}

func TestPushVerifyCatchesLoss(t *testing.T) {
	d := startQuotaTarget(t, 6000)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	b := s.sealedBatch(t, "lossy", 50, tg.Name, station.EnrollmentTemplate{})
	units, err := s.store.BatchUnits(t.Context(), b.ID)
	if err != nil {
		t.Fatal(err)
	}
	// Someone deletes a pushed enrollment on the target while the push
	// is still sending its last bulk operation.
	direct := httptest.NewUnstartedServer(d.srv.Handler())
	direct.StartTLS()
	defer direct.Close()
	admin, err := dps.NewServiceClient(d.conn, dps.ServiceOptions{HTTP: direct.Client(), BaseURL: direct.URL})
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int32
	d.th.setHook(func(stage string) {
		if stage == "after" && n.Add(1) == 5 {
			if err := admin.DeleteEnrollment(context.Background(), units[0].RegistrationID, ""); err != nil {
				t.Error(err)
			}
		}
	})
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 6000, Window: time.Minute})
	p.Verify = cloudsync.VerifyAll
	rep, err := p.Push(t.Context(), b.ID)
	if err == nil || rep.Failed != 1 || rep.Failures[0].Serial != units[0].Serial || !strings.Contains(rep.Failures[0].Error, "does not hold") {
		t.Fatalf("push = %v, report %+v; want the lost enrollment caught by the read-back", err, rep)
	}
	d.th.setHook(nil)
	rep, err = p.Push(t.Context(), b.ID)
	if err != nil || rep.Done != 50 || rep.Sent != 1 {
		t.Fatalf("push again = %v, %+v; want the lost one sent again and all 50 done", err, rep)
	}
	held := d.enrollments(t)
	if len(held) != 50 {
		t.Errorf("the DPS holds %d; want 50", len(held))
	}
}

func TestPushSymmetricKeyGroup(t *testing.T) {
	d := startQuotaTarget(t, 6000)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	ctx := t.Context()
	b := &station.Batch{Name: "symkey"}
	if err := s.store.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		u := &station.Unit{Serial: fmt.Sprintf("SK-%d", i), RegistrationID: fmt.Sprintf("sk-device-%d", i), Method: station.MethodSymKey}
		if err := s.store.RecordUnit(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.store.AddUnit(ctx, b.ID, u.Serial); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.store.SetBatchTarget(ctx, b.ID, tg.Name, station.EnrollmentTemplate{}); err != nil {
		t.Fatal(err)
	}
	if err := s.store.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	groupKey := make([]byte, 32)
	rand.Read(groupKey)
	p := s.pusher(t, tg, cloudsync.Quota{Operations: 6000, Window: time.Minute})
	// Without the group, the push cannot be planned.
	if _, err := p.Push(ctx, b.ID); station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "enrollment group") {
		t.Fatalf("push without a group = %v; want Invalid asking for the group", err)
	}
	if got, _ := s.store.Batch(ctx, b.ID); got.State != station.BatchSealed {
		t.Errorf("a push that could not be planned left the batch %s; want sealed", got.State)
	}
	p.Group = &cloudsync.Group{ID: "line-sk", Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
		SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(groupKey)}}}
	p.PerUnit = true
	rep, err := p.Push(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Total != 6 || rep.Done != 6 {
		t.Errorf("report %+v; want the group and 5 units done", rep)
	}
	held := d.enrollments(t)
	if len(held) != 5 {
		t.Fatalf("the DPS holds %d individual enrollments; want 5", len(held))
	}
	for i := range 5 {
		id := fmt.Sprintf("sk-device-%d", i)
		e := held[id]
		want := dps.EncodeKey(dps.DeriveDeviceKey(groupKey, id))
		if e.Attestation.SymmetricKey == nil || e.Attestation.SymmetricKey.PrimaryKey != want {
			t.Errorf("%s: the DPS holds %+v; want the key derived from the group's", id, e.Attestation)
		}
	}
	svc, _ := cloudsync.NewServiceClient(tg, s.sealer)
	if g, err := svc.GetEnrollmentGroup(ctx, "line-sk"); err != nil || g.Attestation.Type != dps.AttestationSymmetricKey {
		t.Errorf("group: %+v, %v", g, err)
	}
}
