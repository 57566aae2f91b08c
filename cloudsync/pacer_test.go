package cloudsync

import (
	"context"
	"net/http"
	"testing"
	"testing/synctest"
	"time"
)

func TestPacerSpacesAndHolds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// 490 operations a minute (98 % of 500): one every 122.4 ms.
		p := newPacer(Quota{Operations: 500, Window: time.Minute})
		if p.interval != 122448979*time.Nanosecond {
			t.Fatalf("interval %v", p.interval)
		}
		ctx := context.Background()
		start := time.Now()
		for range 10 {
			if err := p.wait(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if got, want := time.Since(start), 9*p.interval; got != want {
			t.Errorf("10 requests took %v; want %v (no burst)", got, want)
		}
		// The service asked for 3 s: the next request waits that long.
		p.hold(3 * time.Second)
		t0 := time.Now()
		p.wait(ctx)
		if got := time.Since(t0); got != 3*time.Second {
			t.Errorf("after hold(3s) the next request waited %v", got)
		}
		// Idle for a while: only the catch-up allowance (7 requests of a
		// 500 quota) goes at once, then the pace resumes.
		if p.slack != 7*p.interval {
			t.Errorf("slack %v; want 7 intervals", p.slack)
		}
		time.Sleep(time.Minute)
		t0 = time.Now()
		for range 10 {
			p.wait(ctx)
		}
		if got, want := time.Since(t0), 2*p.interval; got != want {
			t.Errorf("10 requests after an idle minute took %v; want %v", got, want)
		}
		if p.lost() < 50*time.Second {
			t.Errorf("lost %v of quota time in an idle minute", p.lost())
		}
		cctx, cancel := context.WithCancel(ctx)
		p.hold(time.Hour)
		go func() { time.Sleep(time.Second); cancel() }()
		if err := p.wait(cctx); err == nil {
			t.Error("wait returned nil after its context ended")
		}
	})
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	for _, tt := range []struct {
		in   string
		want time.Duration
	}{
		{"", 0}, {"3", 3 * time.Second}, {"0.5", 500 * time.Millisecond}, {"-1", 0}, {"soon", 0},
		{now.Add(7 * time.Second).Format(http.TimeFormat), 7 * time.Second}, {now.Add(-time.Hour).Format(http.TimeFormat), 0},
	} {
		if got := parseRetryAfter(tt.in, now); got != tt.want {
			t.Errorf("parseRetryAfter(%q) = %v; want %v", tt.in, got, tt.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	for a, want := range map[int]time.Duration{0: 500 * time.Millisecond, 3: 4 * time.Second, 10: 30 * time.Second} {
		if got := backoff(a); got < want*8/10 || got > want*12/10 {
			t.Errorf("backoff(%d) = %v; want %v ± 20 %%", a, got, want)
		}
	}
}
