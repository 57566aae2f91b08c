package devserver

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Sentinels that refine a Kind into a more precise DPS answer. They are
// wrapped inside *station.Error values; only errorStatus looks at them.
var (
	errETagMismatch   = errors.New("the etag does not match")
	errNoEnrollment   = errors.New("no such enrollment")
	errNoRegistration = errors.New("no such registration")
	errNoGroup        = errors.New("no such enrollment group")
	errQuota          = errors.New("a service limit is reached")
)

// codeQuota is the errorCode of a write refused because a count limit of
// §10 (enrollment groups) is reached: 409, since retrying does not help
// until something is deleted (a 429 would make clients retry).
const codeQuota = 409001

// errorStatus maps an error to the HTTP status and DPS errorCode of its
// answer (§7.4: errorCode = status × 1000 + detail). It is the one place
// where Kinds become HTTP.
func errorStatus(err error) (status, code int) {
	if t := throttleOf(err); t != nil {
		return http.StatusTooManyRequests, t.code
	}
	switch station.KindOf(err) {
	case station.KindInvalid:
		return http.StatusBadRequest, dps.CodeBadRequest
	case station.KindNotFound:
		switch {
		case errors.Is(err, errNoEnrollment):
			return http.StatusNotFound, dps.CodeEnrollmentMissing
		case errors.Is(err, errNoRegistration):
			return http.StatusNotFound, dps.CodeRegistrationGone
		}
		return http.StatusNotFound, dps.CodeNotFound
	case station.KindConflict:
		if errors.Is(err, errETagMismatch) {
			return http.StatusPreconditionFailed, dps.CodePrecondition
		}
		if errors.Is(err, errQuota) {
			return http.StatusConflict, codeQuota
		}
		return http.StatusConflict, dps.CodeConflict
	case station.KindUnauthorized:
		return http.StatusUnauthorized, dps.CodeUnauthorized
	case station.KindUnavailable:
		// Clients retry 429 and 503 after retry-after (§1.5); 503 says it
		// is us, not them.
		return http.StatusServiceUnavailable, 503000
	default:
		return http.StatusInternalServerError, dps.CodeInternal
	}
}

// publicMessage is the message of an error answer. Unauthorized answers
// say no more than "Unauthorized", as DPS does, so that a caller cannot
// probe enrollments or keys; the full reason goes to the log.
func publicMessage(err error, status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return "Unauthorized"
	case status >= 500:
		return "Internal error: see the devserver log (trackingId) and try again"
	}
	return err.Error()
}

// newTrackingID returns a random UUID-shaped tracking ID.
func newTrackingID() string { return uuid() }

// uuid returns a random version-4 UUID as text.
func uuid() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// writeError writes the DPS error body for err (§7.4) with its
// x-ms-error-code header, and logs the full error under the tracking ID.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, trackingID string, err error) {
	status, code := errorStatus(err)
	body := dps.ErrorDetails{
		ErrorCode:    code,
		TrackingID:   trackingID,
		Message:      publicMessage(err, status),
		TimestampUTC: dps.Time{Time: s.now()},
	}
	level := s.log.Info
	if status >= 500 {
		level = s.log.Error
	}
	level("request refused", "trackingId", trackingID, "method", r.Method, "path", r.URL.Path,
		"status", status, "errorCode", code, "err", err)
	w.Header().Set("x-ms-error-code", strconv.Itoa(code))
	writeRetryAfter(w, err)
	writeJSON(w, status, body)
}

// retryAfter is the value of the retry-after header: whole seconds, at
// least 1 (the C SDK reads smaller values as 1 s anyway, §1.5).
func retryAfter(d time.Duration) string {
	n := int64((d + time.Second - 1) / time.Second)
	return strconv.FormatInt(max(n, 1), 10)
}
