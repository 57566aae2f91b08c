package link_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// pair connects a Client to Serve over an in-memory line. hookC and hookS,
// when set, rewrite what the client and the server write.
func pair(t *testing.T, h link.Handler, ccfg link.Config, scfg link.ServeConfig,
	hookC, hookS func(n int, p []byte) []byte) (*link.Client, *countRW) {
	t.Helper()
	a, b := duplex()
	var crw io.ReadWriteCloser = a
	if hookC != nil {
		crw = &writeHook{ReadWriteCloser: a, fn: hookC}
	}
	srw := &countRW{ReadWriteCloser: b}
	var s io.ReadWriteCloser = srw
	if hookS != nil {
		s = &writeHook{ReadWriteCloser: srw, fn: hookS}
	}
	if ccfg.Port == "" {
		ccfg.Port = "test-line"
	}
	c := link.NewClient(crw, ccfg)
	serve(t, s, h, scfg)
	t.Cleanup(func() { c.Close() })
	return c, srw
}

func TestInfoAndTPM(t *testing.T) {
	h := newFake()
	c, srw := pair(t, h, link.Config{}, link.ServeConfig{}, nil, nil)
	ctx := t.Context()
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := testInfo
	want.Protocol = 1
	if diff := cmp.Diff(want, info); diff != "" {
		t.Errorf("Info (-want +got):\n%s", diff)
	}
	for i := range 5 {
		cmd := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 1, byte(0x43 + i), 0, 0}
		got, err := c.TPM(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		if want := append([]byte("rsp:"), cmd...); !bytes.Equal(got, want) {
			t.Errorf("TPM = % x, want % x", got, want)
		}
	}
	c.Close()
	st := c.Stats()
	for deadline := time.Now().Add(time.Second); st.BytesOut != srw.in.Load() && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond) // the agent's count of its last read may lag
	}
	if st.BytesOut != srw.in.Load() || st.BytesIn != srw.out.Load() {
		t.Errorf("Stats bytes out/in = %d/%d, the agent read/wrote %d/%d", st.BytesOut, st.BytesIn, srw.in.Load(), srw.out.Load())
	}
	if st.Requests != 6 || st.Retries != 0 || st.BadFrames != 0 {
		t.Errorf("Stats = %+v, want 6 requests, no retries, no bad frames", st)
	}
	if got := h.calls.Load(); got != 5 {
		t.Errorf("handler ran %d times, want 5", got)
	}
}

