package cloudsync

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Store is what a push needs of the station's store.
type Store interface {
	station.BatchStore
	station.Outbox
}

// Verify says how much of a push is read back from the target at the end.
type Verify string

// The verification modes.
const (
	VerifySample Verify = "sample" // Sample enrollments, picked at random, one GET each
	VerifyAll    Verify = "all"    // every enrollment, through the query API, a page per request
	VerifyNone   Verify = "none"
)

// Progress is how far a push, an enable or an export is.
type Progress struct {
	Phase   string // "push", "read back", "verify", "enable", ...
	Done    int    // items finished (done or failed)
	Failed  int
	Total   int
	Elapsed time.Duration
}

// Pusher pushes batches to one DPS target. Its zero value is not usable:
// set Store and Service. A Pusher runs one push at a time.
type Pusher struct {
	Store   Store
	Service Service
	Quota   Quota
	// Workers is how many requests may be in flight at once (the pacer
	// still spaces them); 0: 32.
	Workers int
	// MaxRetries bounds the retries of one request refused with 429, 5xx
	// or a network error; 0: 12.
	MaxRetries int
	// Verify and Sample choose the read-back at the end; "": sample of
	// Sample (0: 20) enrollments.
	Verify Verify
	Sample int
	// Group and Groups are the enrollment groups of the batch's X.509 and
	// symmetric-key units: each unit registers through the group its
	// record names (Unit.EnrollmentGroup), else through the first of
	// Group, then Groups, whose attestation fits its method (UnitGroup).
	// Only the groups some unit registers through are pushed. PerUnit
	// also pushes those units' own individual enrollments: an X.509
	// unit's with its recorded certificate, a symmetric-key unit's with
	// its key derived from its group's.
	Group   *Group
	Groups  []*Group
	PerUnit bool
	// Progress, when set, is called as items finish (from one goroutine
	// at a time).
	Progress func(Progress)
	Logger   *slog.Logger

	pacer *pacer
	mu    sync.Mutex // guards rep and the progress counters
	rep   *Report
	start time.Time
	phase string
	total int
	done  int
	fail  int
}

// Report is what a push or an enable did.
type Report struct {
	BatchID   int64 `json:"batch_id"`
	Total     int   `json:"total"`     // items of the operation
	Done      int   `json:"done"`      // the target holds them as wanted
	Failed    int   `json:"failed"`    // refused: see Failures
	Sent      int   `json:"sent"`      // items carried by requests in this run
	ReadBack  int   `json:"read_back"` // enrollments read back to decide create or update
	Updated   int   `json:"updated"`   // enrollments brought up to date instead of created
	Requests  int   `json:"requests"`  // requests sent (operations against the quota)
	Throttled int   `json:"throttled"` // answers 429
	Retries   int   `json:"retries"`   // requests sent again after 429, 5xx or network errors
	Verified  int   `json:"verified"`  // enrollments read back at the end
	// Idle is the quota time lost because no request was ready when the
	// pacer allowed one (the target or the station was the bottleneck).
	Idle     time.Duration      `json:"idle_ns"`
	Elapsed  time.Duration      `json:"elapsed_ns"` // the whole run
	Failures []station.PushItem `json:"failures,omitempty"`
}

func (p *Pusher) log() *slog.Logger {
	if p.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return p.Logger.With("component", "cloudsync")
}

func (p *Pusher) workers() int {
	if p.Workers <= 0 {
		return 32
	}
	return p.Workers
}

func (p *Pusher) begin(batchID int64) {
	p.pacer = newPacer(p.Quota)
	p.rep = &Report{BatchID: batchID}
	p.start = time.Now()
}

func (p *Pusher) setPhase(phase string, total, done, failed int) {
	p.mu.Lock()
	p.phase, p.total, p.done, p.fail = phase, total, done, failed
	p.mu.Unlock()
	p.progress(0, 0)
}

func (p *Pusher) progress(done, failed int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += done
	p.fail += failed
	if p.Progress != nil {
		p.Progress(Progress{Phase: p.phase, Done: p.done, Failed: p.fail, Total: p.total, Elapsed: time.Since(p.start)})
	}
}

func (p *Pusher) count(f func(r *Report)) {
	p.mu.Lock()
	f(p.rep)
	p.mu.Unlock()
}

