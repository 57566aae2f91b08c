package link_test

import (
	"bytes"
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"go.bug.st/serial"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// openPTY returns a pty master that is pollable (so Close interrupts a
// pending Read and Serve can use read deadlines) and the slave's path. The
// slave fd stays open until the test ends, so the master reads no EIO while
// the station has not opened the port yet.
func openPTY(t *testing.T) (*os.File, string) {
	t.Helper()
	m, s, err := pty.Open()
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	// pty.Open leaves the master in blocking mode; re-open it non-blocking.
	fd, err := syscall.Dup(int(m.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	if err := syscall.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	master := os.NewFile(uintptr(fd), "/dev/ptmx")
	t.Cleanup(func() {
		master.Close()
		s.Close()
	})
	return master, s.Name()
}

func TestOverPTY(t *testing.T) {
	master, path := openPTY(t)
	h := newFake()
	serve(t, master, h, link.ServeConfig{})
	c, err := link.Open(t.Context(), path, link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if info.Serial != testInfo.Serial || info.Protocol != 1 {
		t.Errorf("Info = %+v", info)
	}
	big := bytes.Repeat([]byte{0, 1, 2, 0xff}, 2000) // 8000 bytes, zeros included
	got, err := c.TPM(t.Context(), big)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append([]byte("rsp:"), big...)) {
		t.Errorf("TPM over a pty mangled %d bytes", len(big))
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.BadFrames != 0 || st.Retries != 0 || st.Requests != 2 {
		t.Errorf("Stats = %+v", st)
	}
}

func TestOpenMissingPort(t *testing.T) {
	_, err := link.Open(t.Context(), "/dev/does-not-exist-kiln", link.Config{})
	if k := station.KindOf(err); k != station.KindNotFound && k != station.KindUnavailable {
		t.Errorf("Open error %v of kind %v", err, k)
	}
}

func TestPTYMasterClosedMidRequest(t *testing.T) {
	master, path := openPTY(t)
	entered := make(chan struct{})
	h := newFake()
	h.fn = func(ctx context.Context, cmd []byte) ([]byte, error) {
		close(entered)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	serve(t, master, h, link.ServeConfig{})
	c, err := link.Open(t.Context(), path, link.Config{TPMTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go func() {
		<-entered
		master.Close() // the DUT goes away while its TPM works
	}()
	start := time.Now()
	_, err = c.TPM(t.Context(), []byte("createprimary"))
	if station.KindOf(err) != station.KindUnavailable {
		t.Fatalf("error %v, want kind unavailable", err)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("noticed after %v; EIO on the pty should be noticed at once", elapsed)
	}
	if want := "DUT on " + path + " dropped the line"; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	t.Log(err)
}

func TestSerialPortCloseUnblocksClient(t *testing.T) {
	master, path := openPTY(t)
	_ = master // never answers
	port, err := serial.Open(path, &serial.Mode{BaudRate: 115200})
	if err != nil {
		t.Fatal(err)
	}
	c := link.NewClient(port, link.Config{Port: path})
	done := make(chan error, 1)
	go func() { _, err := c.Info(context.Background()); done <- err }()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	select {
	case err := <-done:
		if station.KindOf(err) != station.KindUnavailable || !strings.Contains(err.Error(), "closed") {
			t.Errorf("Info after Close = %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not end the pending request")
	}
	checkNoLeak(t)
}
