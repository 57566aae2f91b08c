package cloudsync

import (
	"context"
	"sync"
	"time"

	"github.com/kilnworks/kiln/station"
)

// Quota is the service operations quota a push stays under. Every request
// is one operation, whether it carries one enrollment or a bulk of ten.
type Quota struct {
	Operations int           // per Window; 0: station.DefaultOpsPerMinute
	Window     time.Duration // 0: one minute
	// Headroom is the share of the quota the pusher uses, for the clocks
	// of client and service that do not agree; 0: 0.98.
	Headroom float64
}

func (q Quota) withDefaults() Quota {
	if q.Operations <= 0 {
		q.Operations = station.DefaultOpsPerMinute
	}
	if q.Window <= 0 {
		q.Window = time.Minute
	}
	if q.Headroom <= 0 || q.Headroom > 1 {
		q.Headroom = 0.98
	}
	return q
}

// interval is the time between two requests at the paced rate.
func (q Quota) interval() time.Duration {
	q = q.withDefaults()
	return time.Duration(float64(q.Window) / (float64(q.Operations) * q.Headroom))
}

// pacer spaces requests evenly at the quota's rate, shared by every worker
// of a push. A slot no worker was ready for is lost, except for a small
// catch-up allowance (three quarters of the headroom: 15 requests of a 1,000 quota,
// none of a small one): no window of the service's counter sees more than
// the quota.
type pacer struct {
	mu       sync.Mutex
	interval time.Duration
	slack    time.Duration // how far behind the schedule may be caught up
	next     time.Time
	ops      int
	idle     time.Duration // slots lost: no request was ready for them
}

func newPacer(q Quota) *pacer {
	q = q.withDefaults()
	p := &pacer{interval: q.interval()}
	p.slack = time.Duration(float64(q.Operations)*(1-q.Headroom)*3/4) * p.interval
	return p
}

// wait blocks until the caller may send one request. Kinds: Unavailable
// when ctx ends first.
func (p *pacer) wait(ctx context.Context) error {
	p.mu.Lock()
	now := time.Now()
	t := p.next
	if t.IsZero() || t.Before(now.Add(-p.slack)) {
		if !t.IsZero() {
			p.idle += now.Add(-p.slack).Sub(t)
		}
		t = now.Add(-p.slack)
		if p.next.IsZero() {
			t = now
		}
	}
	p.next = t.Add(p.interval)
	p.ops++
	p.mu.Unlock()
	return sleep(ctx, time.Until(t))
}

// hold makes every worker wait d before its next request: the service
// asked for it (retry-after).
func (p *pacer) hold(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := time.Now().Add(d); t.After(p.next) {
		p.next = t
	}
}

// lost returns the time of the slots lost so far.
func (p *pacer) lost() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.idle
}

// sleep waits d or until ctx ends. Kinds: Unavailable.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return station.E("wait", station.KindUnavailable, context.Cause(ctx))
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return station.E("wait", station.KindUnavailable, ctx.Err())
	}
}
