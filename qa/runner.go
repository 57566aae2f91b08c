package qa

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/station"
)

// ErrNotAvailable says a station cannot do what a scenario asks (a method
// or a fault it does not have). The runner reports the scenario as not
// available instead of failing it on that account.
var ErrNotAvailable = errors.New("not available on this station")

// Bench builds the station a scenario runs on.
type Bench interface {
	// Open builds a station for sc with sc's station faults in place:
	// its own DPS, the shared store. An error wrapping ErrNotAvailable
	// says it cannot; other errors fail the scenario.
	Open(ctx context.Context, sc *Scenario) (Station, error)
}

// Station is a station set up for one scenario. Its methods are called
// from one goroutine per slot at once.
type Station interface {
	// Provision provisions one unit, as station.Provisioner.Provision
	// does. An error wrapping ErrNotAvailable says the method is not
	// available.
	Provision(ctx context.Context, req station.Request) (*station.Run, error)
	// StartDUT starts a simulated DUT. Kinds: Unavailable.
	StartDUT(ctx context.Context, spec DUTSpec) (DUT, error)
	// Evidence is what the station saw during the scenario beyond the
	// runs (DPS counters, the faults it did), for the report.
	Evidence(ctx context.Context) []Evidence
	// Close tears the scenario's station down; it is idempotent.
	Close() error
}

// DUTSpec describes a simulated DUT.
type DUTSpec struct {
	Serial   string
	TPM      string // "sim" or "swtpm"
	LineRate int    // bits/s at 10 bits per byte; negative: unthrottled
	Faults   fixtures.DUTFaults
}

// DUT is a running simulated DUT.
type DUT interface {
	Port() string // where the station opens its link
	Close() error
}

// Evidence is one piece of raw evidence: a name and its text.
type Evidence struct {
	Name string `json:"name"`
	Text string `json:"text"`
}

// Outcome is how a scenario or unit ended against its expectation.
type Outcome string

// The outcomes.
const (
	Met          Outcome = "met"
	NotMet       Outcome = "not met"
	NotAvailable Outcome = "not available"
)

// UnitResult is one unit's provisioning and its check.
type UnitResult struct {
	Unit   int    `json:"unit"`   // 1-based within its repetition
	Repeat int    `json:"repeat"` // 1-based
	Slot   int    `json:"slot"`   // 1-based
	Serial string `json:"serial"`
	Port   string `json:"port"`
	// Run is the station's record; nil when nothing was recorded (the
	// DUT could not be started, or the store failed).
	Run      *station.Run  `json:"run,omitempty"`
	Error    string        `json:"error,omitempty"` // the reason for a FAIL (or why there is no run)
	Kind     string        `json:"kind,omitempty"`  // KindName of the error
	Step     string        `json:"step,omitempty"`  // the step that failed
	Expect   string        `json:"expect"`
	Outcome  Outcome       `json:"outcome"`
	Why      string        `json:"why,omitempty"` // why the expectation is not met
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration_ns"`
}

// Name is the unit's name in reports: u1, or u1-r2 from the second
// repetition on.
func (u *UnitResult) Name() string {
	if u.Repeat > 1 {
		return fmt.Sprintf("u%d-r%d", u.Unit, u.Repeat)
	}
	return fmt.Sprintf("u%d", u.Unit)
}

// Passed reports whether the unit passed provisioning.
func (u *UnitResult) Passed() bool {
	return u.Run != nil && u.Run.Result == station.ResultPass && u.Error == ""
}

// ScenarioResult is one scenario's run.
type ScenarioResult struct {
	Scenario *Scenario      `json:"-"`
	Name     string         `json:"name"`
	Method   station.Method `json:"method"`
	Slots    int            `json:"slots"`
	Outcome  Outcome        `json:"outcome"`
	Reason   string         `json:"reason,omitempty"` // why not met or not available
	Units    []*UnitResult  `json:"units"`
	Evidence []Evidence     `json:"evidence,omitempty"`
	Started  time.Time      `json:"started"`
	Duration time.Duration  `json:"duration_ns"`
}

// Yield returns how many units passed provisioning, out of how many ran.
func (s *ScenarioResult) Yield() (passed, total int) {
	for _, u := range s.Units {
		if u.Outcome == NotAvailable {
			continue
		}
		total++
		if u.Passed() {
			passed++
		}
	}
	return passed, total
}

// Report is the result of a QA run.
type Report struct {
	Station   string            `json:"station"`
	Started   time.Time         `json:"started"`
	Duration  time.Duration     `json:"duration_ns"`
	Scenarios []*ScenarioResult `json:"scenarios"`
}

// Count returns how many scenarios ended with each outcome.
func (r *Report) Count() map[Outcome]int {
	m := map[Outcome]int{}
	for _, s := range r.Scenarios {
		m[s.Outcome]++
	}
	return m
}

// OK reports whether every scenario met its expectations; scenarios not
// available count as met only when allowUnavailable is set.
func (r *Report) OK(allowUnavailable bool) bool {
	c := r.Count()
	return c[NotMet] == 0 && (allowUnavailable || c[NotAvailable] == 0)
}

