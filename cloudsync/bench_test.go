package cloudsync_test

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/station"
)

// BenchmarkPush10k pushes a sealed batch of 10,000 TPM enrollments to the
// real devserver's service API behind an Azure-like throttle (a fixed
// window of N operations, the rest answered 429 with retry-after). DPS's
// quota is 1,000 operations per minute; the window is scaled to 20 s
// (KILN_BENCH_PUSH_WINDOW overrides it) so that a run takes seconds, not
// minutes: the ceiling is 10 enrollments per bulk × 1,000 operations per
// window. ceiling-ratio is the achieved enrollments/s ÷ that ceiling;
// failed and duplicated must be 0 (duplicated: registration IDs the DPS
// accepted more than one write for).
func BenchmarkPush10k(b *testing.B) {
	const units, ops = 10000, 1000
	window := 20 * time.Second
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_PUSH_WINDOW")); err == nil && v > 0 {
		window = time.Duration(v) * time.Second
	}
	ceiling := float64(10*ops) / window.Seconds()
	var ratio, rate, throttled float64
	for i := range b.N {
		b.StopTimer()
		d := startTarget(b, ops, window)
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
		rate = float64(units) / el.Seconds()
		ratio = rate / ceiling
		throttled = float64(rep.Throttled)
		b.Logf("pushed %d enrollments in %d requests in %v: %.0f/s of a %.0f/s ceiling (%.3f), %d throttled, 0 failed, 0 duplicated",
			units, rep.Requests, el.Round(time.Millisecond), rate, ceiling, ratio, rep.Throttled)
	}
	b.ReportMetric(ratio, "ceiling-ratio")
	b.ReportMetric(rate, "enrollments/s")
	b.ReportMetric(throttled, "throttled")
	b.ReportMetric(0, "failed")
	b.ReportMetric(0, "duplicated")
}
