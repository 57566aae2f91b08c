package cloudsync

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// queryPageSize is the page size of the query read-back.
const queryPageSize = 500

// verify reads back the done enrollments of batch b (a sample, or all of
// them through the query API) and marks failed those the target does not
// hold as pushed.
func (p *Pusher) verify(ctx context.Context, b *station.Batch, enrollments map[string]*dps.IndividualEnrollment) error {
	mode := p.Verify
	if mode == "" {
		mode = VerifySample
	}
	if mode == VerifyNone {
		return nil
	}
	done, err := p.Store.PushItems(ctx, b.ID, station.PushEnroll, station.PushDone)
	if err != nil {
		return err
	}
	var items []station.PushItem
	for _, it := range done {
		if _, ok := enrollments[it.Key]; ok {
			items = append(items, it)
		}
	}
	got := map[string]*dps.IndividualEnrollment{}
	switch mode {
	case VerifyAll:
		p.setPhase("verify", len(items), 0, 0)
		cont := ""
		for {
			var page []dps.IndividualEnrollment
			var next string
			err := p.call(ctx, "query enrollments", func(ctx context.Context) (err error) {
				page, next, err = p.Service.QueryEnrollments(ctx, "*", dps.QueryPage{Size: queryPageSize, Continuation: cont})
				return err
			})
			if err != nil {
				return err
			}
			n := 0
			for i := range page {
				k := strings.ToLower(page[i].RegistrationID)
				if _, ok := enrollments[k]; ok {
					got[k] = &page[i]
					n++
				}
			}
			p.progress(n, 0)
			if next == "" || len(page) == 0 {
				break
			}
			cont = next
		}
	default:
		n := p.Sample
		if n <= 0 {
			n = 20
		}
		rand.Shuffle(len(items), func(i, j int) { items[i], items[j] = items[j], items[i] })
		items = items[:min(n, len(items))]
		p.setPhase("verify", len(items), 0, 0)
		for _, it := range items {
			var e *dps.IndividualEnrollment
			err := p.call(ctx, "verify "+it.Key, func(ctx context.Context) (err error) {
				e, err = p.Service.GetEnrollment(ctx, enrollments[it.Key].RegistrationID)
				return err
			})
			switch {
			case station.KindOf(err) == station.KindNotFound:
			case err != nil:
				return err
			default:
				got[it.Key] = e
			}
			p.progress(1, 0)
		}
	}
	var bad []station.PushItem
	for _, it := range items {
		e := got[it.Key]
		switch {
		case e == nil:
			it.ErrorCode, it.Error = dps.CodeEnrollmentMissing, "verification: the target does not hold the enrollment after the push: push again"
		case compare(e, enrollments[it.Key], false) != matchSame:
			it.ErrorCode, it.Error = dps.CodeConflict, fmt.Sprintf("verification: the target's enrollment %s differs from the batch's: push again to update it", it.Key)
		default:
			continue
		}
		it.State = station.PushFailed
		bad = append(bad, it)
	}
	p.count(func(r *Report) { r.Verified = len(items) })
	return p.Store.UpdatePushItems(ctx, bad)
}
