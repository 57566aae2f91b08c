package ui_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
	"github.com/kilnworks/kiln/ui"
)

// batchActions is the Batches screen's backend over a real SQLite store:
// listing, units and sealing are station/sqlite's BatchStore. The push
// engine (cloudsync) is not on this branch, so Push, Export, Enable and
// UnitErrors are a test double with the engine's contract: it moves the
// batch through the store's lifecycle (sealed → pushing → pushed, back to
// sealed when units failed; sealed → exported), handles units one at a
// time, each only after the test releases it on step (when step is set),
// fails the serials in fail, resumes where it stopped, and writes real
// export files.
type batchActions struct {
	*sqlite.Store
	step chan struct{} // nil: units go through without waiting

	mu      sync.Mutex
	fail    map[string]string // serial → why it fails
	done    map[int64]map[string]bool
	errs    map[int64][]ui.UnitError
	enabled map[int64]int
	pushes  int
}

func newBatchActions(s *sqlite.Store) *batchActions {
	return &batchActions{Store: s, fail: map[string]string{}, done: map[int64]map[string]bool{}, errs: map[int64][]ui.UnitError{}, enabled: map[int64]int{}}
}

var _ ui.BatchActions = (*batchActions)(nil)

func (a *batchActions) Seal(ctx context.Context, id int64) error {
	return a.Transition(ctx, id, station.BatchOpen, station.BatchSealed)
}

func (a *batchActions) ExportFormats() []ui.ExportFormat {
	return []ui.ExportFormat{{ID: "csv", Label: "CSV", Ext: ".csv"}, {ID: "dps-json", Label: "DPS bulk JSON", Ext: ".json"}}
}

func (a *batchActions) UnitErrors(_ context.Context, id int64) ([]ui.UnitError, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.errs[id]), nil
}

// each handles the units of batch id one by one with f, reporting progress
// as the engine would (Elapsed: 1 s per unit handled in this call).
func (a *batchActions) each(ctx context.Context, id int64, progress func(ui.BatchProgress), f func(u *station.Unit) error) (failed int, err error) {
	units, err := a.BatchUnits(ctx, id)
	if err != nil {
		return 0, err
	}
	a.mu.Lock()
	if a.done[id] == nil {
		a.done[id] = map[string]bool{}
	}
	done := a.done[id]
	a.errs[id] = nil
	n := 0
	for _, u := range units {
		if done[u.Serial] {
			n++
		}
	}
	a.mu.Unlock()
	handled := 0
	progress(ui.BatchProgress{Done: n, Total: len(units)})
	for _, u := range units {
		a.mu.Lock()
		skip := done[u.Serial]
		a.mu.Unlock()
		if skip {
			continue
		}
		if a.step != nil {
			select {
			case <-a.step:
			case <-ctx.Done():
				return failed, ctx.Err()
			}
		}
		handled++
		if ferr := f(u); ferr != nil {
			failed++
			a.mu.Lock()
			a.errs[id] = append(a.errs[id], ui.UnitError{Serial: u.Serial, RegistrationID: u.RegistrationID, Kind: station.KindOf(ferr), Message: ferr.Error()})
			a.mu.Unlock()
		} else {
			n++
			a.mu.Lock()
			done[u.Serial] = true
			a.mu.Unlock()
		}
		progress(ui.BatchProgress{Done: n, Failed: failed, Total: len(units), Elapsed: time.Duration(handled) * time.Second})
	}
	return failed, nil
}

