package cloudsync

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Enable is the second phase of a two-phase enrollment: it sets the
// provisioningStatus of every enrollment (and the enrollment group) of
// pushed batch id to enabled, so that its devices may register (after QA
// passed). Each enrollment is read for its ETag and written back in bulk
// operations of mode
// updateIfMatchETag, so a change made meanwhile on the target is not
// overwritten: such an item is read again and retried. It is resumable:
// items are kept in the outbox, and one found enabled already is done.
// Kinds: NotFound, Conflict (the batch is not pushed), Unauthorized,
// Unavailable.
func (p *Pusher) Enable(ctx context.Context, id int64) (*Report, error) {
	b, err := p.Store.Batch(ctx, id)
	if err != nil {
		return nil, err
	}
	op := fmt.Sprintf("enable batch %d (%s)", b.ID, b.Name)
	if b.State != station.BatchPushed {
		return nil, station.Errorf(op, station.KindConflict, "batch %d is %s: push it first (kiln batch push %d)", b.ID, b.State, b.ID)
	}
	p.begin(b.ID)
	defer func() { p.rep.Elapsed = time.Since(p.start) }()
	pushed, err := p.Store.PushItems(ctx, b.ID, station.PushEnroll, station.PushDone)
	if err != nil {
		return nil, err
	}
	var items []station.PushItem
	for _, it := range pushed {
		items = append(items, station.PushItem{BatchID: b.ID, Op: station.PushEnable, Key: it.Key, Serial: it.Serial,
			State: station.PushPending, Mode: station.PushModeUpdate})
	}
	if err := p.Store.AddPushItems(ctx, items); err != nil {
		return nil, err
	}
	all, err := p.Store.PushItems(ctx, b.ID, station.PushEnable, "")
	if err != nil {
		return nil, err
	}
	// Sent or failed before: enabling is idempotent, do them again.
	var again []station.PushItem
	for _, it := range all {
		if it.State == station.PushSent || it.State == station.PushFailed {
			it.State, it.ErrorCode, it.Error = station.PushPending, 0, ""
			again = append(again, it)
		}
	}
	if err := p.Store.UpdatePushItems(ctx, again); err != nil {
		return nil, err
	}
	counts, err := p.Store.PushCounts(ctx, b.ID, station.PushEnable)
	if err != nil {
		return nil, err
	}
	p.rep.Total = len(all)
	p.setPhase("enable", len(all), counts[station.PushDone], 0)
	for round := 0; round < 3; round++ {
		pending, err := p.Store.PushItems(ctx, b.ID, station.PushEnable, station.PushPending)
		if err != nil {
			return nil, err
		}
		if len(pending) == 0 {
			break
		}
		var single []station.PushItem
		for _, it := range pending {
			if id, ok := strings.CutPrefix(it.Key, "group:"); ok {
				if err := p.enableGroup(ctx, it, id); err != nil {
					return p.enableReport(ctx, b, op, err)
				}
				continue
			}
			single = append(single, it)
		}
		for i := 0; i < len(single); i += dps.MaxBulkItems {
			if err := p.enableChunk(ctx, single[i:min(i+dps.MaxBulkItems, len(single))]); err != nil {
				return p.enableReport(ctx, b, op, err)
			}
		}
	}
	return p.enableReport(ctx, b, op, nil)
}

func (p *Pusher) enableReport(ctx context.Context, b *station.Batch, op string, cause error) (*Report, error) {
	all, err := p.Store.PushItems(ctx, b.ID, station.PushEnable, "")
	if err != nil {
		return p.rep, err
	}
	p.rep.Done, p.rep.Failed, p.rep.Failures = 0, 0, nil
	for _, it := range all {
		switch it.State {
		case station.PushDone:
			p.rep.Done++
		case station.PushFailed:
			p.rep.Failed++
			p.rep.Failures = append(p.rep.Failures, it)
		}
	}
	p.rep.Elapsed = time.Since(p.start)
	if cause != nil {
		return p.rep, station.Errorf(op, station.KindOf(cause), "%w: %d of %d enrollments are enabled; run it again to resume", cause, p.rep.Done, p.rep.Total)
	}
	if p.rep.Done < p.rep.Total {
		return p.rep, station.Errorf(op, station.KindInvalid, "%d of %d enrollments could not be enabled: see kiln batch show %d, then run it again", p.rep.Total-p.rep.Done, p.rep.Total, b.ID)
	}
	return p.rep, nil
}