// call sends one request through f, paced, retrying on 429 (after the
// service's retry-after, which also holds back every other worker), 5xx
// and network errors (with exponential backoff and jitter). Kinds: those
// of f.
func (p *Pusher) call(ctx context.Context, what string, f func(ctx context.Context) error) error {
	maxRetries := p.MaxRetries
	if maxRetries <= 0 {
		maxRetries = 12
	}
	for attempt := 0; ; attempt++ {
		if err := p.pacer.wait(ctx); err != nil {
			return err
		}
		hint := &retryHint{}
		err := f(context.WithValue(ctx, hintKey{}, hint))
		p.count(func(r *Report) { r.Requests++ })
		if err == nil || station.KindOf(err) != station.KindUnavailable || ctx.Err() != nil || attempt >= maxRetries {
			return err
		}
		d := backoff(attempt)
		if hint.after > 0 {
			d = hint.after
		}
		if hint.status == 429 {
			p.count(func(r *Report) { r.Throttled++ })
			p.pacer.hold(d)
		}
		p.count(func(r *Report) { r.Retries++ })
		p.log().Info("target busy: retrying", "request", what, "status", hint.status, "after", d, "attempt", attempt+1, "err", err)
		if err := sleep(ctx, d); err != nil {
			return err
		}
	}
}

