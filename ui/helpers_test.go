package ui_test

import (
	"context"
	"flag"
	"sync"
	"testing"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// update rewrites the markup masters in testdata instead of comparing.
var update = flag.Bool("update", false, "rewrite the markup masters in testdata")

// loop stands in for Fyne's UI goroutine: ui.Config.Do queues functions,
// and the test goroutine runs them (drain, until), so that every widget
// change happens on the goroutine that drives the UI, as in the real app.
type loop struct{ q chan func() }

func newLoop() *loop { return &loop{q: make(chan func(), 4096)} }

func (l *loop) Do(f func()) { l.q <- f }

// until runs queued functions until cond holds, failing after a timeout.
func (l *loop) until(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	for !cond() {
		select {
		case f := <-l.q:
			f()
		case <-deadline:
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}

// settle runs queued functions until none has arrived for a moment.
func (l *loop) settle() {
	for {
		select {
		case f := <-l.q:
			f()
		case <-time.After(150 * time.Millisecond):
			return
		}
	}
}

// scripted is a provisioner with real behaviour and fixed timings: it runs
// the named steps, reporting each through onStep, fails at failAt with
// failErr, and, when gate is set, blocks in the first step until gate is
// closed (as a TPM or a slow link would).
type scripted struct {
	steps   []string
	failAt  string
	failErr error
	gate    chan struct{}
	started chan station.Request
	base    time.Time

	mu     sync.Mutex
	onStep func(station.StepEvent)
	runs   int64
}

func (p *scripted) Steps() []string { return p.steps }

func (p *scripted) Provision(ctx context.Context, req station.Request) (*station.Run, error) {
	p.mu.Lock()
	p.runs++
	id, onStep := p.runs, p.onStep
	p.mu.Unlock()
	if p.started != nil {
		p.started <- req
	}
	serial := req.Serial
	if serial == "" {
		serial = "SN-000777"
	}
	r := &station.Run{ID: id, Serial: serial, Port: req.Port, Operator: req.Operator, Station: "test",
		Method: station.MethodTPM, Started: p.base, Result: station.ResultRunning}
	at := p.base
	var err error
	for i, name := range p.steps {
		s := station.Step{Name: name, Started: at}
		onStep(station.StepEvent{RunID: id, Port: req.Port, Serial: serial, Step: s})
		if i == 0 && p.gate != nil {
			select {
			case <-p.gate:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		s.Duration = time.Duration(i+1) * 12 * time.Millisecond
		at = at.Add(s.Duration)
		s.Status = station.StepOK
		if name == p.failAt {
			err = p.failErr
			s.Status, s.Error = station.StepFail, err.Error()
		}
		r.Steps = append(r.Steps, s)
		onStep(station.StepEvent{RunID: id, Port: req.Port, Serial: serial, Step: s, Done: true})
		if err != nil {
			break
		}
	}
	r.Finished = at
	if err != nil {
		r.Result, r.ErrorKind, r.Error = station.ResultFail, station.KindOf(err), err.Error()
		return r, err
	}
	r.Result, r.RegistrationID = station.ResultPass, "regid-"+serial
	return r, nil
}

func okCheck(context.Context) error { return nil }

// newStation builds the GUI around p in a 1280x800 test window.
func newStation(t *testing.T, p *scripted, edit func(*ui.Config)) (*ui.UI, fyne.Window, *loop) {
	t.Helper()
	test.NewTempApp(t)
	test.ApplyTheme(t, ui.Theme())
	l := newLoop()
	cfg := ui.Config{
		Provisioner: p,
		Station:     "line-1",
		Ports:       []string{"/dev/ttyACM0"},
		Operator:    "alice",
		Health: []ui.HealthCheck{
			{Name: "DUT link", Check: okCheck}, {Name: "TPM / CA", Check: okCheck},
			{Name: "Embedded DPS", Check: okCheck}, {Name: "Records store", Check: okCheck},
		},
		Now: func() time.Time { return time.Date(2025, 3, 4, 8, 0, 0, 0, time.Local) },
		Do:  l.Do,
	}
	if edit != nil {
		edit(&cfg)
	}
	u, err := ui.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.onStep = u.Step
	p.mu.Unlock()
	w := test.NewTempWindow(t, u.Content())
	w.Resize(fyne.NewSize(1280, 800))
	t.Cleanup(func() {
		if p.gate != nil {
			select {
			case <-p.gate:
			default:
				close(p.gate)
			}
		}
		// Close waits for the UI's goroutines, which may be waiting to hand
		// a result to the loop: keep draining meanwhile.
		done := make(chan struct{})
		go func() { u.Close(); close(done) }()
		for {
			select {
			case <-done:
				return
			case f := <-l.q:
				f()
			}
		}
	})
	l.settle()
	return u, w, l
}

// within runs f (a UI action) and fails the test if it does not return
// in time: the UI goroutine would be blocked.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); f() }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v: the UI goroutine is blocked", what, d)
	}
}

func base() time.Time { return time.Date(2025, 3, 4, 9, 15, 30, 0, time.Local) }

var errDropped = station.Errorf("read EK", station.KindUnavailable, "the DUT on /dev/ttyACM0 stopped answering: check the cable and run the unit again")