// enableChunk reads up to ten enrollments and writes them back enabled,
// each under its ETag.
func (p *Pusher) enableChunk(ctx context.Context, chunk []station.PushItem) error {
	var body []dps.IndividualEnrollment
	var sent, settled []station.PushItem
	done, failed := 0, 0
	for _, it := range chunk {
		var e *dps.IndividualEnrollment
		err := p.call(ctx, "read "+it.Key, func(ctx context.Context) (err error) {
			e, err = p.Service.GetEnrollment(ctx, it.Key)
			return err
		})
		switch k := station.KindOf(err); {
		case err == nil && strings.EqualFold(e.ProvisioningStatus, dps.ProvisioningEnabled):
			it.State, it.ETag = station.PushDone, e.ETag
			settled = append(settled, it)
			done++
		case err == nil:
			e.ProvisioningStatus = dps.ProvisioningEnabled
			e.RegistrationState = nil
			body = append(body, *e)
			it.State, it.ETag, it.Attempts = station.PushSent, e.ETag, it.Attempts+1
			sent = append(sent, it)
		case k == station.KindUnavailable || k == station.KindUnauthorized:
			return err
		default:
			it.State = station.PushFailed
			it.ErrorCode, it.Error = refusal(err)
			settled = append(settled, it)
			failed++
		}
	}
	if err := p.Store.UpdatePushItems(ctx, append(settled, sent...)); err != nil {
		return err
	}
	p.progress(done, failed)
	if len(body) == 0 {
		return nil
	}
	var res *dps.BulkEnrollmentOperationResult
	err := p.call(ctx, "bulk enable", func(ctx context.Context) (err error) {
		res, err = p.Service.BulkEnrollments(ctx, dps.BulkUpdateIfMatchETag, body)
		return err
	})
	p.count(func(r *Report) { r.Sent += len(body) })
	if err != nil {
		return err
	}
	refused := map[string]dps.BulkEnrollmentOperationError{}
	for _, e := range res.Errors {
		refused[strings.ToLower(e.RegistrationID)] = e
	}
	done, failed = 0, 0
	for i := range sent {
		it := &sent[i]
		e, bad := refused[strings.ToLower(it.Key)]
		switch {
		case !bad:
			it.State, it.ErrorCode, it.Error = station.PushDone, 0, ""
			done++
		case e.ErrorCode/1000 == 412:
			it.State = station.PushPending // changed meanwhile: read it again
		default:
			it.State, it.ErrorCode = station.PushFailed, e.ErrorCode
			it.Error = fmt.Sprintf("DPS refused it (%d): %s", e.ErrorCode, e.ErrorStatus)
			failed++
		}
	}
	if err := p.Store.UpdatePushItems(ctx, sent); err != nil {
		return err
	}
	p.progress(done, failed)
	return nil
}

// enableGroup enables the batch's enrollment group, under its ETag.
func (p *Pusher) enableGroup(ctx context.Context, it station.PushItem, id string) error {
	var g *dps.EnrollmentGroup
	err := p.call(ctx, "read group "+id, func(ctx context.Context) (err error) {
		g, err = p.Service.GetEnrollmentGroup(ctx, id)
		return err
	})
	if err == nil && !strings.EqualFold(g.ProvisioningStatus, dps.ProvisioningEnabled) {
		g.ProvisioningStatus = dps.ProvisioningEnabled
		it.Attempts++
		err = p.call(ctx, "enable group "+id, func(ctx context.Context) (err error) {
			g, err = p.Service.PutEnrollmentGroup(ctx, g, g.ETag)
			return err
		})
		p.count(func(r *Report) { r.Sent++ })
	}
	switch k := station.KindOf(err); {
	case err == nil:
		it.State, it.ETag, it.ErrorCode, it.Error = station.PushDone, g.ETag, 0, ""
		p.progress(1, 0)
	case k == station.KindConflict:
		it.State = station.PushPending // changed meanwhile: the next round reads it again
	case k == station.KindUnavailable || k == station.KindUnauthorized:
		return err
	default:
		it.State = station.PushFailed
		it.ErrorCode, it.Error = refusal(err)
		p.progress(0, 1)
	}
	return p.Store.UpdatePushItems(ctx, []station.PushItem{it})
}