func TestTPMRunsHelloFirst(t *testing.T) {
	c, _ := pair(t, newFake(), link.Config{}, link.ServeConfig{}, nil, nil)
	if _, err := c.TPM(t.Context(), []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Requests != 2 {
		t.Errorf("requests = %d, want 2 (HELLO, TPM)", st.Requests)
	}
}

// garbage returns n pseudo-random bytes, some of them 0x00.
func garbage(seed, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed*2654435761 + 1)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func TestGarbageOnTheLine(t *testing.T) {
	h := newFake()
	// Garbage before every frame in both directions, and inside every third
	// response.
	hookC := func(n int, p []byte) []byte { return append(garbage(n, n%40), p...) }
	hookS := func(n int, p []byte) []byte {
		out := garbage(1000+n, 5+n%30)
		if n%3 == 0 && len(p) > 8 {
			mid := len(p) / 2
			out = append(out, p[:mid]...)
			out = append(out, garbage(2000+n, 7)...)
			return append(out, p[mid:]...)
		}
		return append(out, p...)
	}
	c, _ := pair(t, h, link.Config{HelloTimeout: 5 * time.Second, TPMTimeout: 5 * time.Second, Attempts: 5}, link.ServeConfig{}, hookC, hookS)
	ctx := t.Context()
	if _, err := c.Info(ctx); err != nil {
		t.Fatal(err)
	}
	const n = 30
	for i := range n {
		cmd := fmt.Appendf(nil, "command %d", i)
		got, err := c.TPM(ctx, cmd)
		if err != nil {
			t.Fatalf("command %d: %v", i, err)
		}
		if want := append([]byte("rsp:"), cmd...); !bytes.Equal(got, want) {
			t.Fatalf("command %d: got %q, want %q", i, got, want)
		}
	}
	if got := h.calls.Load(); got != n {
		t.Errorf("handler ran %d times for %d commands: a retransmission ran a command again", got, n)
	}
	st := c.Stats()
	if st.BadFrames == 0 || st.Retries == 0 {
		t.Errorf("Stats = %+v: expected dropped frames and retransmissions", st)
	}
	t.Logf("stats: %+v", st)
}

// corruptNth flips a bit in the middle of the nth write.
func corruptNth(nth int) func(n int, p []byte) []byte {
	return func(n int, p []byte) []byte {
		if n == nth {
			p[len(p)/2] ^= 0x10
			if p[len(p)/2] == 0 {
				p[len(p)/2] = 0x33
			}
		}
		return p
	}
}

func TestCorruptResponseIsRetransmittedFromCache(t *testing.T) {
	h := newFake()
	// Write 1 is the HELLO response, write 2 the first TPM response.
	c, _ := pair(t, h, link.Config{TPMTimeout: 20 * time.Second}, link.ServeConfig{}, nil, corruptNth(2))
	start := time.Now()
	got, err := c.TPM(t.Context(), []byte("getrandom"))
	if err != nil {
		t.Fatal(err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("recovery took %v: the station waited for a timeout instead of retransmitting", elapsed)
	}
	if string(got) != "rsp:getrandom" {
		t.Errorf("TPM = %q", got)
	}
	if calls := h.calls.Load(); calls != 1 {
		t.Errorf("handler ran %d times, want 1 (the retransmission must be answered from the cache)", calls)
	}
	if st := c.Stats(); st.Retries != 1 || st.BadFrames != 1 {
		t.Errorf("Stats = %+v, want 1 retry and 1 bad frame", st)
	}
}

func TestCorruptRequestIsNAKed(t *testing.T) {
	h := newFake()
	// Write 1 is HELLO, write 2 the first TPM request.
	c, _ := pair(t, h, link.Config{TPMTimeout: 20 * time.Second}, link.ServeConfig{}, corruptNth(2), nil)
	start := time.Now()
	if _, err := c.TPM(t.Context(), []byte("createprimary")); err != nil {
		t.Fatal(err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("recovery took %v: no NAK-triggered retransmission", elapsed)
	}
	if calls := h.calls.Load(); calls != 1 {
		t.Errorf("handler ran %d times, want 1", calls)
	}
	if st := c.Stats(); st.Retries != 1 {
		t.Errorf("Stats = %+v, want 1 retry", st)
	}
}

func TestRetransmitAfterTimeout(t *testing.T) {
	tests := []struct {
		name         string
		hookC, hookS func(n int, p []byte) []byte
	}{
		// The first TPM request never arrives: the agent runs the retransmission.
		{"request lost", func(n int, p []byte) []byte {
			if n == 2 {
				return nil
			}
			return p
		}, nil},
		// The first TPM response never arrives: the agent answers the
		// retransmission from its cache.
		{"response lost", nil, func(n int, p []byte) []byte {
			if n == 2 {
				return nil
			}
			return p
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := newFake()
				c, _ := pair(t, h, link.Config{TPMTimeout: 7 * time.Second}, link.ServeConfig{}, tt.hookC, tt.hookS)
				if _, err := c.Info(t.Context()); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				if _, err := c.TPM(t.Context(), []byte("pcrread")); err != nil {
					t.Fatal(err)
				}
				if got := time.Since(start); got != 7*time.Second {
					t.Errorf("answered after %v, want exactly one 7s timeout", got)
				}
				if calls := h.calls.Load(); calls != 1 {
					t.Errorf("handler ran %d times, want 1", calls)
				}
				if st := c.Stats(); st.Retries != 1 {
					t.Errorf("Stats = %+v, want 1 retry", st)
				}
				c.Close()
			})
		})
	}
}

func TestNoAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := duplex()
		go io.Copy(io.Discard, b) // a DUT that hears but never answers
		c := link.NewClient(a, link.Config{Port: "/dev/ttyUSB7"})
		start := time.Now()
		_, err := c.TPM(t.Context(), []byte{1})
		if got := station.KindOf(err); got != station.KindUnavailable {
			t.Fatalf("TPM error %v of kind %v, want unavailable", err, got)
		}
		if got := time.Since(start); got != 3*link.DefaultHelloTimeout {
			t.Errorf("gave up after %v, want 3 × %v", got, link.DefaultHelloTimeout)
		}
		const want = "hello: DUT on /dev/ttyUSB7 stopped answering (3 attempts, 2s each): check the cable and that the agent is running"
		if err.Error() != want {
			t.Errorf("error = %q\nwant    %q", err, want)
		}
		if st := c.Stats(); st.Retries != 2 || st.BytesOut != 3*int64(len(link.AppendFrame(nil, link.Frame{Type: link.TypeRequest, Cmd: link.CmdHello, Payload: make([]byte, 6)}))) {
			t.Errorf("Stats = %+v", st)
		}
		c.Close()
		b.Close()
	})
}

