package cloudsync_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// The crash test runs the pusher in a child process: this test binary,
// started again with these variables set, pushes one batch and exits.
const (
	envChildDir   = "KILN_TEST_PUSH_CHILD_DIR"
	envChildBatch = "KILN_TEST_PUSH_CHILD_BATCH"
	envChildOps   = "KILN_TEST_PUSH_CHILD_OPS"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(envChildDir); dir != "" {
		os.Exit(pushChild(dir))
	}
	os.Exit(m.Run())
}

// pushChild is the child process: it pushes a batch of the station in dir
// to the batch's target, as `kiln batch push` does.
func pushChild(dir string) int {
	ctx := context.Background()
	id, _ := strconv.ParseInt(os.Getenv(envChildBatch), 10, 64)
	ops, _ := strconv.Atoi(os.Getenv(envChildOps))
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer st.Close()
	sl, err := cloudsync.LoadSealer(filepath.Join(dir, cloudsync.KeyFile))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b, err := st.Batch(ctx, id)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	tg, err := st.Target(ctx, b.TargetID)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	svc, err := cloudsync.NewServiceClient(tg, sl)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p := &cloudsync.Pusher{Store: st, Service: svc, Quota: cloudsync.Quota{Operations: ops * 60, Window: time.Minute}, Workers: 4}
	if _, err := p.Push(ctx, id); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func TestPushCrashResume(t *testing.T) {
	const units, ops = 1000, 40
	d := startQuotaTarget(t, ops*60)
	dir := t.TempDir()
	s := openStation(t, dir)
	tg := s.addTarget(t, d, d.conn)
	b := s.sealedBatch(t, "crash", units, tg.Name, station.EnrollmentTemplate{})

	ctx := t.Context()
	for run := 1; run <= 2; run++ {
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), envChildDir+"="+dir, envChildBatch+"="+fmt.Sprint(b.ID), envChildOps+"="+fmt.Sprint(ops))
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill it (SIGKILL: no deferred code, no clean-up) in the middle
		// of its 34th bulk operation of this run: in the first run after
		// the DPS applied it (the answer is lost), in the second before
		// the DPS saw it (the request is lost).
		stage := map[int]string{1: "after", 2: "before"}[run]
		killed := make(chan struct{})
		var n atomic.Int32
		d.th.setHook(func(s string) {
			if s == stage && n.Add(1) == 34 {
				cmd.Process.Kill()
				close(killed)
			}
		})
		select {
		case <-killed:
		case <-time.After(60 * time.Second):
			t.Fatalf("run %d: the child did not reach its 34th bulk operation in a minute", run)
		}
		cmd.Wait()
		c, err := s.store.PushCounts(ctx, b.ID, station.PushEnroll)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("run %d killed: %d done, %d sent (fate unknown), %d pending", run, c[station.PushDone], c[station.PushSent], c[station.PushPending])
		if c[station.PushSent] == 0 {
			t.Errorf("run %d: no item is left sent; the kill came between two requests", run)
		}
	}
	d.th.setHook(nil)
	// Restart in this process and finish.
	p := s.pusher(t, tg, cloudsync.Quota{Operations: ops * 60, Window: time.Minute})
	p.Verify = cloudsync.VerifyAll
	rep, err := p.Push(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.ReadBack == 0 {
		t.Error("the resumed push read nothing back")
	}
	t.Logf("resumed: %d read back, %d sent, %d requests, %d throttled", rep.ReadBack, rep.Sent, rep.Requests, rep.Throttled)
	if rep.Done != units || rep.Failed != 0 {
		t.Errorf("done %d, failed %d; want %d, 0", rep.Done, rep.Failed, units)
	}
	checkHoldsExactly(t, s, d, b.ID)
}