func (a *batchActions) Push(ctx context.Context, id int64, progress func(ui.BatchProgress)) error {
	b, err := a.Batch(ctx, id)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.pushes++
	a.mu.Unlock()
	if b.State == station.BatchSealed {
		if err := a.Transition(ctx, id, station.BatchSealed, station.BatchPushing); err != nil {
			return err
		}
	}
	failed, err := a.each(ctx, id, progress, func(u *station.Unit) error {
		a.mu.Lock()
		why := a.fail[u.Serial]
		a.mu.Unlock()
		if why != "" {
			return station.Errorf("enroll "+u.Serial, station.KindInvalid, "%s", why)
		}
		return nil
	})
	if err != nil {
		return err // stopped: the batch stays pushing, and a push resumes it
	}
	if failed > 0 {
		if err := a.Transition(context.WithoutCancel(ctx), id, station.BatchPushing, station.BatchSealed); err != nil {
			return err
		}
		return station.Errorf("push batch", station.KindInvalid, "%d units were not enrolled: see the unit errors, fix them and push again", failed)
	}
	return a.Transition(context.WithoutCancel(ctx), id, station.BatchPushing, station.BatchPushed)
}

func (a *batchActions) Export(ctx context.Context, id int64, format, path string, handover bool, progress func(ui.BatchProgress)) error {
	if format != "csv" && format != "dps-json" {
		return station.Errorf("export batch", station.KindInvalid, "unknown format %q", format)
	}
	var lines []string
	a.mu.Lock()
	delete(a.done, id) // an export handles every unit again
	a.mu.Unlock()
	if _, err := a.each(ctx, id, progress, func(u *station.Unit) error {
		lines = append(lines, u.Serial+","+u.RegistrationID)
		return nil
	}); err != nil {
		return err
	}
	if err := os.WriteFile(path, []byte("serial,registration_id\n"+strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		return station.E("export batch", station.KindInvalid, err)
	}
	if !handover {
		return nil
	}
	return a.Transition(ctx, id, station.BatchSealed, station.BatchExported)
}

func (a *batchActions) Enable(ctx context.Context, id int64, progress func(ui.BatchProgress)) error {
	a.mu.Lock()
	delete(a.done, id)
	a.mu.Unlock()
	_, err := a.each(ctx, id, progress, func(*station.Unit) error {
		a.mu.Lock()
		a.enabled[id]++
		a.mu.Unlock()
		return nil
	})
	return err
}

// batchT0 is when the test's batches were opened and units recorded.
var batchT0 = time.Date(2025, 3, 4, 7, 30, 0, 0, time.UTC)

// batchStore opens a SQLite store with batches: an open one with the
// serials of open, and one sealed batch with the serials of sealed.
func batchStore(t *testing.T, sealed, open []string) (*sqlite.Store, int64, int64) {
	t.Helper()
	ctx := t.Context()
	s, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	s.Now = func() time.Time { return batchT0.Add(time.Hour) }
	var ids []int64
	for i, serials := range [][]string{sealed, open} {
		b := &station.Batch{Name: fmt.Sprintf("line-1 lot %d", i+1), TargetID: "contoso-dps", Created: batchT0}
		if err := s.CreateBatch(ctx, b); err != nil {
			t.Fatal(err)
		}
		for j, serial := range serials {
			r := &station.Run{Serial: serial, Port: "/dev/ttyACM0", Station: "line-1", Operator: "alice", Method: station.MethodTPM, Started: batchT0}
			if err := s.CreateRun(ctx, r); err != nil {
				t.Fatal(err)
			}
			r.Result, r.Finished, r.RegistrationID = station.ResultPass, batchT0.Add(time.Second), "reg-"+strings.ToLower(serial)
			if err := s.FinishRun(ctx, r); err != nil {
				t.Fatal(err)
			}
			ek := []byte("EK of " + serial)
			u := &station.Unit{Serial: serial, RegistrationID: r.RegistrationID, Method: station.MethodTPM, EKHash: station.EKHash(ek), EKPublic: ek,
				RunID: r.ID, Station: "line-1", Operator: "alice", Created: batchT0.Add(time.Duration(j+1) * time.Minute)}
			if err := s.RecordUnit(ctx, u); err != nil {
				t.Fatal(err)
			}
			if err := s.AddUnit(ctx, b.ID, serial); err != nil {
				t.Fatal(err)
			}
		}
		if i == 0 {
			if err := s.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, b.ID)
	}
	return s, ids[0], ids[1]
}

func serials(prefix string, n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("%s%04d", prefix, i+1))
	}
	return out
}

