package sqlite_test

import (
	"context"
	"database/sql"
	"errors"
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

// open opens a store on a new file in a temporary directory.
func open(t testing.TB) *sqlite.Store {
	t.Helper()
	return openAt(t, filepath.Join(t.TempDir(), "kiln.db"))
}

func openAt(t testing.TB, path string) *sqlite.Store {
	t.Helper()
	s, err := sqlite.Open(context.Background(), path)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// t0 has nanoseconds and a zone other than UTC, to prove exact round trips.
var t0 = time.Date(2025, 3, 14, 9, 26, 53, 589793238, time.FixedZone("CET", 3600))

func newRun(serial string, started time.Time) *station.Run {
	return &station.Run{
		Serial:   serial,
		Port:     "/dev/ttyUSB0",
		Station:  "line-1",
		Operator: "ada",
		Method:   station.MethodTPM,
		Started:  started,
	}
}

func tpmSteps(started time.Time) []station.Step {
	var steps []station.Step
	at := started
	for i, name := range station.TPMSteps {
		d := time.Duration(i+1)*time.Millisecond + 123*time.Nanosecond
		st := station.Step{Name: name, Status: station.StepOK, Started: at, Duration: d}
		switch name {
		case station.StepValidateEK:
			st.Status, st.Detail = station.StepWarn, "no EK certificate"
		case station.StepIdentify:
			st.Detail = "model K1, firmware 1.2.3"
		}
		steps = append(steps, st)
		at = at.Add(d)
	}
	return steps
}

func finish(r *station.Run, result station.Result) {
	r.Result = result
	r.Finished = r.Started.Add(1500*time.Millisecond + 7)
	r.Model, r.Firmware = "K1", "1.2.3"
	r.RegistrationID = "reg-" + strings.ToLower(r.Serial)
	r.EKHash = station.EKHash([]byte("ek of " + r.Serial))
	r.BytesOut, r.BytesIn = 4096, 8192
	if result == station.ResultFail {
		r.ErrorKind, r.Error = station.KindUnavailable, "DUT did not answer: reseat the cable"
	}
}

func TestRunRoundTrip(t *testing.T) {
	ctx := t.Context()
	s := open(t)

	r := newRun("SN0001", t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	if r.ID == 0 || r.Result != station.ResultRunning {
		t.Fatalf("after CreateRun: ID %d, Result %q; want an ID and running", r.ID, r.Result)
	}
	got, err := s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("running run (-want +got):\n%s", diff)
	}

	steps := tpmSteps(t0)
	for _, st := range steps {
		if err := s.AddStep(ctx, r.ID, st); err != nil {
			t.Fatal(err)
		}
	}
	finish(r, station.ResultPass)
	if err := s.FinishRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	r.Steps = steps

	got, err = s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("finished run (-want +got):\n%s", diff)
	}
	if got.Started.Location() != time.UTC || got.Started.Nanosecond() != t0.Nanosecond() {
		t.Errorf("Started = %v; want %v in UTC", got.Started, t0)
	}
	if got.Duration() != r.Duration() {
		t.Errorf("Duration() = %v; want %v", got.Duration(), r.Duration())
	}
}

func TestCreateRunWithSteps(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	r := newRun("SN0002", t0)
	r.Steps = tpmSteps(t0)[:2]
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	extra := station.Step{Name: "extra", Status: station.StepSkip} // zero time, zero duration
	if err := s.AddStep(ctx, r.ID, extra); err != nil {
		t.Fatal(err)
	}
	r.Steps = append(r.Steps, extra)
	got, err := s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestCreateRunDefaults(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	now := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	s.Now = func() time.Time { return now }
	r := &station.Run{Serial: "SN0003"}
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	if !r.Started.Equal(now) || r.Result != station.ResultRunning {
		t.Errorf("Started %v, Result %q; want %v, running", r.Started, r.Result, now)
	}
	if err := s.FinishRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	if !r.Finished.Equal(now) {
		t.Errorf("Finished %v; want %v", r.Finished, now)
	}
}

func TestFinishRun(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	r := newRun("SN0010", t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	finish(r, station.ResultFail)
	if err := s.FinishRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	got, err := s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("failed run (-want +got):\n%s", diff)
	}

	// A second FinishRun overwrites the final fields (e.g. a re-test).
	finish(r, station.ResultPass)
	r.ErrorKind, r.Error = station.KindOther, ""
	r.Serial = "SN0010-B" // the serial the DUT reported
	if err := s.FinishRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	got, err = s.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("re-finished run (-want +got):\n%s", diff)
	}
}

func TestNotFound(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	r := newRun("SN0020", t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	missing := r.ID + 41
	tests := []struct {
		name string
		call func() error
		want string
	}{
		{"Run", func() error { _, err := s.Run(ctx, missing); return err }, fmt.Sprintf("no run %d", missing)},
		{"AddStep", func() error { return s.AddStep(ctx, missing, station.Step{Name: "x"}) }, fmt.Sprintf("no run %d", missing)},
		{"FinishRun", func() error { return s.FinishRun(ctx, &station.Run{ID: missing}) }, fmt.Sprintf("no run %d", missing)},
		{"UnitBySerial", func() error { _, err := s.UnitBySerial(ctx, "NOPE"); return err }, "serial NOPE"},
		{"UnitByEKHash", func() error { _, err := s.UnitByEKHash(ctx, "abcd"); return err }, "EK hash abcd"},
		{"UnitByEKHash empty", func() error { _, err := s.UnitByEKHash(ctx, ""); return err }, "empty EK hash"},
		{"RecordUnit bad run", func() error {
			return s.RecordUnit(ctx, &station.Unit{Serial: "SN0021", RunID: missing})
		}, fmt.Sprintf("run %d", missing)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if got := station.KindOf(err); got != station.KindNotFound {
				t.Fatalf("KindOf(%v) = %v; want not found", err, got)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func newUnit(serial string, runID int64) *station.Unit {
	ek := []byte("TPM2B_PUBLIC of " + serial)
	return &station.Unit{
		Serial:         serial,
		RegistrationID: station.RegistrationIDFromEK(ek),
		Method:         station.MethodTPM,
		Model:          "K1",
		Firmware:       "1.2.3",
		EKHash:         station.EKHash(ek),
		EKPublic:       ek,
		EKKeyDER:       []byte{0x30, 0x82, 0x01, 0x22},
		SRKPublic:      []byte("SRK of " + serial),
		RunID:          runID,
		Station:        "line-1",
		Operator:       "ada",
		Created:        t0.Add(time.Second),
	}
}

func TestRecordUnit(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	r := newRun("SN0030", t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	u := newUnit("SN0030", r.ID)
	if err := s.RecordUnit(ctx, u); err != nil {
		t.Fatal(err)
	}
	for name, get := range map[string]func() (*station.Unit, error){
		"UnitBySerial": func() (*station.Unit, error) { return s.UnitBySerial(ctx, u.Serial) },
		"UnitByEKHash": func() (*station.Unit, error) { return s.UnitByEKHash(ctx, u.EKHash) },
	} {
		got, err := get()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if diff := cmp.Diff(u, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", name, diff)
		}
	}

	// Units without an EK (other methods) and without a run do not clash.
	for _, serial := range []string{"X-1", "X-2"} {
		u := &station.Unit{Serial: serial, RegistrationID: strings.ToLower(serial), Method: station.MethodX509, Created: t0}
		if err := s.RecordUnit(ctx, u); err != nil {
			t.Fatalf("RecordUnit(%s) without EK: %v", serial, err)
		}
		got, err := s.UnitBySerial(ctx, serial)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(u, got); diff != "" {
			t.Errorf("unit without EK (-want +got):\n%s", diff)
		}
	}

	err := s.RecordUnit(ctx, &station.Unit{})
	if station.KindOf(err) != station.KindInvalid {
		t.Errorf("RecordUnit without serial: %v; want kind invalid", err)
	}
}

func TestRecordUnitConflict(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	r := newRun("SN0040", t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	first := newUnit("SN0040", r.ID)
	if err := s.RecordUnit(ctx, first); err != nil {
		t.Fatal(err)
	}
	second := newUnit("SN0042", r.ID)
	if err := s.RecordUnit(ctx, second); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		unit func() *station.Unit
		want []string
	}{
		{"same unit", func() *station.Unit { return newUnit("SN0040", r.ID) }, []string{"serial SN0040 and its EK hash", fmt.Sprintf("run %d", r.ID)}},
		{"same serial, other EK", func() *station.Unit {
			u := newUnit("SN0040", r.ID)
			u.EKHash = station.EKHash([]byte("another TPM"))
			return u
		}, []string{"serial SN0040 is recorded already", fmt.Sprintf("run %d", r.ID)}},
		{"same serial, no EK", func() *station.Unit {
			u := newUnit("SN0040", r.ID)
			u.EKHash = ""
			return u
		}, []string{"serial SN0040 is recorded already"}},
		{"same EK, other serial", func() *station.Unit {
			u := newUnit("SN0041", r.ID)
			u.EKHash = first.EKHash
			return u
		}, []string{"EK hash " + first.EKHash, "for serial SN0040"}},
		{"serial of one, EK of another", func() *station.Unit {
			u := newUnit("SN0040", r.ID)
			u.EKHash = second.EKHash
			return u
		}, []string{"serial SN0040 is recorded already", "EK hash " + second.EKHash + " for serial SN0042"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.RecordUnit(ctx, tt.unit())
			if got := station.KindOf(err); got != station.KindConflict {
				t.Fatalf("KindOf(%v) = %v; want conflict", err, got)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

// TestRecordUnitRace records the same unit from many goroutines: exactly one
// wins, the others get Conflict.
func TestRecordUnitRace(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			u := newUnit("SN-RACE", 0)
			if i%2 == 1 {
				u.Serial = fmt.Sprintf("SN-RACE-%d", i) // same EK, other serial
			}
			errs[i] = s.RecordUnit(ctx, u)
		})
	}
	wg.Wait()
	wins := 0
	for _, err := range errs {
		switch station.KindOf(err) {
		case station.KindOther:
			if err != nil {
				t.Errorf("unexpected error: %v", err)
			}
			wins++
		case station.KindConflict:
		default:
			t.Errorf("want conflict, got %v", err)
		}
	}
	if wins != 1 {
		t.Errorf("%d goroutines recorded the unit; want exactly 1", wins)
	}
}

func TestRuns(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	base := time.Date(2025, 6, 1, 8, 0, 0, 0, time.UTC)
	// 10 runs, one minute apart; SN-A has runs 0, 3, 6, 9; odd runs fail.
	var all []*station.Run
	for i := range 10 {
		serial := fmt.Sprintf("SN-%c", 'A'+i%3)
		r := newRun(serial, base.Add(time.Duration(i)*time.Minute))
		if err := s.CreateRun(ctx, r); err != nil {
			t.Fatal(err)
		}
		r.Steps = tpmSteps(r.Started)[:1+i%3]
		for _, st := range r.Steps {
			if err := s.AddStep(ctx, r.ID, st); err != nil {
				t.Fatal(err)
			}
		}
		if i < 9 { // the last one stays running
			res := station.ResultPass
			if i%2 == 1 {
				res = station.ResultFail
			}
			finish(r, res)
			if err := s.FinishRun(ctx, r); err != nil {
				t.Fatal(err)
			}
		}
		all = append(all, r)
	}
	// Newest first.
	pick := func(idx ...int) []*station.Run {
		var rs []*station.Run
		for _, i := range idx {
			rs = append(rs, all[i])
		}
		return rs
	}
	tests := []struct {
		name string
		f    station.RunFilter
		want []*station.Run
	}{
		{"all", station.RunFilter{}, pick(9, 8, 7, 6, 5, 4, 3, 2, 1, 0)},
		{"serial", station.RunFilter{Serial: "SN-A"}, pick(9, 6, 3, 0)},
		{"result fail", station.RunFilter{Result: station.ResultFail}, pick(7, 5, 3, 1)},
		{"result running", station.RunFilter{Result: station.ResultRunning}, pick(9)},
		{"since", station.RunFilter{Since: base.Add(7 * time.Minute)}, pick(9, 8, 7)},
		{"until", station.RunFilter{Until: base.Add(2 * time.Minute)}, pick(1, 0)},
		{"since until local zone", station.RunFilter{
			Since: base.Add(3 * time.Minute).In(time.FixedZone("X", -5*3600)),
			Until: base.Add(5*time.Minute + 1),
		}, pick(5, 4, 3)},
		{"limit", station.RunFilter{Limit: 3}, pick(9, 8, 7)},
		{"serial result limit", station.RunFilter{Serial: "SN-A", Result: station.ResultPass, Limit: 1}, pick(6)},
		{"nothing", station.RunFilter{Serial: "SN-Z"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Runs(ctx, tt.f)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Runs(%+v) (-want +got):\n%s", tt.f, diff)
			}
		})
	}

	if _, err := s.Runs(ctx, station.RunFilter{Limit: -1}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("Runs with limit -1: %v; want kind invalid", err)
	}
}

func TestRunsDefaultLimit(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	for i := range 105 {
		r := newRun(fmt.Sprintf("SN%03d", i), t0.Add(time.Duration(i)*time.Second))
		r.Steps = tpmSteps(r.Started)[:1]
		if err := s.CreateRun(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Runs(ctx, station.RunFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 100 || got[0].Serial != "SN104" || got[99].Serial != "SN005" {
		t.Fatalf("got %d runs, first %s, last %s; want 100 from SN104 to SN005", len(got), got[0].Serial, got[len(got)-1].Serial)
	}
	for _, r := range got {
		if len(r.Steps) != 1 {
			t.Fatalf("run %d has %d steps; want 1", r.ID, len(r.Steps))
		}
	}
}

func TestPragmas(t *testing.T) {
	s := open(t)
	tests := []struct{ pragma, write, read string }{
		{"journal_mode", "wal", "wal"},
		{"foreign_keys", "1", "1"},
		{"synchronous", "1", "1"}, // NORMAL
		{"busy_timeout", "5000", "5000"},
		{"query_only", "0", "1"},
		{"user_version", fmt.Sprint(sqlite.SchemaVersion()), fmt.Sprint(sqlite.SchemaVersion())},
	}
	for _, tt := range tests {
		w, r, err := sqlite.Pragmas(t.Context(), s, tt.pragma)
		if err != nil {
			t.Fatal(err)
		}
		if w != tt.write || r != tt.read {
			t.Errorf("PRAGMA %s = %s (writer), %s (reader); want %s, %s", tt.pragma, w, r, tt.write, tt.read)
		}
	}
}

func TestForeignKeysCascade(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "kiln.db")
	s := openAt(t, path)
	r := newRun("SN0050", t0)
	r.Steps = tpmSteps(t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	db := rawDB(t, path+"?_foreign_keys=1")
	if _, err := db.ExecContext(ctx, "DELETE FROM runs WHERE id = ?", r.ID); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM steps").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("%d steps left after deleting their run; want 0 (ON DELETE CASCADE)", n)
	}
}

func rawDB(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "kiln.db")
	var id int64
	for i := range 3 {
		s, err := sqlite.Open(ctx, path)
		if err != nil {
			t.Fatalf("open #%d: %v", i+1, err)
		}
		r := newRun(fmt.Sprintf("SN%d", i), t0)
		if err := s.CreateRun(ctx, r); err != nil {
			t.Fatal(err)
		}
		if r.ID <= id {
			t.Errorf("open #%d: run ID %d after %d; want increasing", i+1, r.ID, id)
		}
		id = r.ID
		runs, err := s.Runs(ctx, station.RunFilter{})
		if err != nil {
			t.Fatal(err)
		}
		if len(runs) != i+1 {
			t.Errorf("open #%d: %d runs; want %d", i+1, len(runs), i+1)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	}
	var v int
	if err := rawDB(t, path).QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		t.Fatal(err)
	}
	if v != sqlite.SchemaVersion() {
		t.Errorf("user_version %d; want %d", v, sqlite.SchemaVersion())
	}
}

func TestOpenNewerSchema(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "kiln.db")
	s, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	newer := sqlite.SchemaVersion() + 1
	db := rawDB(t, path)
	if _, err := db.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", newer)); err != nil {
		t.Fatal(err)
	}
	db.Close()

	_, err = sqlite.Open(ctx, path)
	if station.KindOf(err) != station.KindInvalid {
		t.Fatalf("Open of a newer database: %v; want kind invalid", err)
	}
	want := fmt.Sprintf("database schema version %d is newer than this kiln (%d): upgrade kiln", newer, sqlite.SchemaVersion())
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q; want it to say %q", err, want)
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.db")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not a database ", 100)), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		kind station.Kind
	}{
		{"empty path", "", station.KindInvalid},
		{"memory", ":memory:", station.KindInvalid},
		{"not a database", junk, station.KindInternal},
		{"missing directory", filepath.Join(dir, "no", "such", "dir", "kiln.db"), station.KindUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := sqlite.Open(ctx, tt.path)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded; want an error")
			}
			if got := station.KindOf(err); got != tt.kind {
				t.Errorf("KindOf(%v) = %v; want %v", err, got, tt.kind)
			}
		})
	}
}

func TestOddPath(t *testing.T) {
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "data dir #1?")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "kiln %20.db")
	s := openAt(t, path)
	if err := s.CreateRun(ctx, newRun("SN1", t0)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("database not at %q: %v", path, err)
	}
}