// backoff is the wait before retry attempt+1 when the service gave none:
// 0.5 s doubling up to 30 s, with ±20 % jitter.
func backoff(attempt int) time.Duration {
	d := 500 * time.Millisecond << min(attempt, 6)
	d = min(d, 30*time.Second)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// refusal turns a refused request or item into its DPS error code and a
// message for a person.
func refusal(err error) (int, string) {
	var d *dps.ErrorDetails
	if errors.As(err, &d) {
		return d.ErrorCode, err.Error()
	}
	code := map[station.Kind]int{
		station.KindUnauthorized: dps.CodeUnauthorized,
		station.KindNotFound:     dps.CodeNotFound,
		station.KindConflict:     dps.CodeConflict,
		station.KindUnavailable:  dps.CodeInternal,
	}[station.KindOf(err)]
	if code == 0 {
		code = dps.CodeBadRequest
	}
	return code, err.Error()
}

// groupList is Group, then Groups.
func (p *Pusher) groupList() []*Group {
	var gs []*Group
	if p.Group != nil {
		gs = append(gs, p.Group)
	}
	for _, g := range p.Groups {
		if g != nil {
			gs = append(gs, g)
		}
	}
	return gs
}

// unitEnrollment returns the individual enrollment of unit u, whose group
// (for the group methods) is g.
func unitEnrollment(u *station.Unit, t station.EnrollmentTemplate, g *Group) (*dps.IndividualEnrollment, error) {
	if u.Method == station.MethodSymKey && g != nil && g.Attestation.SymmetricKey != nil {
		return SymKeyEnrollment(u, t, g.Attestation.SymmetricKey.PrimaryKey)
	}
	return Enrollment(u, t)
}

// plan builds the outbox items of batch b's push and the enrollments and
// groups they stand for, keyed by the lower-case registration ID (or
// group key).
func (p *Pusher) plan(ctx context.Context, b *station.Batch) ([]station.PushItem, map[string]*dps.IndividualEnrollment, map[string]*dps.EnrollmentGroup, error) {
	units, err := p.Store.BatchUnits(ctx, b.ID)
	if err != nil {
		return nil, nil, nil, err
	}
	var items, groupItems []station.PushItem
	enrollments := map[string]*dps.IndividualEnrollment{}
	groups := map[string]*dps.EnrollmentGroup{}
	for _, u := range units {
		var g *Group
		if usesGroup(u) {
			if g, err = UnitGroup(u, p.groupList()); err != nil {
				return nil, nil, nil, station.Errorf("plan the push of batch "+b.Name, station.KindInvalid,
					"batch %d has X.509 or symmetric-key units: %w", b.ID, err)
			}
			if k := groupKey(g.ID); groups[k] == nil {
				eg, err := EnrollmentGroup(g, b.Template)
				if err != nil {
					return nil, nil, nil, err
				}
				groups[k] = eg
				groupItems = append(groupItems, station.PushItem{BatchID: b.ID, Op: station.PushEnroll, Key: k,
					State: station.PushPending, Mode: station.PushModeCreate})
			}
			if !p.PerUnit {
				continue
			}
		}
		it := station.PushItem{BatchID: b.ID, Op: station.PushEnroll, Key: strings.ToLower(u.RegistrationID), Serial: u.Serial,
			State: station.PushPending, Mode: station.PushModeCreate}
		e, err := unitEnrollment(u, b.Template, g)
		if err != nil {
			// The unit cannot be enrolled as it is: it fails on its own.
			it.State, it.Mode = station.PushFailed, ""
			it.ErrorCode, it.Error = dps.CodeBadRequest, err.Error()
			if it.Key == "" {
				it.Key = "serial:" + u.Serial
			}
		} else {
			enrollments[it.Key] = e
		}
		items = append(items, it)
	}
	return append(groupItems, items...), enrollments, groups, nil
}

// Push pushes batch id to the target: a sealed batch becomes pushing, its
// items go to the outbox, and the items not yet done are sent in bulk
// operations of up to ten, paced under the quota. Items whose fate a crash
// left unknown are read back first; a create the target refuses as a
// conflict is read back too, and counts as done when the target holds the
// same identity (an update when only the settings differ). When every item
// is done and the read-back verification passes, the batch becomes
// pushed. A refused item keeps the DPS's error and does not stop the
// others; a target that refuses the credentials (401) fails every item
// without sending them. Running Push again retries the failed items.
// Kinds: NotFound (no batch), Conflict (the batch is not sealed or
// pushing), Invalid, Unauthorized, Unavailable (the target is unreachable:
// run it again).
func (p *Pusher) Push(ctx context.Context, id int64) (*Report, error) {
	b, err := p.Store.Batch(ctx, id)
	if err != nil {
		return nil, err
	}
	op := fmt.Sprintf("push batch %d (%s)", b.ID, b.Name)
	if b.State != station.BatchSealed && b.State != station.BatchPushing {
		return nil, station.Errorf(op, station.KindConflict, "batch %d is %s: seal it first (kiln batch seal %d)", b.ID, b.State, b.ID)
	}
	p.begin(b.ID)
	defer func() { p.rep.Elapsed = time.Since(p.start) }()
	items, enrollments, groups, err := p.plan(ctx, b)
	if err != nil {
		return nil, err
	}
	if b.State == station.BatchSealed {
		if err := p.Store.Transition(ctx, b.ID, station.BatchSealed, station.BatchPushing); err != nil {
			return nil, err
		}
	} // else a push stopped before: resume it
	if err := p.Store.AddPushItems(ctx, items); err != nil {
		return nil, err
	}
	// Failed items are tried again; sent ones are read back first.
	failedItems, err := p.Store.PushItems(ctx, b.ID, station.PushEnroll, station.PushFailed)
	if err != nil {
		return nil, err
	}
	unknown, err := p.Store.PushItems(ctx, b.ID, station.PushEnroll, station.PushSent)
	if err != nil {
		return nil, err
	}
	var retry []station.PushItem
	for _, it := range failedItems {
		if _, ok := enrollments[it.Key]; ok || groups[it.Key] != nil {
			it.State, it.Mode, it.ErrorCode, it.Error = station.PushPending, station.PushModeCreate, 0, ""
			retry = append(retry, it)
		}
	}
	if err := p.Store.UpdatePushItems(ctx, retry); err != nil {
		return nil, err
	}
	counts, err := p.Store.PushCounts(ctx, b.ID, station.PushEnroll)
	if err != nil {
		return nil, err
	}
	total := 0
	for _, n := range counts {
		total += n
	}
	p.rep.Total = total
	p.setPhase("push", total, counts[station.PushDone], counts[station.PushFailed])
	if len(unknown) > 0 {
		p.log().Info("resuming a push: reading back the items whose answer was not recorded", "batch", b.ID, "items", len(unknown))
		if err := p.readBack(ctx, unknown, enrollments, groups); err != nil {
			return p.finish(ctx, b, err)
		}
	}
	// Rounds: creates, then the updates that reading back asked for.
	for round := 0; round < 3; round++ {
		pending, err := p.Store.PushItems(ctx, b.ID, station.PushEnroll, station.PushPending)
		if err != nil {
			return nil, err
		}
		if len(pending) == 0 {
			break
		}
		if err := p.send(ctx, pending, enrollments, groups); err != nil {
			return p.finish(ctx, b, err)
		}
	}
	if err := p.verify(ctx, b, enrollments); err != nil {
		return p.finish(ctx, b, err)
	}
	return p.finish(ctx, b, nil)
}

// finish counts the outcome, moves a fully pushed batch to pushed, and
// says what is left.
func (p *Pusher) finish(ctx context.Context, b *station.Batch, cause error) (*Report, error) {
	op := fmt.Sprintf("push batch %d (%s)", b.ID, b.Name)
	all, err := p.Store.PushItems(ctx, b.ID, station.PushEnroll, "")
	if err != nil {
		return p.rep, errors.Join(cause, err)
	}
	p.rep.Total, p.rep.Done, p.rep.Failed, p.rep.Failures = len(all), 0, 0, nil
	for _, it := range all {
		switch it.State {
		case station.PushDone:
			p.rep.Done++
		case station.PushFailed:
			p.rep.Failed++
			p.rep.Failures = append(p.rep.Failures, it)
		}
	}
	p.rep.Elapsed, p.rep.Idle = time.Since(p.start), p.pacer.lost()
	if cause != nil {
		return p.rep, station.Errorf(op, station.KindOf(cause), "%w: %d of %d items are done; run the push again to resume", cause, p.rep.Done, p.rep.Total)
	}
	if p.rep.Failed == 0 && p.rep.Done < p.rep.Total {
		return p.rep, station.Errorf(op, station.KindUnavailable,
			"%d of %d items are not done yet (the target kept answering them with changes): run the push again", p.rep.Total-p.rep.Done, p.rep.Total)
	}
	if p.rep.Failed > 0 {
		return p.rep, station.Errorf(op, station.KindInvalid,
			"%d of %d items were refused by the target (first: %s: %s): fix them or the target, then run the push again to retry them",
			p.rep.Failed, p.rep.Total, p.rep.Failures[0].Key, p.rep.Failures[0].Error)
	}
	if err := p.Store.Transition(ctx, b.ID, station.BatchPushing, station.BatchPushed); err != nil {
		return p.rep, err
	}
	p.log().Info("batch pushed", "batch", b.ID, "items", p.rep.Total, "requests", p.rep.Requests, "throttled", p.rep.Throttled, "elapsed", p.rep.Elapsed)
	return p.rep, nil
}

// readBack decides the fate of items by reading each from the target:
// absent → create; same → done; same identity, other settings → update;
// another identity → failed (Conflict).
func (p *Pusher) readBack(ctx context.Context, items []station.PushItem, enrollments map[string]*dps.IndividualEnrollment, groups map[string]*dps.EnrollmentGroup) error {
	var out []station.PushItem
	done, failed := 0, 0
	for _, it := range items {
		if groups[it.Key] != nil {
			it.State, it.Mode = station.PushPending, station.PushModeCreate // the group's push reads it back itself
			out = append(out, it)
			continue
		}
		w, ok := enrollments[it.Key]
		if !ok {
			continue
		}
		var got *dps.IndividualEnrollment
		err := p.call(ctx, "read back "+it.Key, func(ctx context.Context) (err error) {
			got, err = p.Service.GetEnrollment(ctx, w.RegistrationID)
			return err
		})
		p.count(func(r *Report) { r.ReadBack++ })
		switch {
		case station.KindOf(err) == station.KindNotFound:
			it.State, it.Mode = station.PushPending, station.PushModeCreate
		case err != nil:
			if station.KindOf(err) == station.KindUnavailable || station.KindOf(err) == station.KindUnauthorized {
				return err
			}
			it.State, it.Mode = station.PushFailed, ""
			it.ErrorCode, it.Error = refusal(err)
			failed++
		default:
			switch compare(got, w, true) {
			case matchSame:
				it.State, it.Mode, it.ETag, it.ErrorCode, it.Error = station.PushDone, "", got.ETag, 0, ""
				done++
			case matchStale:
				it.State, it.Mode, it.ETag = station.PushPending, station.PushModeUpdate, got.ETag
			case matchForeign:
				it.State, it.Mode = station.PushFailed, ""
				it.ErrorCode = dps.CodeConflict
				it.Error = fmt.Sprintf("the target holds another device's enrollment under registration ID %s: remove it there, or give the unit another ID", w.RegistrationID)
				failed++
			}
		}
		out = append(out, it)
	}
	if err := p.Store.UpdatePushItems(ctx, out); err != nil {
		return err
	}
	p.progress(done, failed)
	return nil
}

// send pushes the pending items: the group first (on its own), then the
// enrollments in bulk operations of up to ten, one mode per operation, by
// the pusher's workers. It stops at the first error that concerns the
// whole target (credentials, unreachable).
func (p *Pusher) send(ctx context.Context, pending []station.PushItem, enrollments map[string]*dps.IndividualEnrollment, groups map[string]*dps.EnrollmentGroup) error {
	var creates, updates, stale []station.PushItem
	for _, it := range pending {
		switch {
		case groups[it.Key] != nil:
			if err := p.pushGroup(ctx, it, groups[it.Key]); err != nil {
				return err
			}
		case enrollments[it.Key] == nil:
			// Left by an earlier push of another plan (another group,
			// or units enrolled on their own then): not this push's.
			it.State, it.Mode, it.ErrorCode = station.PushFailed, "", dps.CodeBadRequest
			it.Error = "not part of this push (an earlier push planned it): push again with the same group options, or ignore it"
			stale = append(stale, it)
		case it.Mode == station.PushModeUpdate:
			updates = append(updates, it)
		default:
			creates = append(creates, it)
		}
	}
	if err := p.Store.UpdatePushItems(ctx, stale); err != nil {
		return err
	}
	chunks := make(chan []station.PushItem)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	for range p.workers() {
		wg.Go(func() {
			for c := range chunks {
				if err := p.sendChunk(ctx, c, enrollments); err != nil {
					cancel(err)
				}
			}
		})
	}
feed:
	for _, list := range [][]station.PushItem{creates, updates} {
		for i := 0; i < len(list); i += dps.MaxBulkItems {
			select {
			case chunks <- list[i:min(i+dps.MaxBulkItems, len(list))]:
			case <-ctx.Done():
				break feed
			}
		}
	}
	close(chunks)
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		if station.KindOf(err) == station.KindUnauthorized {
			return p.failRest(context.WithoutCancel(ctx), pending[0].BatchID, err)
		}
		return err
	}
	return nil
}

