package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnworks/kiln/qa"
	"github.com/kilnworks/kiln/station"
)

// slotsUnits is how many units each round of BenchmarkSlots115200
// provisions, and the slots of its parallel half.
const slotsUnits = 8

// slotsMinRounds is the fewest rounds BenchmarkSlots115200 runs, whatever
// -benchtime says: one round takes about 15 s, so -benchtime=1s would give
// one round and a ratio at the mercy of one burst of load from elsewhere.
// The rounds b.Loop does not ask for run after it, untimed.
const slotsMinRounds = 3

// BenchmarkSlots115200 measures multi-slot provisioning: units per minute
// on 1 slot and on 8 slots at 115200 baud, and their ratio.
//
// One round provisions 8 fresh simulated DUTs on 1 slot (one after the
// other) and 8 more on 8 slots (at once), in alternating order from round
// to round so that a drift in the machine's load does not favour one side.
// Each DUT is its own `kiln simulate` process with its own reference TPM
// simulator, plugged in (started) before the clock runs, and paces both
// directions of its own line to 115200 8N1 (10 bits per byte), as a real
// DUT on its own USB-serial adapter does: a slot's line time is its own,
// so what the parallel half gains is parallelism, and what it loses is
// contention for the CPU, the store and the DPS. Every unit is TPM,
// end to end (enrollment on one embedded DPS, the DUT's registration with
// its 1-second poll, telemetry to the hub), into one SQLite store.
//
// Metrics: the rates over all rounds; x-1slot, the median of the rounds'
// ratios (8-slot rate ÷ 1-slot rate, each round its own baseline), with
// the lowest and highest; and cpu-util-8slots, the CPU time the station,
// DPS and DUT processes used during the 8-slot halves ÷ (wall time × cores):
// near 1, the parallel figure was limited by the CPU, not by the lines.
func BenchmarkSlots115200(b *testing.B) {
	ctx := context.Background()
	home := b.TempDir()
	c, err := loadConfig(&env{getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}})
	if err != nil {
		b.Fatal(err)
	}
	e := &env{stdout: os.Stderr, stderr: os.Stderr, getenv: func(string) string { return "" }, logLevel: slog.LevelError}
	bench, err := newQABench(ctx, e, c, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer bench.Close()
	sc, err := qa.Parse("bench", []byte(fmt.Sprintf("name: bench\nmethod: tpm\nsimulated: %d\nline-rate: 115200\nexpect: pass\n", slotsUnits)))
	if err != nil {
		b.Fatal(err)
	}
	st, err := bench.Open(ctx, sc)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	qs := st.(*qaStation)
	// provision starts the DUTs, then provisions them on slots and returns
	// the wall time of the provisioning and the CPU time spent in it.
	// Untimed rounds (those run after b.Loop to reach slotsMinRounds) keep
	// the benchmark timer stopped, so that ns/op stays the time of one
	// timed round.
	provision := func(round, slots int, timed bool) (wall, cpu time.Duration) {
		b.StopTimer()
		duts := make([]*simChild, slotsUnits)
		errs := make([]error, slotsUnits)
		var wg sync.WaitGroup
		for i := range duts {
			wg.Go(func() {
				duts[i], errs[i] = bench.startDUT(ctx, qa.DUTSpec{Serial: fmt.Sprintf("BENCH-%d-%d-%d-%d", round, slots, i, time.Now().UnixNano()), LineRate: 115200})
			})
		}
		wg.Wait()
		defer func() {
			for _, d := range duts {
				if d != nil {
					d.Close()
				}
			}
			if timed {
				b.StartTimer() // b.Loop must find it running
			}
		}()
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		cpu0 := cpuTime(duts)
		if timed {
			b.StartTimer()
		}
		start := time.Now()
		next := make(chan *simChild)
		fails := make(chan error, slotsUnits)
		var pw sync.WaitGroup
		for range slots {
			pw.Go(func() {
				for d := range next {
					if r, err := qs.Provision(ctx, station.Request{Port: d.Port(), Operator: "bench"}); err != nil || r.Result != station.ResultPass {
						fails <- fmt.Errorf("%s: %v", d.Port(), err)
					}
				}
			})
		}
		for _, d := range duts {
			next <- d
		}
		close(next)
		pw.Wait()
		wall = time.Since(start)
		b.StopTimer()
		cpu = cpuTime(duts) - cpu0
		close(fails)
		for err := range fails {
			b.Fatal(err)
		}
		return wall, cpu
	}
	var one, eight, cpu8 time.Duration
	var ratios []float64
	rounds := 0
	round := func(timed bool) {
		var w1, w8, c8 time.Duration
		if rounds%2 == 0 {
			w1, _ = provision(rounds, 1, timed)
			w8, c8 = provision(rounds, slotsUnits, timed)
		} else {
			w8, c8 = provision(rounds, slotsUnits, timed)
			w1, _ = provision(rounds, 1, timed)
		}
		one, eight, cpu8 = one+w1, eight+w8, cpu8+c8
		ratios = append(ratios, float64(w1)/float64(w8))
		rounds++
	}
	for b.Loop() {
		round(true)
	}
	for rounds < slotsMinRounds {
		round(false)
	}
	slices.Sort(ratios)
	median := ratios[len(ratios)/2]
	if len(ratios)%2 == 0 {
		median = (median + ratios[len(ratios)/2-1]) / 2
	}
	perMin := func(d time.Duration) float64 { return float64(slotsUnits*rounds) / d.Minutes() }
	b.ReportMetric(float64(rounds), "rounds")
	b.ReportMetric(perMin(one), "units/min-1slot")
	b.ReportMetric(perMin(eight), "units/min-8slots")
	b.ReportMetric(median, "x-1slot")
	b.ReportMetric(ratios[0], "x-1slot-low")
	b.ReportMetric(ratios[len(ratios)-1], "x-1slot-high")
	b.ReportMetric(float64(cpu8)/float64(eight)/float64(runtime.NumCPU()), "cpu-util-8slots")
}

// cpuTime is the CPU time (user and system) used so far by this process
// and the DUT processes.
func cpuTime(duts []*simChild) time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	t := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	for _, d := range duts {
		if d != nil && d.cmd.Process != nil {
			t += procCPU(d.cmd.Process.Pid)
		}
	}
	return t
}

// procCPU reads a process's utime and stime from /proc/PID/stat (clock
// ticks of 1/100 s, USER_HZ on Linux); 0 when it cannot.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses and may
	// hold spaces: state is field 3, utime 14, stime 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	k, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return time.Duration(u+k) * 10 * time.Millisecond
}