// TestConcurrent provisions from 8 goroutines at once, as the slots of a
// station do, while others read.
func TestConcurrent(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	const workers, perWorker = 8, 50
	var wg sync.WaitGroup
	errc := make(chan error, workers*perWorker)
	stop := make(chan struct{})
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				serial := fmt.Sprintf("W%d-%03d", w, i)
				if err := recordRun(ctx, s, serial, t0.Add(time.Duration(w*perWorker+i)*time.Millisecond)); err != nil {
					errc <- fmt.Errorf("%s: %w", serial, err)
					return
				}
			}
		})
	}
	var readers sync.WaitGroup
	for range 2 {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.Runs(ctx, station.RunFilter{Limit: 20}); err != nil {
					errc <- fmt.Errorf("Runs: %w", err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}

	runs, err := s.Runs(ctx, station.RunFilter{Limit: workers * perWorker * 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != workers*perWorker {
		t.Fatalf("%d runs; want %d", len(runs), workers*perWorker)
	}
	for _, r := range runs {
		if r.Result != station.ResultPass || len(r.Steps) != len(station.TPMSteps) {
			t.Errorf("run %d (%s): result %s, %d steps; want pass, %d", r.ID, r.Serial, r.Result, len(r.Steps), len(station.TPMSteps))
		}
		for i, st := range r.Steps {
			if st.Name != station.TPMSteps[i] {
				t.Errorf("run %d step %d is %s; want %s", r.ID, i, st.Name, station.TPMSteps[i])
			}
		}
		if _, err := s.UnitBySerial(ctx, r.Serial); err != nil {
			t.Error(err)
		}
	}
}

// recordRun does what a slot does for one passing unit: create the run, add
// the six TPM steps, finish it, record the unit.
func recordRun(ctx context.Context, s station.Store, serial string, started time.Time) error {
	r := newRun(serial, started)
	if err := s.CreateRun(ctx, r); err != nil {
		return err
	}
	for _, st := range tpmSteps(started) {
		if err := s.AddStep(ctx, r.ID, st); err != nil {
			return err
		}
	}
	finish(r, station.ResultPass)
	if err := s.FinishRun(ctx, r); err != nil {
		return err
	}
	return s.RecordUnit(ctx, newUnit(serial, r.ID))
}

// TestTwoStores writes through two stores on one file, as two kiln
// processes would: the busy timeout, not luck, keeps them from SQLITE_BUSY.
func TestTwoStores(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "kiln.db")
	stores := []*sqlite.Store{openAt(t, path), openAt(t, path)}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			s := stores[w%2]
			for i := range 20 {
				if err := recordRun(ctx, s, fmt.Sprintf("P%d-%02d", w, i), t0); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	for i, s := range stores {
		runs, err := s.Runs(ctx, station.RunFilter{Limit: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if len(runs) != 80 {
			t.Errorf("store %d sees %d runs; want 80", i, len(runs))
		}
	}
}

func TestAbortStale(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	now := time.Date(2025, 7, 1, 12, 0, 0, 0, time.UTC)
	s.Now = func() time.Time { return now }
	var stale []*station.Run
	for i := range 3 {
		r := newRun(fmt.Sprintf("SN%d", i), t0)
		if err := s.CreateRun(ctx, r); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			finish(r, station.ResultPass)
			if err := s.FinishRun(ctx, r); err != nil {
				t.Fatal(err)
			}
			continue
		}
		stale = append(stale, r)
	}
	n, err := s.AbortStale(ctx, "power lost: provision the unit again")
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("AbortStale closed %d runs; want 2", n)
	}
	for _, r := range stale {
		got, err := s.Run(ctx, r.ID)
		if err != nil {
			t.Fatal(err)
		}
		r.Result, r.ErrorKind, r.Error, r.Finished = station.ResultFail, station.KindUnavailable, "power lost: provision the unit again", now
		if diff := cmp.Diff(r, got); diff != "" {
			t.Errorf("aborted run (-want +got):\n%s", diff)
		}
	}
	if n, err := s.AbortStale(ctx, ""); err != nil || n != 0 {
		t.Errorf("second AbortStale = %d, %v; want 0, nil", n, err)
	}
}

func TestBackup(t *testing.T) {
	ctx := t.Context()
	s := open(t)
	r := newRun("SN0060", t0)
	if err := s.CreateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	for _, st := range tpmSteps(t0) {
		if err := s.AddStep(ctx, r.ID, st); err != nil {
			t.Fatal(err)
		}
		r.Steps = append(r.Steps, st)
	}
	finish(r, station.ResultPass)
	if err := s.FinishRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	u := newUnit(r.Serial, r.ID)
	if err := s.RecordUnit(ctx, u); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	dst := filepath.Join(dir, "backup.db")
	// Back up while another goroutine keeps writing.
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 20 {
			if err := recordRun(ctx, s, fmt.Sprintf("BG%d", i), t0); err != nil {
				t.Error(err)
				return
			}
		}
	})
	if err := s.Backup(ctx, dst); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if diff := cmp.Diff([]string{"backup.db"}, names); diff != "" {
		t.Errorf("files in the backup directory (-want +got):\n%s", diff)
	}

	b := openAt(t, dst)
	got, err := b.Run(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("run from backup (-want +got):\n%s", diff)
	}
	gotU, err := b.UnitByEKHash(ctx, u.EKHash)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(u, gotU); diff != "" {
		t.Errorf("unit from backup (-want +got):\n%s", diff)
	}

	err = s.Backup(ctx, dst)
	if station.KindOf(err) != station.KindConflict {
		t.Errorf("Backup onto an existing file: %v; want kind conflict", err)
	}
}

func TestClosed(t *testing.T) {
	s := open(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	err := s.CreateRun(t.Context(), newRun("SN1", t0))
	if err == nil || station.KindOf(err) == station.KindOther {
		t.Errorf("CreateRun on a closed store: %v; want a kinded error", err)
	}
}

func TestCanceled(t *testing.T) {
	s := open(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := s.CreateRun(ctx, newRun("SN1", t0))
	if station.KindOf(err) != station.KindUnavailable || !errors.Is(err, context.Canceled) {
		t.Errorf("CreateRun with a canceled context: %v; want kind unavailable wrapping context.Canceled", err)
	}
}

// BenchmarkRecordRun measures one provisioned unit's writes: create a run,
// add six steps, finish it, record the unit.
func BenchmarkRecordRun(b *testing.B) {
	ctx := context.Background()
	s := open(b)
	i := 0
	for b.Loop() {
		if err := recordRun(ctx, s, fmt.Sprintf("B%09d", i), t0); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