// failRest marks every pending item failed with err: the target refused
// the credentials, which would refuse each of them the same way.
func (p *Pusher) failRest(ctx context.Context, batchID int64, cause error) error {
	// Sent items too: under these credentials nothing was applied, and a
	// failed item is created again (and read back on a conflict) by the
	// next push, so marking one failed is never wrong.
	var rest []station.PushItem
	for _, st := range []station.PushState{station.PushPending, station.PushSent} {
		items, err := p.Store.PushItems(ctx, batchID, station.PushEnroll, st)
		if err != nil {
			return errors.Join(cause, err)
		}
		rest = append(rest, items...)
	}
	code, msg := refusal(cause)
	for i := range rest {
		rest[i].State, rest[i].Mode, rest[i].ErrorCode, rest[i].Error = station.PushFailed, "", code, msg
	}
	if err := p.Store.UpdatePushItems(ctx, rest); err != nil {
		return errors.Join(cause, err)
	}
	p.progress(0, len(rest))
	return station.Errorf("push", station.KindUnauthorized,
		"the target refused the credentials (%w): check the target's connection string (kiln batch target add), then push again", cause)
}

// sendChunk sends one bulk operation of up to ten items and records the
// answer of each. The items are marked sent before the request leaves.
func (p *Pusher) sendChunk(ctx context.Context, chunk []station.PushItem, enrollments map[string]*dps.IndividualEnrollment) error {
	mode := dps.BulkCreate
	if chunk[0].Mode == station.PushModeUpdate {
		mode = dps.BulkUpdate
	}
	body := make([]dps.IndividualEnrollment, len(chunk))
	for i := range chunk {
		chunk[i].State = station.PushSent
		chunk[i].Attempts++
		body[i] = *enrollments[chunk[i].Key]
	}
	var res *dps.BulkEnrollmentOperationResult
	marked := false
	err := p.call(ctx, "bulk "+mode, func(ctx context.Context) (err error) {
		if !marked {
			// Marked sent once the pacer lets the request go, not before:
			// a chunk stopped while it waited was never sent.
			if err := p.Store.UpdatePushItems(ctx, chunk); err != nil {
				return err
			}
			marked = true
		}
		res, err = p.Service.BulkEnrollments(ctx, mode, body)
		return err
	})
	if !marked {
		return err
	}
	p.count(func(r *Report) { r.Sent += len(chunk) })
	switch station.KindOf(err) {
	case station.KindUnavailable:
		// The items stay sent: their fate is unknown until read back.
		return err
	case station.KindUnauthorized:
		// Refused before anything was applied: the items carry the
		// refusal, and the push stops.
		code, msg := refusal(err)
		for i := range chunk {
			chunk[i].State, chunk[i].Mode, chunk[i].ErrorCode, chunk[i].Error = station.PushFailed, "", code, msg
		}
		if uerr := p.Store.UpdatePushItems(context.WithoutCancel(ctx), chunk); uerr != nil {
			return errors.Join(err, uerr)
		}
		p.progress(0, len(chunk))
		return err
	}
	if err != nil {
		// The whole operation was refused (400 and the like): each item
		// carries the refusal.
		code, msg := refusal(err)
		for i := range chunk {
			chunk[i].State, chunk[i].Mode, chunk[i].ErrorCode, chunk[i].Error = station.PushFailed, "", code, msg
		}
		if err := p.Store.UpdatePushItems(ctx, chunk); err != nil {
			return err
		}
		p.progress(0, len(chunk))
		return nil
	}
	refused := map[string]dps.BulkEnrollmentOperationError{}
	for _, e := range res.Errors {
		refused[strings.ToLower(e.RegistrationID)] = e
	}
	var conflicts []station.PushItem
	done, failed := 0, 0
	for i := range chunk {
		it := &chunk[i]
		e, bad := refused[it.Key]
		switch {
		case !bad:
			it.State, it.Mode, it.ErrorCode, it.Error = station.PushDone, "", 0, ""
			if mode == dps.BulkUpdate {
				p.count(func(r *Report) { r.Updated++ })
			}
			done++
		case e.ErrorCode/1000 == 409 && mode == dps.BulkCreate:
			// It exists: ours from a run whose answer was lost, or
			// another device's. Reading it back tells.
			conflicts = append(conflicts, *it)
			continue
		default:
			it.State, it.Mode, it.ErrorCode = station.PushFailed, "", e.ErrorCode
			it.Error = fmt.Sprintf("DPS refused it (%d): %s", e.ErrorCode, e.ErrorStatus)
			failed++
		}
	}
	var recorded []station.PushItem
	for _, it := range chunk {
		if it.State != station.PushSent {
			recorded = append(recorded, it)
		}
	}
	if err := p.Store.UpdatePushItems(ctx, recorded); err != nil {
		return err
	}
	p.progress(done, failed)
	if len(conflicts) > 0 {
		return p.readBack(ctx, conflicts, enrollments, nil)
	}
	return nil
}