func TestVersionMismatch(t *testing.T) {
	tests := []struct {
		name                   string
		cMin, cMax, sMin, sMax int
		update                 string
	}{
		{"station newer", 2, 3, 1, 1, "update the agent firmware"},
		{"agent newer", 1, 1, 2, 2, "update the station"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs bytes.Buffer
			var mu sync.Mutex
			logger := slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil))
			c, _ := pair(t, newFake(), link.Config{MinVersion: tt.cMin, MaxVersion: tt.cMax},
				link.ServeConfig{MinVersion: tt.sMin, MaxVersion: tt.sMax, Logger: logger}, nil, nil)
			_, err := c.Info(t.Context())
			if station.KindOf(err) != station.KindInvalid {
				t.Fatalf("Info error %v, want kind invalid", err)
			}
			want := fmt.Sprintf("hello: DUT on test-line: no common protocol version: the station speaks %d–%d, this agent speaks %d–%d: %s",
				tt.cMin, tt.cMax, tt.sMin, tt.sMax, tt.update)
			if err.Error() != want {
				t.Errorf("error = %q\nwant    %q", err, want)
			}
			mu.Lock()
			defer mu.Unlock()
			if !strings.Contains(logs.String(), "no common protocol version") {
				t.Errorf("the agent did not log the mismatch; log:\n%s", logs.String())
			}
		})
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestAgentChoosesVersionOutsideStationRange(t *testing.T) {
	// A faulty agent that ignores the offered range.
	a, b := duplex()
	c := link.NewClient(a, link.Config{Port: "p"})
	defer c.Close()
	go func() {
		dec := link.NewDecoder(b, 0)
		f, err := dec.Next()
		if err != nil {
			return
		}
		// version 9, max frame 16384
		p := []byte{0x01, 0, 1, 9, 0x02, 0, 4, 0, 0, 0x40, 0}
		b.Write(link.AppendFrame(nil, link.Frame{Type: link.TypeResponse, Seq: f.Seq, Cmd: link.CmdHello, Payload: p}))
		io.Copy(io.Discard, b)
	}()
	_, err := c.Info(t.Context())
	if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "chose version 9, this station speaks 1–1: update the station") {
		t.Errorf("Info error = %v", err)
	}
}

func TestErrorFrameBecomesStationError(t *testing.T) {
	h := newFake()
	h.fn = func(context.Context, []byte) ([]byte, error) {
		return nil, station.Errorf("TPM command", station.KindNotFound, "this DUT has no TPM configured: start the agent with --tpm")
	}
	c, _ := pair(t, h, link.Config{Port: "/dev/pts/9"}, link.ServeConfig{}, nil, nil)
	_, err := c.TPM(t.Context(), []byte{1})
	var se *station.Error
	if !errors.As(err, &se) || se.Kind != station.KindNotFound {
		t.Fatalf("TPM error %#v, want a *station.Error of kind not found", err)
	}
	const want = "TPM command: DUT on /dev/pts/9: TPM command: this DUT has no TPM configured: start the agent with --tpm"
	if err.Error() != want {
		t.Errorf("error = %q\nwant    %q", err, want)
	}
}

func TestDUTClosesMidRequest(t *testing.T) {
	a, b := duplex()
	entered := make(chan struct{})
	h := newFake()
	h.fn = func(ctx context.Context, cmd []byte) ([]byte, error) {
		close(entered)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	serve(t, b, h, link.ServeConfig{})
	c := link.NewClient(a, link.Config{Port: "/dev/pts/3", TPMTimeout: 30 * time.Second})
	defer c.Close()
	go func() {
		<-entered
		b.Close() // the DUT is unplugged while its TPM works
	}()
	start := time.Now()
	_, err := c.TPM(t.Context(), []byte("createprimary"))
	if station.KindOf(err) != station.KindUnavailable {
		t.Fatalf("error %v, want kind unavailable", err)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("noticed after %v; the closed line should be noticed at once", elapsed)
	}
	if !strings.Contains(err.Error(), "DUT on /dev/pts/3 dropped the line") || !strings.Contains(err.Error(), "check the cable") {
		t.Errorf("error = %q", err)
	}
}

func TestContextCancelled(t *testing.T) {
	h := newFake()
	release := make(chan struct{})
	h.fn = func(context.Context, []byte) ([]byte, error) { <-release; return []byte{1}, nil }
	c, _ := pair(t, h, link.Config{}, link.ServeConfig{}, nil, nil)
	defer close(release)
	if _, err := c.Info(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := c.TPM(ctx, []byte{1})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v, want context.DeadlineExceeded", err)
	}
}

func TestOversizeFrames(t *testing.T) {
	t.Run("station refuses to send", func(t *testing.T) {
		c, srw := pair(t, newFake(), link.Config{}, link.ServeConfig{MaxFrame: 1024}, nil, nil)
		if _, err := c.Info(t.Context()); err != nil {
			t.Fatal(err)
		}
		before := srw.in.Load()
		_, err := c.TPM(t.Context(), make([]byte, 1024))
		if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "1024-byte frame limit") {
			t.Errorf("error %v, want kind invalid naming the limit", err)
		}
		if got, _ := c.TPM(t.Context(), make([]byte, 1024-link.MinFrame)); len(got) == 0 {
			t.Errorf("a request of exactly the limit failed")
		}
		if srw.in.Load() == before {
			t.Errorf("nothing was sent")
		}
	})
	t.Run("agent drops and NAKs", func(t *testing.T) {
		a, b := duplex()
		serve(t, b, newFake(), link.ServeConfig{MaxFrame: 1024})
		defer a.Close()
		go a.Write(link.AppendFrame(nil, link.Frame{Type: link.TypeRequest, Seq: 5, Cmd: link.CmdTPM, Payload: make([]byte, 5000)}))
		dec := link.NewDecoder(a, 0)
		f, err := dec.Next()
		if err != nil || f.Type != link.TypeNAK {
			t.Fatalf("answer to an oversize frame: %+v, %v; want a NAK", f, err)
		}
		go a.Write(link.AppendFrame(nil, helloExample))
		f, err = dec.Next()
		if err != nil || f.Type != link.TypeResponse || f.Seq != 1 {
			t.Fatalf("answer to HELLO after an oversize frame: %+v, %v", f, err)
		}
	})
}