// newBatchesStation builds the GUI with the Batches screen over a, and
// shows that screen.
func newBatchesStation(t *testing.T, a *batchActions, role ui.Role) (*ui.UI, fyne.Window, *loop) {
	t.Helper()
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, w, l := newStation(t, p, func(c *ui.Config) {
		c.Batches = a
		c.Role = role
		c.ExportDir = "/exports"
	})
	u.Tabs.SelectIndex(1)
	l.until(t, 5*time.Second, "the batches", func() bool { return u.Batches.Selected() != nil })
	l.settle()
	return u, w, l
}

func batchState(t *testing.T, s *sqlite.Store, id int64) station.BatchState {
	t.Helper()
	b, err := s.Batch(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return b.State
}

// TestBatchesTechnicianSees: a technician sees the batches with their
// units but cannot act on them.
func TestBatchesTechnicianSees(t *testing.T) {
	s, sealed, open := batchStore(t, serials("SN-A", 3), serials("SN-B", 2))
	a := newBatchActions(s)
	u, _, l := newBatchesStation(t, a, ui.RoleTechnician)
	b := u.Batches
	var got []string
	for _, x := range b.Listed() {
		got = append(got, fmt.Sprintf("%d %s %d", x.ID, x.State, x.Units))
	}
	if want := []string{fmt.Sprintf("%d open 2", open), fmt.Sprintf("%d sealed 3", sealed)}; !slices.Equal(got, want) {
		t.Errorf("listed %v, want %v (newest first, with unit counts)", got, want)
	}
	if sel := b.Selected(); sel.ID != open {
		t.Errorf("selected batch %d, want the newest (%d)", sel.ID, open)
	}
	for name, btn := range map[string]interface{ Disabled() bool }{"Seal": b.Seal, "Push": b.Push, "Export": b.Export, "Enable": b.Enable} {
		if !btn.Disabled() {
			t.Errorf("%s is enabled for a technician", name)
		}
	}
	test.Tap(b.Seal)
	l.settle()
	if st := batchState(t, s, open); st != station.BatchOpen {
		t.Errorf("a technician sealed the batch: %s", st)
	}
}

// TestBatchesSealPushWithProgress: a supervisor seals the open batch, then
// pushes the sealed one; the progress bar and the live counts follow the
// engine unit by unit without blocking the UI; a unit that fails is listed
// with its reason, and a second push resumes with the rest.
func TestBatchesSealPushWithProgress(t *testing.T) {
	s, sealed, open := batchStore(t, serials("SN-A", 5), serials("SN-B", 2))
	a := newBatchActions(s)
	a.step = make(chan struct{})
	a.fail["SN-A0004"] = "the target refused the enrollment of SN-A0004 (registration ID reg-sn-a0004 exists with another attestation): remove it in the target, then push again"
	u, w, l := newBatchesStation(t, a, ui.RoleSupervisor)
	b := u.Batches

	// Seal the open batch.
	if b.Seal.Disabled() {
		t.Fatal("Seal is disabled on the open batch for a supervisor")
	}
	test.Tap(b.Seal)
	l.until(t, 5*time.Second, "sealed", func() bool { return strings.Contains(b.Status(), "sealed by alice") })
	if st := batchState(t, s, open); st != station.BatchSealed {
		t.Fatalf("after Seal the batch is %s, want sealed", st)
	}

	// Push the other sealed batch.
	b.Select(sealed)
	l.until(t, 5*time.Second, "the sealed batch", func() bool { return b.Selected().ID == sealed && !b.Push.Disabled() })
	within(t, 2*time.Second, "tapping Push", func() { test.Tap(b.Push) })
	if !b.Busy() || !b.Push.Disabled() {
		t.Errorf("during the push: busy %v, Push enabled %v", b.Busy(), !b.Push.Disabled())
	}
	for range 2 {
		a.step <- struct{}{}
	}
	l.until(t, 5*time.Second, "2 units done", func() bool { _, c := b.JobText(); return strings.HasPrefix(c, "2 of 5 done") })
	title, counts := b.JobText()
	if want := "2 of 5 done · 0 failed · 3 remaining · 1.0 units/s · about 3s left"; counts != want {
		t.Errorf("counts %q, want %q", counts, want)
	}
	if !strings.HasPrefix(title, fmt.Sprintf("Pushing batch %d", sealed)) {
		t.Errorf("job title %q", title)
	}
	if got := b.Progress.Value; got != 2 || b.Progress.Max != 5 {
		t.Errorf("progress %v of %v, want 2 of 5", got, b.Progress.Max)
	}
	// The UI stays live while the engine works: other screens answer.
	within(t, 2*time.Second, "switching to Station", func() { u.Tabs.SelectIndex(0) })
	within(t, 2*time.Second, "switching back", func() { u.Tabs.SelectIndex(1) })
	l.settle()
	assertMarkup(t, "batches_push.xml", w)

	for range 3 {
		a.step <- struct{}{}
	}
	l.until(t, 5*time.Second, "the push to end", func() bool { return !b.Busy() && len(b.UnitErrors()) == 1 })
	if st := b.Status(); !strings.Contains(st, "was not pushed") || !strings.Contains(st, "1 units were not enrolled") {
		t.Errorf("status %q", st)
	}
	if e := b.UnitErrors()[0]; e.Serial != "SN-A0004" || !strings.Contains(e.Message, "remove it in the target") {
		t.Errorf("unit error %+v", e)
	}
	if _, c := b.JobText(); !strings.HasPrefix(c, "4 of 5 done · 1 failed · 0 remaining") {
		t.Errorf("final counts %q", c)
	}
	if st := batchState(t, s, sealed); st != station.BatchSealed {
		t.Errorf("after a push with a failed unit the batch is %s, want sealed", st)
	}

	// Fixed in the target: the next push handles the one unit left.
	a.mu.Lock()
	delete(a.fail, "SN-A0004")
	a.mu.Unlock()
	l.until(t, 5*time.Second, "Push enabled", func() bool { return !b.Push.Disabled() })
	test.Tap(b.Push)
	a.step <- struct{}{}
	l.until(t, 5*time.Second, "pushed", func() bool { return !b.Busy() && b.Selected().State == station.BatchPushed })
	if _, c := b.JobText(); !strings.HasPrefix(c, "5 of 5 done · 0 failed · 0 remaining") {
		t.Errorf("counts after resuming %q", c)
	}
	if len(b.UnitErrors()) != 0 {
		t.Errorf("unit errors after a clean push: %+v", b.UnitErrors())
	}
	if b.Enable.Disabled() || !b.Push.Disabled() || !b.Seal.Disabled() {
		t.Errorf("on a pushed batch: Enable enabled %v, Push enabled %v, Seal enabled %v; want only Enable", !b.Enable.Disabled(), !b.Push.Disabled(), !b.Seal.Disabled())
	}
	test.Tap(b.Enable)
	for range 5 {
		a.step <- struct{}{}
	}
	l.until(t, 5*time.Second, "enabled", func() bool { return !b.Busy() && strings.Contains(b.Status(), "enabled by alice") })
	a.mu.Lock()
	enabled := a.enabled[sealed]
	a.mu.Unlock()
	if enabled != 5 {
		t.Errorf("%d enrollments enabled, want 5", enabled)
	}
}

// TestBatchesStopAndResume: Stop cancels a push midway; the batch stays
// pushing and Resume push finishes it.
func TestBatchesStopAndResume(t *testing.T) {
	s, sealed, _ := batchStore(t, serials("SN-A", 4), nil)
	a := newBatchActions(s)
	a.step = make(chan struct{})
	u, _, l := newBatchesStation(t, a, ui.RoleSupervisor)
	b := u.Batches
	b.Select(sealed)
	l.until(t, 5*time.Second, "the sealed batch", func() bool { return b.Selected().ID == sealed && !b.Push.Disabled() })
	test.Tap(b.Push)
	a.step <- struct{}{}
	l.until(t, 5*time.Second, "1 done", func() bool { _, c := b.JobText(); return strings.HasPrefix(c, "1 of 4 done") })
	test.Tap(b.Stop)
	l.until(t, 5*time.Second, "stopped", func() bool { return !b.Busy() && strings.HasPrefix(b.Status(), "Stopped") })
	if st := b.Status(); !strings.Contains(st, "1 of 4 done") {
		t.Errorf("status %q", st)
	}
	l.until(t, 5*time.Second, "Resume push", func() bool { return b.Push.Text == "Resume push" && !b.Push.Disabled() })
	if st := batchState(t, s, sealed); st != station.BatchPushing {
		t.Fatalf("a stopped push left the batch %s, want pushing", st)
	}
	test.Tap(b.Push)
	for range 3 {
		a.step <- struct{}{}
	}
	l.until(t, 5*time.Second, "pushed", func() bool { return !b.Busy() && b.Selected().State == station.BatchPushed })
	if a.pushes != 2 {
		t.Errorf("%d pushes, want 2", a.pushes)
	}
}

// TestBatchesExport: a sealed batch is exported to the file given, in the
// format picked; handed over, the batch becomes exported.
func TestBatchesExport(t *testing.T) {
	s, sealed, _ := batchStore(t, serials("SN-A", 3), nil)
	a := newBatchActions(s)
	u, _, l := newBatchesStation(t, a, ui.RoleSupervisor)
	b := u.Batches
	b.Select(sealed)
	l.until(t, 5*time.Second, "the sealed batch", func() bool { return b.Selected().ID == sealed && !b.Export.Disabled() })
	if want := fmt.Sprintf("/exports/kiln-batch-%d-line-1_lot_1.csv", sealed); b.ExportPath.Text != want {
		t.Errorf("suggested path %q, want %q", b.ExportPath.Text, want)
	}
	b.ExportFormat.SetSelected("DPS bulk JSON")
	if !strings.HasSuffix(b.ExportPath.Text, ".json") {
		t.Errorf("the suggested path %q does not follow the format", b.ExportPath.Text)
	}
	path := filepath.Join(t.TempDir(), "batch.csv")
	b.ExportPath.SetText(path)
	b.ExportFormat.SetSelected("CSV")
	if b.ExportPath.Text != path {
		t.Errorf("the typed path was replaced by %q", b.ExportPath.Text)
	}
	if b.Handover.Disabled() {
		t.Fatal("Hand over is disabled on a sealed batch")
	}
	test.Tap(b.Handover)
	test.Tap(b.Export)
	l.until(t, 5*time.Second, "exported", func() bool { return !b.Busy() && b.Selected().State == station.BatchExported })
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(data), "SN-A"); got != 3 {
		t.Errorf("the export holds %d units, want 3:\n%s", got, data)
	}
	if st := b.Status(); !strings.Contains(st, "exported by alice: 3 units") {
		t.Errorf("status %q", st)
	}
}

