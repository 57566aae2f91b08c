package hsm_test

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
)

// busy answers the first n commands with code rc, then forwards to next
// (or answers rc for ever when next is nil).
type busy struct {
	rc    uint32
	n     int
	next  transport.TPM
	calls int
}

func (b *busy) Send(cmd []byte) ([]byte, error) {
	b.calls++
	if b.next == nil || b.calls <= b.n {
		rsp := make([]byte, 10)
		binary.BigEndian.PutUint16(rsp, uint16(tpm2.TPMSTNoSessions))
		binary.BigEndian.PutUint32(rsp[2:], 10)
		binary.BigEndian.PutUint32(rsp[6:], b.rc)
		return rsp, nil
	}
	return b.next.Send(cmd)
}

func TestRetryThenSucceed(t *testing.T) {
	for _, tc := range []struct {
		name string
		rc   uint32
	}{{"TPM_RC_RETRY", 0x922}, {"TPM_RC_YIELDED", 0x908}, {"TPM_RC_TESTING", 0x90A}} {
		t.Run(tc.name, func(t *testing.T) {
			sim := openSim(t)
			b := &busy{rc: tc.rc, n: 2, next: sim}
			ek, err := hsm.New(b).EK(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if !ek.Created {
				t.Error("EK not created")
			}
			// 2 busy answers + ReadPublic, CreatePrimary, EvictControl, FlushContext.
			if b.calls != 6 {
				t.Errorf("transport saw %d sends, want 6", b.calls)
			}
		})
	}
}

func TestRetryGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &busy{rc: 0x922}
		start := time.Now()
		_, err := hsm.New(b).EK(t.Context())
		elapsed := time.Since(start)
		wantKind(t, err, station.KindUnavailable)
		if !strings.Contains(err.Error(), "TPM_RC_RETRY") || !strings.Contains(err.Error(), "try again") {
			t.Errorf("error %q does not name the code and what to do", err)
		}
		if b.calls != 10 {
			t.Errorf("sent %d times, want 10", b.calls)
		}
		if elapsed < 500*time.Millisecond || elapsed > 2*time.Second {
			t.Errorf("gave up after %v of backoff, want about 1.3 s", elapsed)
		}
	})
}

// Format-one codes are never retried, even when they differ from a
// retryable warning in the format bit only: 0x9A2 is TPM_RC_BAD_AUTH on
// session 1, 0x922 is TPM_RC_RETRY.
func TestNoRetryOnFormatOneCodes(t *testing.T) {
	// Each is a retryable warning code with the format-one bit (0x080) set.
	for _, tc := range []struct{ rc uint32 }{
		{0x9A2}, // TPM_RC_BAD_AUTH on session 1, vs TPM_RC_RETRY 0x922
		{0x988}, // format-one 0x088 on session 1, vs TPM_RC_YIELDED 0x908
		{0x98A}, // format-one 0x08A on session 1, vs TPM_RC_TESTING 0x90A
	} {
		b := &busy{rc: tc.rc}
		_, err := hsm.New(b).EK(t.Context())
		if b.calls != 1 {
			t.Errorf("rc %#x: sent %d times, want 1", tc.rc, b.calls)
		}
		if err == nil {
			t.Errorf("rc %#x: no error", tc.rc)
		}
	}
}

func TestAuthFailureIsUnauthorized(t *testing.T) {
	b := &busy{rc: 0x9A2} // TPM_RC_BAD_AUTH on session 1, as CreatePrimary would answer
	_, err := hsm.New(b).EK(t.Context())
	// ReadPublic has no session, but the code is what the TPM says.
	wantKind(t, err, station.KindUnauthorized)
}

func TestTransportErrorIsUnavailable(t *testing.T) {
	_, err := hsm.New(failing{}).EK(t.Context())
	wantKind(t, err, station.KindUnavailable)
	if !errors.Is(err, errUnplugged) {
		t.Errorf("error %v does not wrap the transport's", err)
	}
}

var errUnplugged = errors.New("unplugged")

type failing struct{}

func (failing) Send([]byte) ([]byte, error) { return nil, errUnplugged }

func TestMalformedResponseIsInvalid(t *testing.T) {
	for _, rsp := range [][]byte{
		{0x80, 0x01, 0, 0},                    // short
		{0x80, 0x01, 0, 0, 0, 20, 0, 0, 0, 0}, // size field too large
		{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0}, // success, but no ReadPublic body
	} {
		_, err := hsm.New(fixed(rsp)).EK(t.Context())
		wantKind(t, err, station.KindInvalid)
	}
}

type fixed []byte

func (f fixed) Send([]byte) ([]byte, error) { return f, nil }