func TestAgentRawRules(t *testing.T) {
	a, b := duplex()
	serve(t, b, newFake(), link.ServeConfig{})
	defer a.Close()
	dec := link.NewDecoder(a, 0)
	ask := func(f link.Frame) link.Frame {
		t.Helper()
		go a.Write(link.AppendFrame(nil, f))
		got, err := dec.Next()
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	checkErr := func(f link.Frame, kind station.Kind, text string) {
		t.Helper()
		if f.Type != link.TypeError || len(f.Payload) == 0 || station.Kind(f.Payload[0]) != kind || !strings.Contains(string(f.Payload[1:]), text) {
			t.Errorf("got %v frame %q, want error of kind %v containing %q", f.Type, f.Payload, kind, text)
		}
	}
	checkErr(ask(link.Frame{Type: link.TypeRequest, Seq: 1, Cmd: link.CmdTPM, Payload: []byte{1}}), station.KindUnavailable, "has not seen a HELLO")
	if f := ask(helloExample); f.Type != link.TypeResponse {
		t.Fatalf("HELLO answered with %v", f.Type)
	}
	checkErr(ask(link.Frame{Type: link.TypeRequest, Seq: 2, Cmd: link.CmdKeyCSR}), station.KindInvalid, "unknown command 0x10")
	checkErr(ask(link.Frame{Type: link.TypeRequest, Seq: 3, Cmd: link.CmdHello, Payload: []byte{1}}), station.KindInvalid, "HELLO request of 1 bytes")
	// Same seq, different payload: a new request, run again.
	if f := ask(helloExample); f.Type != link.TypeResponse {
		t.Fatalf("HELLO answered with %v", f.Type)
	}
	r1 := ask(link.Frame{Type: link.TypeRequest, Seq: 4, Cmd: link.CmdTPM, Payload: []byte("a")})
	r2 := ask(link.Frame{Type: link.TypeRequest, Seq: 4, Cmd: link.CmdTPM, Payload: []byte("b")})
	if string(r1.Payload) != "rsp:a" || string(r2.Payload) != "rsp:b" {
		t.Errorf("same seq, other payload: got %q then %q", r1.Payload, r2.Payload)
	}
}

func TestServeReturnsOnCancel(t *testing.T) {
	r, w, err := os.Pipe() // has SetReadDeadline
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	defer r.Close()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- link.Serve(ctx, struct {
			io.Reader
			io.Writer
			deadliner
		}{r, io.Discard, r}, newFake(), link.ServeConfig{})
	}()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v, want context.Canceled", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	checkNoLeak(t)
}

type deadliner interface{ SetReadDeadline(time.Time) error }

func TestCloseIsIdempotentAndLeaksNothing(t *testing.T) {
	a, b := duplex()
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(t.Context())
	go func() { done <- link.Serve(ctx, b, newFake(), link.ServeConfig{}) }()
	c := link.NewClient(a, link.Config{})
	if _, err := c.Info(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := c.TPM(t.Context(), []byte{1}); station.KindOf(err) != station.KindUnavailable {
		t.Errorf("TPM after Close = %v, want kind unavailable", err)
	}
	if err := <-done; err == nil {
		t.Errorf("Serve returned nil after the line closed")
	}
	cancel()
	b.Close()
	checkNoLeak(t)
}