// unreachable makes the engine fail as an unreachable target does.
type unreachable struct{ *batchActions }

func (a unreachable) Push(context.Context, int64, func(ui.BatchProgress)) error {
	return station.Errorf("push batch", station.KindUnavailable, "the DPS target contoso-dps did not answer: check the network, then push again")
}

// TestBatchesPushUnavailable: an engine error is shown with its advice and
// the batch can be pushed again.
func TestBatchesPushUnavailable(t *testing.T) {
	s, sealed, _ := batchStore(t, serials("SN-A", 2), nil)
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Batches = unreachable{newBatchActions(s)}
		c.Role = ui.RoleSupervisor
	})
	b := u.Batches
	u.Tabs.SelectIndex(1)
	b.Select(sealed)
	l.until(t, 5*time.Second, "the sealed batch", func() bool { return b.Selected() != nil && b.Selected().ID == sealed && !b.Push.Disabled() })
	test.Tap(b.Push)
	l.until(t, 5*time.Second, "the error", func() bool { return !b.Busy() && strings.Contains(b.Status(), "did not answer") })
	l.until(t, 5*time.Second, "Push enabled again", func() bool { return !b.Push.Disabled() })
	if st := batchState(t, s, sealed); st != station.BatchSealed {
		t.Errorf("after an unreachable target the batch is %s, want sealed", st)
	}
}

