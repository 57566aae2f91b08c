package sqlite_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// addUnits records passing runs and units for serials.
func addUnits(t *testing.T, s *sqlite.Store, serials ...string) {
	t.Helper()
	for i, serial := range serials {
		if err := recordRun(t.Context(), s, serial, t0.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
}

func createBatch(t *testing.T, s *sqlite.Store, name string, state station.BatchState) *station.Batch {
	t.Helper()
	b := &station.Batch{Name: name, State: state, Created: t0}
	if err := s.CreateBatch(t.Context(), b); err != nil {
		t.Fatalf("CreateBatch(%s, %s): %v", name, state, err)
	}
	return b
}

func wantKind(t *testing.T, what string, err error, want station.Kind) {
	t.Helper()
	if got := station.KindOf(err); got != want {
		t.Errorf("%s = %v (kind %v); want kind %v", what, err, got, want)
	}
}

func TestBatchRoundTrip(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	addUnits(t, s, "SN1", "SN2")
	b := &station.Batch{
		Name:     "customer A",
		TargetID: "contoso-dps",
		Template: station.EnrollmentTemplate{
			AllocationPolicy:   station.AllocationStatic,
			IoTHubs:            []string{"contoso.azure-devices.net"},
			InitialTwin:        json.RawMessage(`{"tags":{"line":"1"}}`),
			Capabilities:       station.Capabilities{IoTEdge: true},
			ReprovisionPolicy:  &station.ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: false},
			ProvisioningStatus: station.ProvisioningDisabled,
		},
		Created: t0,
	}
	if err := s.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	if b.ID == 0 || b.State != station.BatchOpen {
		t.Fatalf("after CreateBatch: ID %d, state %q; want an ID and open", b.ID, b.State)
	}
	for _, serial := range []string{"SN2", "SN1", "SN2"} { // the second SN2 does nothing
		if err := s.AddUnit(ctx, b.ID, serial); err != nil {
			t.Fatalf("AddUnit(%s): %v", serial, err)
		}
	}

	want := *b
	want.Created = t0.UTC()
	want.Units = 2
	got, err := s.Batch(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(&want, got); diff != "" {
		t.Errorf("Batch (-want +got):\n%s", diff)
	}
	open, err := s.OpenBatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(&want, open); diff != "" {
		t.Errorf("OpenBatch (-want +got):\n%s", diff)
	}
	units, err := s.BatchUnits(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	var serials []string
	for _, u := range units {
		serials = append(serials, u.Serial)
	}
	if diff := cmp.Diff([]string{"SN2", "SN1"}, serials); diff != "" {
		t.Errorf("BatchUnits serials (-want +got):\n%s", diff)
	}
	u1, err := s.UnitBySerial(ctx, "SN1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(u1, units[1]); diff != "" {
		t.Errorf("BatchUnits unit (-UnitBySerial +BatchUnits):\n%s", diff)
	}

	// Through the lifecycle, with times stamped by the store's clock.
	at := t0.Add(time.Hour)
	s.Now = func() time.Time { return at }
	for _, step := range [][2]station.BatchState{
		{station.BatchOpen, station.BatchSealed},
		{station.BatchSealed, station.BatchPushing},
		{station.BatchPushing, station.BatchSealed}, // abort: keeps the first sealed time
		{station.BatchSealed, station.BatchPushing},
		{station.BatchPushing, station.BatchPushed},
	} {
		if err := s.Transition(ctx, b.ID, step[0], step[1]); err != nil {
			t.Fatalf("Transition(%s, %s): %v", step[0], step[1], err)
		}
		at = at.Add(time.Minute)
	}
	got, err = s.Batch(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	want.State = station.BatchPushed
	want.Sealed = t0.Add(time.Hour).UTC()
	want.Pushed = t0.Add(time.Hour + 4*time.Minute).UTC()
	if diff := cmp.Diff(&want, got); diff != "" {
		t.Errorf("after push (-want +got):\n%s", diff)
	}
	_, err = s.OpenBatch(ctx)
	wantKind(t, "OpenBatch with none open", err, station.KindNotFound)
}

func TestBatches(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	var ids []int64
	for i, name := range []string{"b1", "b2", "b3"} {
		b := &station.Batch{Name: name, Created: t0.Add(time.Duration(i) * time.Hour)}
		if err := s.CreateBatch(ctx, b); err != nil {
			t.Fatal(err)
		}
		if name != "b3" {
			if err := s.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, b.ID)
	}
	ofBatches := func(bs []*station.Batch) []int64 {
		var got []int64
		for _, b := range bs {
			got = append(got, b.ID)
		}
		return got
	}
	for _, tt := range []struct {
		f    station.BatchFilter
		want []int64
	}{
		{station.BatchFilter{}, []int64{ids[2], ids[1], ids[0]}},
		{station.BatchFilter{State: station.BatchSealed}, []int64{ids[1], ids[0]}},
		{station.BatchFilter{State: station.BatchOpen}, []int64{ids[2]}},
		{station.BatchFilter{Limit: 1}, []int64{ids[2]}},
		{station.BatchFilter{State: station.BatchPushed}, nil},
	} {
		bs, err := s.Batches(ctx, tt.f)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tt.want, ofBatches(bs)); diff != "" {
			t.Errorf("Batches(%+v) (-want +got):\n%s", tt.f, diff)
		}
	}
}

func TestBatchConflicts(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	addUnits(t, s, "SN1", "SN2")
	a := createBatch(t, s, "a", station.BatchOpen)

	t.Run("second open batch", func(t *testing.T) {
		err := s.CreateBatch(ctx, &station.Batch{Name: "b"})
		wantKind(t, "CreateBatch of a second open batch", err, station.KindConflict)
		if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("batch %d (a) is open", a.ID)) {
			t.Errorf("message %q does not name the open batch", err)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		wantKind(t, "CreateBatch without a name", s.CreateBatch(ctx, &station.Batch{State: station.BatchSealed}), station.KindInvalid)
		wantKind(t, "CreateBatch in an unknown state", s.CreateBatch(ctx, &station.Batch{Name: "x", State: "closed"}), station.KindInvalid)
		wantKind(t, "CreateBatch with a bad template", s.CreateBatch(ctx, &station.Batch{Name: "x", State: station.BatchSealed,
			Template: station.EnrollmentTemplate{ProvisioningStatus: "on"}}), station.KindInvalid)
	})
	if err := s.AddUnit(ctx, a.ID, "SN1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Transition(ctx, a.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	b := createBatch(t, s, "b", station.BatchOpen) // a is sealed: b may open

	t.Run("add to a sealed batch", func(t *testing.T) {
		wantKind(t, "AddUnit to a sealed batch", s.AddUnit(ctx, a.ID, "SN2"), station.KindConflict)
	})
	t.Run("unit in two batches", func(t *testing.T) {
		err := s.AddUnit(ctx, b.ID, "SN1")
		wantKind(t, "AddUnit of a unit in another batch", err, station.KindConflict)
		if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("in batch %d", a.ID)) {
			t.Errorf("message %q does not name the unit's batch", err)
		}
	})
	t.Run("not found", func(t *testing.T) {
		wantKind(t, "AddUnit of an unrecorded unit", s.AddUnit(ctx, b.ID, "SN9"), station.KindNotFound)
		wantKind(t, "AddUnit to no batch", s.AddUnit(ctx, 999, "SN2"), station.KindNotFound)
		_, err := s.Batch(ctx, 999)
		wantKind(t, "Batch(999)", err, station.KindNotFound)
		_, err = s.BatchUnits(ctx, 999)
		wantKind(t, "BatchUnits(999)", err, station.KindNotFound)
		wantKind(t, "Transition(999)", s.Transition(ctx, 999, station.BatchSealed, station.BatchPushing), station.KindNotFound)
	})
	t.Run("transitions", func(t *testing.T) {
		wantKind(t, "Transition open→pushed", s.Transition(ctx, b.ID, station.BatchOpen, station.BatchPushed), station.KindConflict)
		// a is sealed, not open: the compare and set fails.
		err := s.Transition(ctx, a.ID, station.BatchOpen, station.BatchSealed)
		wantKind(t, "Transition of a batch not in from", err, station.KindConflict)
		if err != nil && !strings.Contains(err.Error(), "is sealed, not open") {
			t.Errorf("message %q does not say the batch's state", err)
		}
		wantKind(t, "Transition to an unknown state", s.Transition(ctx, a.ID, station.BatchSealed, "gone"), station.KindInvalid)
	})
	if err := s.AddUnit(ctx, b.ID, "SN2"); err != nil {
		t.Errorf("AddUnit to the open batch: %v", err)
	}
}

func TestBatchAddUnitConcurrent(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	const workers, perWorker = 8, 10
	var serials []string
	for w := range workers {
		for i := range perWorker {
			serials = append(serials, fmt.Sprintf("W%d-%02d", w, i))
		}
	}
	addUnits(t, s, serials...)
	b := createBatch(t, s, "race", station.BatchOpen)

	// Every worker adds every unit: each unit lands once, every call succeeds
	// (the same batch twice does nothing), and readers run meanwhile.
	var wg sync.WaitGroup
	errc := make(chan error, workers*len(serials)+workers)
	for w := range workers {
		wg.Go(func() {
			for i := range serials {
				serial := serials[(i+w*perWorker)%len(serials)]
				if err := s.AddUnit(ctx, b.ID, serial); err != nil {
					errc <- fmt.Errorf("worker %d: AddUnit(%s): %w", w, serial, err)
				}
				if i%10 == 0 {
					if _, err := s.Batches(ctx, station.BatchFilter{}); err != nil {
						errc <- err
					}
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	got, err := s.Batch(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Units != len(serials) {
		t.Errorf("batch has %d units; want %d", got.Units, len(serials))
	}
	units, err := s.BatchUnits(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(units) != len(serials) {
		t.Errorf("BatchUnits: %d units; want %d", len(units), len(serials))
	}
}

// TestBatchOneOpenConcurrent races 8 goroutines to open a batch: one wins.
func TestBatchOneOpenConcurrent(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	var wg sync.WaitGroup
	results := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() { results <- s.CreateBatch(ctx, &station.Batch{Name: fmt.Sprint("b", i)}) })
	}
	wg.Wait()
	close(results)
	var won int
	for err := range results {
		switch station.KindOf(err) {
		case station.KindOther:
			if err == nil {
				won++
				continue
			}
			t.Error(err)
		case station.KindConflict:
		default:
			t.Error(err)
		}
	}
	if won != 1 {
		t.Errorf("%d batches opened; want 1", won)
	}
}

// TestMigrateFromVersion2 opens a database that an older kiln wrote (schema
// version 2, with a run and a unit) and checks that the batch migration keeps
// them and that the unit can join a batch.
func TestMigrateFromVersion2(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "kiln.db")
	db := rawDB(t, "file:"+path+"?_foreign_keys=1")
	for _, name := range []string{"0001_init.sql", "0002_endtoend.sql"} {
		b, err := os.ReadFile(filepath.Join("migrations", name))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.ExecContext(ctx, string(b)); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if _, err := db.ExecContext(ctx, `PRAGMA user_version = 2`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO runs (id, serial, started, result, dps_status) VALUES (7, 'OLD1', '2025-01-02T03:04:05.000000000Z', 'pass', 'assigned')`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO units (serial, registration_id, ek_hash, run_id, created) VALUES ('OLD1', 'reg-old1', 'abc', 7, '2025-01-02T03:04:06.000000000Z')`); err != nil {
		t.Fatal(err)
	}
	db.Close()

	s := openAt(t, path)
	if _, v, err := sqlite.Pragmas(ctx, s, "user_version"); err != nil || v != fmt.Sprint(sqlite.SchemaVersion()) {
		t.Fatalf("user_version %s, %v; want %d", v, err, sqlite.SchemaVersion())
	}
	r, err := s.Run(ctx, 7)
	if err != nil {
		t.Fatal(err)
	}
	if r.Serial != "OLD1" || r.Result != station.ResultPass || r.DPSStatus != "assigned" {
		t.Errorf("run 7 after migration: %+v", r)
	}
	u, err := s.UnitBySerial(ctx, "OLD1")
	if err != nil {
		t.Fatal(err)
	}
	if u.RegistrationID != "reg-old1" || u.RunID != 7 {
		t.Errorf("unit OLD1 after migration: %+v", u)
	}
	b := createBatch(t, s, "after upgrade", station.BatchOpen)
	if err := s.AddUnit(ctx, b.ID, "OLD1"); err != nil {
		t.Fatal(err)
	}
}

// fakeLink and fakeEndorser stand in for a DUT whose TPM has an EK.
type fakeLink struct{ serial string }

func (l fakeLink) Info(context.Context) (station.DeviceInfo, error) {
	return station.DeviceInfo{Serial: l.serial, Model: "K1", Capabilities: []string{"tpm"}, Protocol: 1}, nil
}
func (fakeLink) TPM(context.Context, []byte) ([]byte, error) { return nil, nil }
func (fakeLink) Stats() station.LinkStats                    { return station.LinkStats{} }
func (fakeLink) Close() error                                { return nil }

type fakeEndorser struct{}

func (fakeEndorser) Endorsement(_ context.Context, l station.Link) (*station.Endorsement, error) {
	return &station.Endorsement{EKPublic: []byte("EK of " + l.(fakeLink).serial)}, nil
}

// brokenBatches fails AddUnit as a store that went away would.
type brokenBatches struct{ station.BatchStore }

func (brokenBatches) AddUnit(context.Context, int64, string) error {
	return station.Errorf("add unit", station.KindUnavailable, "disk is full")
}

func provisioner(s *sqlite.Store, bs station.BatchStore, now time.Time) *station.Provisioner {
	return &station.Provisioner{
		Store:    s,
		Batches:  bs,
		Dial:     func(_ context.Context, port string) (station.Link, error) { return fakeLink{serial: port}, nil },
		Endorser: fakeEndorser{},
		Profile:  station.Profile{Station: "line-1", Method: station.MethodTPM, RegID: station.RegIDFromEK, EKCertPolicy: station.EKCertOff},
		Now:      func() time.Time { return now },
	}
}

func TestProvisionJoinsOpenBatch(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	p := provisioner(s, s, t0)
	for _, serial := range []string{"SN1", "SN2"} {
		if _, err := p.Provision(ctx, station.Request{Port: serial, Operator: "ada"}); err != nil {
			t.Fatalf("Provision(%s): %v", serial, err)
		}
	}
	b, err := s.OpenBatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b.Name != "2025-03-14" || b.Units != 2 {
		t.Errorf("open batch %q with %d units; want 2025-03-14 with 2", b.Name, b.Units)
	}

	// Sealed: the next unit opens a new batch.
	if err := s.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}
	r, err := p.Provision(ctx, station.Request{Port: "SN3"})
	if err != nil {
		t.Fatal(err)
	}
	b2, err := s.OpenBatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b2.ID == b.ID || b2.Units != 1 {
		t.Errorf("after sealing: open batch %d with %d units; want a new batch with 1", b2.ID, b2.Units)
	}
	if last := r.Steps[len(r.Steps)-1]; !strings.Contains(last.Detail, fmt.Sprintf("batch %d", b2.ID)) {
		t.Errorf("record step detail %q does not name the batch", last.Detail)
	}
}

func TestProvisionBatchFailure(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	p := provisioner(s, brokenBatches{s}, t0)
	r, err := p.Provision(ctx, station.Request{Port: "SN1"})
	if err == nil {
		t.Fatal("Provision with a failing batch store: no error")
	}
	wantKind(t, "Provision", err, station.KindUnavailable)
	if !strings.Contains(err.Error(), "unit SN1 is recorded") {
		t.Errorf("error %q does not say the unit is recorded", err)
	}
	if r == nil || r.Result != station.ResultFail {
		t.Fatalf("run %+v; want a failed run", r)
	}
	if _, err := s.UnitBySerial(ctx, "SN1"); err != nil {
		t.Errorf("the unit is not recorded: %v", err)
	}
	stored, err := s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Result != station.ResultFail || !strings.Contains(stored.Error, "is recorded") {
		t.Errorf("stored run: result %s, error %q", stored.Result, stored.Error)
	}
}
