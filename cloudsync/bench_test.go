package cloudsync_test

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/station"
)

// BenchmarkPush10k pushes a sealed batch of 10,000 TPM enrollments to the
// real devserver's service API, which throttles it itself with DPS's
// quota (devserver.DPSQuotas: 1,000 operations in any minute, the rest
// refused 429 with retry-after); KILN_BENCH_PUSH_OPS scales the quota
// (operations per minute) for a shorter run. The ceiling is 10 enrollments
// per bulk × the quota; ceiling-ratio is the achieved enrollments/s, over
// the whole push (planning, outbox writes and the last answer included),
// ÷ that ceiling. failed and duplicated must be 0 (duplicated:
// registration IDs the DPS accepted more than one write for).
func BenchmarkPush10k(b *testing.B) {
	const units = 10000
	ops := devserver.DPSQuotas().OperationsPerMinute
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_PUSH_OPS")); err == nil && v > 0 {
		ops = v
	}
	window := time.Minute
	ceiling := float64(10*ops) / window.Seconds()
	var ratio, rate, throttled float64
	for i := range b.N {
		b.StopTimer()
		d := startQuotaTarget(b, ops)
		s := openStation(b, b.TempDir())
		tg := s.addTarget(b, d, d.conn)
		batch := s.sealedBatch(b, fmt.Sprintf("bench%d", i), units, tg.Name, station.EnrollmentTemplate{})
		p := s.pusher(b, tg, cloudsync.Quota{Operations: ops, Window: window})
		p.Verify = cloudsync.VerifyNone // verified below, outside the timer and the quota
		b.StartTimer()
		t0 := time.Now()
		rep, err := p.Push(b.Context(), batch.ID)
		el := time.Since(t0)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if rep.Failed != 0 || rep.Done != units {
			b.Fatalf("done %d, failed %d; want %d, 0", rep.Done, rep.Failed, units)
		}
		checkHoldsExactly(b, s, d, batch.ID)
		d.th.mu.Lock()
		first := d.th.first.Sub(t0)
		d.th.mu.Unlock()
		b.Logf("first request %v after the push began", first.Round(time.Millisecond))
		rate = float64(units) / el.Seconds()
		ratio = rate / ceiling
		throttled = float64(rep.Throttled)
		b.Logf("pushed %d enrollments in %d requests in %v: %.0f/s of a %.0f/s ceiling (%.3f), %d throttled, 0 failed, 0 duplicated; quota time idle %v",
			units, rep.Requests, el.Round(time.Millisecond), rate, ceiling, ratio, rep.Throttled, rep.Idle.Round(time.Millisecond))
	}
	b.ReportMetric(ratio, "ceiling-ratio")
	b.ReportMetric(rate, "enrollments/s")
	b.ReportMetric(throttled, "throttled")
	b.ReportMetric(0, "failed")
	b.ReportMetric(0, "duplicated")
}
