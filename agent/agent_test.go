package agent_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/agent"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// fakeTPM answers every command with a fixed response and checks that
// commands never overlap.
type fakeTPM struct {
	busy, calls atomic.Int32
	overlap     atomic.Bool
}

var fixedRsp = []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0, 0}

func (f *fakeTPM) Send(cmd []byte) ([]byte, error) {
	if f.busy.Add(1) > 1 {
		f.overlap.Store(true)
	}
	defer f.busy.Add(-1)
	f.calls.Add(1)
	time.Sleep(time.Millisecond)
	return fixedRsp, nil
}

// end is one end of an in-memory line; Close closes both directions.
type end struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func (e end) Read(p []byte) (int, error)  { return e.r.Read(p) }
func (e end) Write(p []byte) (int, error) { return e.w.Write(p) }
func (e end) Close() error {
	e.r.Close()
	return e.w.Close()
}

// connect runs the agent on one end of an in-memory line and returns a
// Client on the other.
func connect(t *testing.T, a *agent.Agent) *link.Client {
	t.Helper()
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx, end{br, bw}) }()
	c := link.NewClient(end{ar, aw}, link.Config{Port: "pipe"})
	t.Cleanup(func() {
		c.Close()
		cancel()
		bw.Close()
		br.Close()
		<-done
	})
	return c
}

func TestHelloAndTPM(t *testing.T) {
	tpm := &fakeTPM{}
	a, err := agent.New(agent.Config{Info: station.DeviceInfo{Serial: "S1", Model: "M", Firmware: "F"}, TPM: tpm})
	if err != nil {
		t.Fatal(err)
	}
	c := connect(t, a)
	info, err := c.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := station.DeviceInfo{Serial: "S1", Model: "M", Firmware: "F", Capabilities: []string{"tpm", "keygen", "symkey"}, Protocol: 1}
	if diff := cmp.Diff(want, info); diff != "" {
		t.Errorf("Info (-want +got):\n%s", diff)
	}
	got, err := c.TPM(t.Context(), []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fixedRsp) {
		t.Errorf("TPM = % x", got)
	}
}

func TestTPMIsSerialised(t *testing.T) {
	tpm := &fakeTPM{}
	a, _ := agent.New(agent.Config{TPM: tpm})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 5 {
				if _, err := a.TPM(t.Context(), []byte{1}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if tpm.overlap.Load() {
		t.Error("TPM commands overlapped")
	}
	if tpm.calls.Load() != 40 {
		t.Errorf("calls = %d", tpm.calls.Load())
	}
}

func TestNoTPM(t *testing.T) {
	a, _ := agent.New(agent.Config{Info: station.DeviceInfo{Serial: "S2"}})
	c := connect(t, a)
	info, err := c.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if info.Has("tpm") || !info.Has(station.CapKeyGen) || !info.Has(station.CapSymKey) {
		t.Errorf("capabilities %v: want keygen and symkey, no TPM", info.Capabilities)
	}
	_, err = c.TPM(t.Context(), []byte{1})
	var se *station.Error
	if !errors.As(err, &se) || se.Kind != station.KindNotFound {
		t.Fatalf("TPM error %v, want kind not found", err)
	}
	if !strings.Contains(err.Error(), "this DUT has no TPM configured: start the agent with --tpm") {
		t.Errorf("error = %q", err)
	}
}

func TestNewRejectsBadFrameLimit(t *testing.T) {
	if _, err := agent.New(agent.Config{MaxFrame: 10}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("New with MaxFrame 10 = %v, want kind invalid", err)
	}
}

func TestDetectInfoFS(t *testing.T) {
	tests := []struct {
		name string
		fs   fstest.MapFS
		want station.DeviceInfo
	}{
		{"device tree", fstest.MapFS{
			"proc/device-tree/serial-number": {Data: []byte("10000000abcdef01\x00")},
			"proc/device-tree/model":         {Data: []byte("Raspberry Pi 4 Model B Rev 1.4\x00")},
			"etc/os-release":                 {Data: []byte("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n")},
		}, station.DeviceInfo{Serial: "10000000abcdef01", Model: "Raspberry Pi 4 Model B Rev 1.4", Firmware: "Debian GNU/Linux 12 (bookworm)"}},
		{"dmi with placeholder serial", fstest.MapFS{
			"sys/class/dmi/id/product_serial": {Data: []byte("To Be Filled By O.E.M.\n")},
			"sys/class/dmi/id/product_name":   {Data: []byte("NUC11TNHi5\n")},
			"usr/lib/os-release":              {Data: []byte("ID=widgetos\nIMAGE_VERSION=2025.06.1\nPRETTY_NAME=WidgetOS\n")},
		}, station.DeviceInfo{Model: "NUC11TNHi5", Firmware: "widgetos 2025.06.1"}},
		{"nothing", fstest.MapFS{}, station.DeviceInfo{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, agent.DetectInfoFS(tt.fs)); diff != "" {
				t.Errorf("DetectInfoFS (-want +got):\n%s", diff)
			}
		})
	}
	_ = agent.DetectInfo() // must not panic on this machine
}

// TestCrossBuild proves the agent builds without cgo for the DUTs' targets
// and links no station-side dependency.
func TestCrossBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("cross-compiles the agent; slow")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command")
	}
	for _, arch := range []string{"arm64", "arm", "amd64"} {
		t.Run(arch, func(t *testing.T) {
			env := append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
			build := exec.Command(goBin, "build", "-o", os.DevNull, ".")
			build.Env = env
			if out, err := build.CombinedOutput(); err != nil {
				t.Fatalf("CGO_ENABLED=0 GOOS=linux GOARCH=%s go build ./agent/: %v\n%s", arch, err, out)
			}
			list := exec.Command(goBin, "list", "-deps", ".")
			list.Env = env
			out, err := list.Output()
			if err != nil {
				t.Fatal(err)
			}
			for _, dep := range strings.Fields(string(out)) {
				switch {
				case dep == "testing", dep == "runtime/cgo",
					strings.Contains(dep, "sqlite"), strings.Contains(dep, "fyne"),
					strings.Contains(dep, "simulator"), strings.Contains(dep, "tpmsim"),
					strings.HasPrefix(dep, "github.com/kilnworks/kiln/") && dep != "github.com/kilnworks/kiln/agent" &&
						dep != "github.com/kilnworks/kiln/link" && dep != "github.com/kilnworks/kiln/station" &&
						dep != "github.com/kilnworks/kiln/hsm" && dep != "github.com/kilnworks/kiln/dps":
					t.Errorf("the agent links %s", dep)
				}
			}
		})
	}
}