// Runner runs scenarios on a Bench.
type Runner struct {
	Bench    Bench
	Station  string // the station's name, for the report
	Operator string // written on every run; default "qa"
	// Slots, when above 0, overrides every scenario's slots.
	Slots  int
	Now    func() time.Time // defaults to time.Now
	Logger *slog.Logger     // defaults to slog.Default()
	// OnUnit, when set, is told of each unit when it is checked, from the
	// slot's goroutine.
	OnUnit func(sc *Scenario, u *UnitResult)
}

// Run runs the scenarios one after the other and returns the report. It
// stops early only when ctx ends; the scenarios not run are then reported
// not met.
func (r *Runner) Run(ctx context.Context, scenarios []*Scenario) *Report {
	now := r.now()
	rep := &Report{Station: r.Station, Started: now().UTC()}
	for _, sc := range scenarios {
		rep.Scenarios = append(rep.Scenarios, r.runScenario(ctx, sc))
	}
	rep.Duration = now().Sub(rep.Started)
	return rep
}

func (r *Runner) now() func() time.Time {
	if r.Now != nil {
		return r.Now
	}
	return time.Now
}

func (r *Runner) log() *slog.Logger {
	l := r.Logger
	if l == nil {
		l = slog.Default()
	}
	return l.With("component", "qa")
}

// job is one unit to provision.
type job struct {
	unit, repeat int
	serial, port string
	faults       fixtures.DUTFaults
	expect       Expect
}

func (r *Runner) runScenario(ctx context.Context, sc *Scenario) *ScenarioResult {
	now := r.now()
	slots := sc.Slots
	if r.Slots > 0 {
		slots = r.Slots
	}
	res := &ScenarioResult{Scenario: sc, Name: sc.Name, Method: sc.Method, Slots: slots, Started: now().UTC()}
	defer func() { res.Duration = now().Sub(res.Started) }()
	jobs := r.jobs(sc)
	if err := ctx.Err(); err != nil {
		res.Outcome, res.Reason = NotMet, "not run: "+err.Error()
		return res
	}
	st, err := r.Bench.Open(ctx, sc)
	if err != nil {
		res.Outcome, res.Reason = NotMet, err.Error()
		if errors.Is(err, ErrNotAvailable) {
			res.Outcome = NotAvailable
		}
		for _, j := range jobs {
			res.Units = append(res.Units, &UnitResult{Unit: j.unit, Repeat: j.repeat, Serial: j.serial, Port: j.port,
				Expect: j.expect.String(), Outcome: res.Outcome, Why: res.Reason})
		}
		return res
	}
	defer st.Close()

	res.Units = make([]*UnitResult, len(jobs))
	queue := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	unavailable := ""
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for slot := 1; slot <= min(slots, len(jobs)); slot++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range queue {
				u := r.runUnit(sctx, st, sc, slot, jobs[i])
				res.Units[i] = u
				mu.Lock()
				switch {
				case u.Outcome == NotAvailable && unavailable == "":
					unavailable = u.Why
					cancel() // the next units cannot run either
				case u.Outcome == NotMet && u.Run == nil && unavailable != "" && sctx.Err() != nil:
					u.Outcome, u.Why = NotAvailable, unavailable // stopped for that reason
				}
				mu.Unlock()
				if r.OnUnit != nil {
					r.OnUnit(sc, u)
				}
			}
		}()
	}
	for i := range jobs {
		select {
		case queue <- i:
			continue
		case <-sctx.Done():
		}
		break
	}
	close(queue)
	wg.Wait()

	for i, u := range res.Units {
		if u != nil {
			if unavailable != "" && u.Outcome == NotMet && u.Run == nil {
				// Stopped because the scenario cannot run here.
				u.Outcome, u.Why = NotAvailable, unavailable
			}
			continue
		}
		j := jobs[i]
		u = &UnitResult{Unit: j.unit, Repeat: j.repeat, Serial: j.serial, Port: j.port, Expect: j.expect.String(), Outcome: NotMet, Why: "not run: the scenario was stopped"}
		if unavailable != "" {
			u.Outcome, u.Why = NotAvailable, unavailable
		}
		res.Units[i] = u
	}
	ectx, ecancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	res.Evidence = st.Evidence(ectx)
	ecancel()

	res.Outcome = Met
	notMet := 0
	for _, u := range res.Units {
		switch u.Outcome {
		case NotAvailable:
			res.Outcome, res.Reason = NotAvailable, u.Why
		case NotMet:
			notMet++
			if res.Reason == "" || res.Outcome == NotAvailable {
				res.Reason = u.Name() + ": " + u.Why
			}
		}
	}
	if notMet > 0 {
		res.Outcome = NotMet
		if notMet > 1 {
			res.Reason = fmt.Sprintf("%d units did not meet their expectation; first: %s", notMet, res.Reason)
		}
	}
	r.log().Info("scenario done", "scenario", sc.Name, "outcome", res.Outcome, "units", len(res.Units), "duration", now().Sub(res.Started))
	return res
}

