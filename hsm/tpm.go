package hsm

import (
	"context"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
	"github.com/google/go-tpm/tpm2/transport/tcp"
	"github.com/kilnworks/kiln/station"
)

// TPM is one TPM 2.0 reached through a transport. The TPM is a
// single-access device: every method, Send included, holds a mutex for the
// whole of its command sequence, so a TPM may be shared by goroutines but
// they take turns.
type TPM struct {
	mu     sync.Mutex
	t      transport.TPM // the retry layer over inner
	inner  transport.TPM
	closed bool
	nvMax  int // bytes per NV_Read/NV_Write; 0 until known to be below nvChunk
}

// New returns a TPM that sends its commands through t, wrapped in a layer
// that sends a command again (up to 10 times in about 1.3 s) while the TPM
// answers TPM_RC_RETRY, TPM_RC_YIELDED or TPM_RC_TESTING. Close closes t
// when t has a Close method.
func New(t transport.TPM) *TPM {
	return &TPM{t: &retrier{next: t, sleep: time.Sleep}, inner: t}
}

// Send sends one raw TPM command and returns the raw response, through the
// retry layer and under the TPM's mutex, so that a TPM can serve go-tpm
// commands of its caller too (TPM implements transport.TPM). A response
// with an error code is returned as it is, with a nil error.
func (t *TPM) Send(cmd []byte) ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, station.Errorf("send TPM command", station.KindInvalid, "the TPM is closed")
	}
	return t.t.Send(cmd)
}

// Close closes the transport if it has a Close method. It is idempotent.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	if err := closeTransport(t.inner); err != nil {
		return station.E("close TPM", station.KindUnavailable, err)
	}
	return nil
}

// lock takes the TPM for one operation.
func (t *TPM) lock(op string) error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return station.Errorf(op, station.KindInvalid, "the TPM is closed")
	}
	return nil
}

// Open opens the TPM named by spec:
//
//   - "/dev/tpmrm0" (or any path under /dev/): a Linux TPM device; prefer the
//     resource-managed tpmrm device;
//   - "swtpm:HOST:PORT": swtpm in socket mode with a TCP server on PORT and
//     its control channel on PORT+1;
//   - "swtpm:unix:/path/to/socket": swtpm with a unixio server.
//
// For swtpm, transient objects and sessions that earlier clients left behind
// are flushed. The in-process simulator ("sim") is not opened here: use
// hsm/tpmsim.Open and New. Kinds: Invalid (unknown spec), NotFound (no such
// device), Unauthorized (no permission), Unavailable (nothing answers).
func Open(spec string) (*TPM, error) {
	const op = "open TPM"
	switch {
	case spec == "sim":
		return nil, station.Errorf(op, station.KindInvalid,
			`"sim" is the in-process simulator, which hsm does not link: open it with hsm/tpmsim.Open and wrap it with hsm.New`)
	case strings.HasPrefix(spec, "/dev/"):
		tr, err := linuxtpm.Open(spec)
		if err != nil {
			return nil, openError(op, spec, err)
		}
		return New(tr), nil
	case strings.HasPrefix(spec, "swtpm:unix:"):
		path := strings.TrimPrefix(spec, "swtpm:unix:")
		tr, err := linuxudstpm.Open(path)
		if err != nil {
			return nil, openError(op, spec, err)
		}
		t := New(tr)
		if err := t.flushLeftovers(context.Background()); err != nil {
			_ = t.Close()
			return nil, err
		}
		return t, nil
	case strings.HasPrefix(spec, "swtpm:"):
		host, port, err := net.SplitHostPort(strings.TrimPrefix(spec, "swtpm:"))
		p, perr := strconv.Atoi(port)
		if err != nil || perr != nil || p <= 0 || p >= 65535 {
			return nil, station.Errorf(op, station.KindInvalid,
				"%q is not a swtpm address: write swtpm:HOST:PORT (the server port; the control port is PORT+1) or swtpm:unix:/path/to/socket", spec)
		}
		tr, err := tcp.Open(tcp.Config{
			CommandAddress:  net.JoinHostPort(host, port),
			PlatformAddress: net.JoinHostPort(host, strconv.Itoa(p+1)),
		})
		if err != nil {
			return nil, openError(op, spec, err)
		}
		t := New(tr)
		if err := t.flushLeftovers(context.Background()); err != nil {
			_ = t.Close()
			return nil, err
		}
		return t, nil
	}
	return nil, station.Errorf(op, station.KindInvalid,
		"%q is not a TPM: use /dev/tpmrm0, swtpm:HOST:PORT or swtpm:unix:/path/to/socket", spec)
}

func openError(op, spec string, err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return station.Errorf(op, station.KindNotFound,
			"no TPM at %s: %w: check that the TPM is enabled in the firmware and its driver is loaded, or that swtpm is running", spec, err)
	case errors.Is(err, os.ErrPermission):
		return station.Errorf(op, station.KindUnauthorized,
			"no permission to open %s: %w: run Kiln as a member of the tss group (or root)", spec, err)
	case errors.Is(err, linuxtpm.ErrFileIsNotDevice), errors.Is(err, linuxudstpm.ErrFileIsNotSocket):
		return station.Errorf(op, station.KindInvalid, "%s is not a TPM: %w", spec, err)
	case errors.Is(err, syscall.ECONNREFUSED):
		return station.Errorf(op, station.KindUnavailable,
			"nothing listens at %s: %w: start swtpm in socket mode (swtpm socket --tpm2 --server ... --ctrl ...)", spec, err)
	}
	return station.Errorf(op, station.KindUnavailable, "cannot reach %s: %w", spec, err)
}

// flushLeftovers flushes the transient objects and sessions an earlier
// client left in the TPM; swtpm keeps them across connections.
func (t *TPM) flushLeftovers(ctx context.Context) error {
	const op = "flush leftover TPM handles"
	if err := t.lock(op); err != nil {
		return err
	}
	defer t.mu.Unlock()
	for _, first := range []uint32{0x80000000, 0x02000000, 0x03000000} {
		if err := ctxError(ctx, op); err != nil {
			return err
		}
		rsp, err := tpm2.GetCapability{
			Capability:    tpm2.TPMCapHandles,
			Property:      first,
			PropertyCount: 64,
		}.Execute(t.t)
		if err != nil {
			return tpmError(op, err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return tpmError(op, err)
		}
		for _, h := range hs.Handle {
			if uint32(h)&0xFF000000 != first {
				continue // the list runs on into the next handle type
			}
			if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(t.t); err != nil {
				return tpmError(op, err)
			}
		}
	}
	return nil
}
