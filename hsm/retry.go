package hsm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/station"
)

// The format-zero warning codes on which a command is sent again unchanged.
const (
	rcYielded uint32 = 0x908 // TPM_RC_YIELDED
	rcTesting uint32 = 0x90A // TPM_RC_TESTING
	rcRetry   uint32 = 0x922 // TPM_RC_RETRY
)

// Retry limits: at most retryAttempts sends in all, waiting retryFirst,
// then twice as long each time, never more than retryMax (about 1.3 s in all).
const (
	retryAttempts = 10
	retryFirst    = 2 * time.Millisecond
	retryMax      = 320 * time.Millisecond
)

// responseHeaderSize is the size of a TPM 2.0 response header: tag (2),
// responseSize (4), responseCode (4).
const responseHeaderSize = 10

// responseCode returns the response code in a TPM 2.0 response, checking
// that the header is complete and that its size field matches the length.
func responseCode(rsp []byte) (uint32, error) {
	if len(rsp) < responseHeaderSize {
		return 0, fmt.Errorf("TPM response of %d bytes is shorter than the 10-byte header", len(rsp))
	}
	if size := binary.BigEndian.Uint32(rsp[2:6]); size != uint32(len(rsp)) {
		return 0, fmt.Errorf("TPM response header says %d bytes but %d arrived", size, len(rsp))
	}
	return binary.BigEndian.Uint32(rsp[6:10]), nil
}

func retryable(rc uint32) (string, bool) {
	switch rc {
	case rcRetry:
		return "TPM_RC_RETRY", true
	case rcYielded:
		return "TPM_RC_YIELDED", true
	case rcTesting:
		return "TPM_RC_TESTING", true
	}
	return "", false
}

// retrier is a transport.TPM that sends a command again while the TPM
// answers with one of the retryable warning codes. It also validates the
// response header and gives transport errors a Kind.
type retrier struct {
	next  transport.TPM
	sleep func(time.Duration)
}

func (r *retrier) Send(cmd []byte) ([]byte, error) {
	const op = "send TPM command"
	wait := retryFirst
	var last string
	for attempt := 1; ; attempt++ {
		rsp, err := r.next.Send(cmd)
		if err != nil {
			var se *station.Error
			if errors.As(err, &se) {
				return nil, err // the link classified it already
			}
			return nil, station.Errorf(op, station.KindUnavailable, "TPM did not answer: %w: check the TPM connection and try again", err)
		}
		rc, err := responseCode(rsp)
		if err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "%w: the TPM or its transport is garbling data", err)
		}
		name, ok := retryable(rc)
		if !ok {
			return rsp, nil
		}
		last = name
		if attempt >= retryAttempts {
			return nil, station.Errorf(op, station.KindUnavailable,
				"TPM still answers %s (0x%03X) after %d attempts: it is busy or self-testing; wait a few seconds and try again", last, rc, attempt)
		}
		r.sleep(wait)
		wait = min(2*wait, retryMax)
	}
}

// closer is implemented by transports that hold a connection.
type closer interface{ Close() error }

func closeTransport(t transport.TPM) error {
	if c, ok := t.(closer); ok {
		return c.Close()
	}
	return nil
}