// jobs lists a scenario's units in the order they are provisioned.
func (r *Runner) jobs(sc *Scenario) []job {
	tag := randomTag()
	var jobs []job
	for rep := 1; rep <= sc.Repeat; rep++ {
		n := sc.UnitsPerRepeat()
		first := ""
		for u := 1; u <= n; u++ {
			j := job{unit: u, repeat: rep, expect: sc.ExpectFor(u)}
			if len(sc.Ports) > 0 {
				j.port = sc.Ports[u-1]
				jobs = append(jobs, j)
				continue
			}
			j.serial = fmt.Sprintf("%s%s-R%d-U%02d", sc.SerialPrefix, tag, rep, u)
			if u == 1 {
				first = j.serial
			}
			for _, f := range sc.Faults {
				if !f.Applies(u) {
					continue
				}
				switch f.Kind {
				case FaultDUTDrop:
					j.faults.DropAfter = f.After
				case FaultGarbage:
					j.faults.Garbage, j.faults.Seed = true, uint64(rep*1000+u)
				case FaultDelay:
					j.faults.Delay = f.Delay
				case FaultDuplicateSerial:
					j.serial = first
				}
			}
			jobs = append(jobs, j)
		}
	}
	return jobs
}

func (r *Runner) runUnit(ctx context.Context, st Station, sc *Scenario, slot int, j job) *UnitResult {
	now := r.now()
	u := &UnitResult{Unit: j.unit, Repeat: j.repeat, Slot: slot, Serial: j.serial, Port: j.port, Expect: j.expect.String(), Started: now().UTC()}
	defer func() { u.Duration = now().Sub(u.Started) }()
	ctx, cancel := context.WithTimeout(ctx, sc.Timeout)
	defer cancel()
	if len(sc.Ports) == 0 {
		d, err := st.StartDUT(ctx, DUTSpec{Serial: j.serial, TPM: sc.DUTTPM, LineRate: sc.LineRate, Faults: j.faults})
		if err != nil {
			u.Error, u.Kind = err.Error(), KindName(station.KindOf(err))
			u.Outcome, u.Why = NotMet, "the simulated DUT did not start: "+err.Error()
			return u
		}
		defer d.Close()
		u.Port = d.Port()
		u.Started = now().UTC() // the unit's time is its provisioning
	}
	operator := r.Operator
	if operator == "" {
		operator = "qa"
	}
	// A real DUT reports its own serial; a simulated one is told it and
	// the scan is left empty so that the DUT's word is what is checked.
	run, err := st.Provision(ctx, station.Request{Port: u.Port, Operator: operator})
	u.Run = run
	if run != nil {
		u.Serial = run.Serial
	}
	if err != nil {
		u.Error, u.Kind = err.Error(), KindName(station.KindOf(err))
		if run != nil {
			u.Step = failedStep(run)
		}
	}
	if errors.Is(err, ErrNotAvailable) {
		u.Outcome, u.Why = NotAvailable, err.Error()
		return u
	}
	u.Outcome, u.Why = check(j.expect, u, err)
	return u
}

// failedStep is the step a failed run stopped at: its last failed step.
func failedStep(r *station.Run) string {
	for i := len(r.Steps) - 1; i >= 0; i-- {
		if r.Steps[i].Status == station.StepFail {
			return r.Steps[i].Name
		}
	}
	return ""
}

// check compares a unit's outcome with its expectation.
func check(e Expect, u *UnitResult, err error) (Outcome, string) {
	if u.Run == nil {
		return NotMet, "nothing was recorded: " + u.Error
	}
	got := u.Run.Result
	if got == station.ResultPass && err != nil {
		// Passed, but the record is incomplete: the store failed.
		return NotMet, "the unit passed but its record is incomplete: " + err.Error()
	}
	switch {
	case e.Result == station.ResultPass && got == station.ResultPass:
		return Met, ""
	case e.Result == station.ResultPass:
		return NotMet, fmt.Sprintf("expected pass, got fail at %s (%s): %s", stepOr(u.Step), u.Kind, u.Error)
	case got == station.ResultPass:
		return NotMet, fmt.Sprintf("expected %s, got pass", e)
	}
	var why []string
	if e.Step != "" && e.Step != u.Step {
		why = append(why, fmt.Sprintf("step %s, not %s", stepOr(u.Step), e.Step))
	}
	if e.Kind != "" && e.Kind != u.Kind {
		why = append(why, fmt.Sprintf("kind %s, not %s", u.Kind, e.Kind))
	}
	if e.Text != "" && !strings.Contains(strings.ToLower(u.Error), strings.ToLower(e.Text)) {
		why = append(why, fmt.Sprintf("the reason does not say %q", e.Text))
	}
	if len(why) > 0 {
		return NotMet, fmt.Sprintf("failed as expected, but with %s: %s", strings.Join(why, ", "), u.Error)
	}
	return Met, ""
}

func stepOr(s string) string {
	if s == "" {
		return "(before any step)"
	}
	return s
}

func randomTag() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return strings.ToUpper(hex.EncodeToString(b))
}