// phased reports a push in two phases, as cloudsync does: the push, then
// the read-back of a sample, each with its own counts.
type phased struct {
	*batchActions
	step chan ui.BatchProgress
}

func (a phased) Push(ctx context.Context, id int64, progress func(ui.BatchProgress)) error {
	for {
		select {
		case p, ok := <-a.step:
			if !ok {
				if err := a.Transition(ctx, id, station.BatchSealed, station.BatchPushing); err != nil {
					return err
				}
				return a.Transition(ctx, id, station.BatchPushing, station.BatchPushed)
			}
			progress(p)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// TestBatchesPushPhases: the counts name the phase, and the rate and the
// time left are the phase's own.
func TestBatchesPushPhases(t *testing.T) {
	s, sealed, _ := batchStore(t, serials("SN-A", 4), nil)
	a := phased{newBatchActions(s), make(chan ui.BatchProgress)}
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Batches = a
		c.Role = ui.RoleSupervisor
	})
	b := u.Batches
	u.Tabs.SelectIndex(1)
	b.Select(sealed)
	l.until(t, 5*time.Second, "the sealed batch", func() bool { return b.Selected() != nil && b.Selected().ID == sealed && !b.Push.Disabled() })
	test.Tap(b.Push)
	for _, tt := range []struct {
		p    ui.BatchProgress
		want string
	}{
		{ui.BatchProgress{Phase: "push", Total: 4}, "push: 0 of 4 done · 0 failed · 4 remaining"},
		{ui.BatchProgress{Phase: "push", Done: 2, Total: 4, Elapsed: time.Second}, "push: 2 of 4 done · 0 failed · 2 remaining · 2.0 units/s · about 1s left"},
		{ui.BatchProgress{Phase: "push", Done: 4, Total: 4, Elapsed: 2 * time.Second}, "push: 4 of 4 done · 0 failed · 0 remaining · 2.0 units/s"},
		{ui.BatchProgress{Phase: "verify", Total: 2, Elapsed: 10 * time.Second}, "verify: 0 of 2 done · 0 failed · 2 remaining"},
		{ui.BatchProgress{Phase: "verify", Done: 1, Total: 2, Elapsed: 14 * time.Second}, "verify: 1 of 2 done · 0 failed · 1 remaining · 0.2 units/s · about 4s left"},
	} {
		a.step <- tt.p
		l.until(t, 5*time.Second, tt.want, func() bool { _, c := b.JobText(); return c == tt.want })
	}
	if b.Progress.Value != 1 || b.Progress.Max != 2 {
		t.Errorf("progress %v of %v in the verify phase, want 1 of 2", b.Progress.Value, b.Progress.Max)
	}
	close(a.step)
	l.until(t, 5*time.Second, "pushed", func() bool { return !b.Busy() && b.Selected().State == station.BatchPushed })
	// At the end, each phase's counts; the status counts the batch's units.
	if _, c := b.JobText(); c != "push: 4 of 4 done, 0 failed · verify: 1 of 2 done, 0 failed" {
		t.Errorf("final counts %q", c)
	}
	if st := b.Status(); !strings.HasSuffix(st, "pushed by alice: 4 units.") {
		t.Errorf("status %q", st)
	}
}