// pushGroup creates or brings up to date the batch's enrollment group,
// reading it back first to decide which.
func (p *Pusher) pushGroup(ctx context.Context, it station.PushItem, g *dps.EnrollmentGroup) error {
	var got *dps.EnrollmentGroup
	err := p.call(ctx, "read back group "+g.EnrollmentGroupID, func(ctx context.Context) (err error) {
		got, err = p.Service.GetEnrollmentGroup(ctx, g.EnrollmentGroupID)
		return err
	})
	p.count(func(r *Report) { r.ReadBack++ })
	ifMatch := ""
	switch {
	case station.KindOf(err) == station.KindNotFound:
	case err != nil:
		return err
	default:
		ifMatch = got.ETag
	}
	it.State, it.Attempts = station.PushSent, it.Attempts+1
	if err := p.Store.UpdatePushItems(ctx, []station.PushItem{it}); err != nil {
		return err
	}
	var put *dps.EnrollmentGroup
	err = p.call(ctx, "put group "+g.EnrollmentGroupID, func(ctx context.Context) (err error) {
		put, err = p.Service.PutEnrollmentGroup(ctx, g, ifMatch)
		return err
	})
	p.count(func(r *Report) { r.Sent++ })
	switch k := station.KindOf(err); {
	case err == nil:
		it.State, it.Mode, it.ETag, it.ErrorCode, it.Error = station.PushDone, "", put.ETag, 0, ""
		p.progress(1, 0)
	case k == station.KindUnavailable || k == station.KindUnauthorized:
		return err
	default:
		it.State, it.Mode = station.PushFailed, ""
		it.ErrorCode, it.Error = refusal(err)
		p.progress(0, 1)
	}
	return p.Store.UpdatePushItems(ctx, []station.PushItem{it})
}
