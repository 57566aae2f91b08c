package link_test

import (
	"bytes"
	"context"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// end is one end of an in-memory full-duplex line made of two io.Pipes.
type end struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func (e *end) Read(p []byte) (int, error)  { return e.r.Read(p) }
func (e *end) Write(p []byte) (int, error) { return e.w.Write(p) }
func (e *end) Close() error {
	e.r.Close()
	return e.w.Close()
}

func duplex() (*end, *end) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &end{ar, aw}, &end{br, bw}
}

// fakeHandler is a link.Handler whose TPM answers through fn and counts calls.
type fakeHandler struct {
	info  station.DeviceInfo
	calls atomic.Int32
	fn    func(ctx context.Context, cmd []byte) ([]byte, error)
}

var testInfo = station.DeviceInfo{Serial: "SN-0001", Model: "Widget 3", Firmware: "1.2.3", Capabilities: []string{"tpm"}}

func newFake() *fakeHandler {
	return &fakeHandler{info: testInfo, fn: func(_ context.Context, cmd []byte) ([]byte, error) {
		return append([]byte("rsp:"), cmd...), nil
	}}
}

func (h *fakeHandler) Info(context.Context) (station.DeviceInfo, error) { return h.info, nil }
func (h *fakeHandler) TPM(ctx context.Context, cmd []byte) ([]byte, error) {
	h.calls.Add(1)
	return h.fn(ctx, cmd)
}

// serve runs link.Serve on rw until the test ends.
func serve(t *testing.T, rw io.ReadWriteCloser, h link.Handler, cfg link.ServeConfig) <-chan error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- link.Serve(ctx, rw, h, cfg) }()
	t.Cleanup(func() {
		cancel()
		rw.Close()
		<-done
	})
	return done
}

// writeHook wraps an io.ReadWriteCloser and lets a test rewrite each Write
// (each Write carries one frame in this package).
type writeHook struct {
	io.ReadWriteCloser
	mu sync.Mutex
	n  int
	fn func(n int, p []byte) []byte // n counts writes from 1; nil result drops the write
}

func (w *writeHook) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.n++
	out := w.fn(w.n, bytes.Clone(p))
	w.mu.Unlock()
	if out == nil {
		return len(p), nil
	}
	if _, err := w.ReadWriteCloser.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// countRW counts bytes crossing a ReadWriteCloser.
type countRW struct {
	io.ReadWriteCloser
	in, out atomic.Int64
}

func (c *countRW) Read(p []byte) (int, error) {
	n, err := c.ReadWriteCloser.Read(p)
	c.in.Add(int64(n))
	return n, err
}

func (c *countRW) Write(p []byte) (int, error) {
	c.out.Add(int64(len(p))) // before the peer can have read them
	n, err := c.ReadWriteCloser.Write(p)
	c.out.Add(int64(n - len(p)))
	return n, err
}

// checkNoLeak fails the test if goroutines of package link outlive it.
func checkNoLeak(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		s := string(buf[:runtime.Stack(buf, true)])
		var leaked []string
		for _, g := range strings.Split(s, "\n\n") {
			if strings.Contains(g, "kiln/link.") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of package link leaked:\n%s", len(leaked), strings.Join(leaked, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}
