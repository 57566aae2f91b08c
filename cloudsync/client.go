package cloudsync

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"strconv"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Service is what the pusher needs of a DPS service API. *dps.ServiceClient
// is one; its methods document the Kinds.
type Service interface {
	BulkEnrollments(ctx context.Context, mode string, enrollments []dps.IndividualEnrollment) (*dps.BulkEnrollmentOperationResult, error)
	GetEnrollment(ctx context.Context, registrationID string) (*dps.IndividualEnrollment, error)
	QueryEnrollments(ctx context.Context, query string, p dps.QueryPage) ([]dps.IndividualEnrollment, string, error)
	PutEnrollmentGroup(ctx context.Context, g *dps.EnrollmentGroup, ifMatch string) (*dps.EnrollmentGroup, error)
	GetEnrollmentGroup(ctx context.Context, groupID string) (*dps.EnrollmentGroup, error)
}

var _ Service = (*dps.ServiceClient)(nil)

// NewServiceClient returns a client of target t's service API: the
// connection string unsealed by s, t's TLS roots added to the system's, and
// a transport that reports the service's retry-after to the pusher.
// Kinds: Unauthorized (the connection string does not unseal), Invalid.
func NewServiceClient(t *station.Target, s *Sealer) (*dps.ServiceClient, error) {
	op := "connect to target " + t.Name
	conn, err := s.ConnectionString(t)
	if err != nil {
		return nil, err
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(t.TrustPEM) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(t.TrustPEM) {
			return nil, station.Errorf(op, station.KindInvalid, "the target's TLS trust holds no PEM certificate: give the CA certificate of its server")
		}
		tlsConf.RootCAs = pool
	}
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.TLSClientConfig = tlsConf
	base.MaxIdleConnsPerHost = 16
	hc := &http.Client{Timeout: 60 * time.Second, Transport: Transport(base)}
	return dps.NewServiceClient(conn, dps.ServiceOptions{HTTP: hc, BaseURL: t.BaseURL})
}

// Transport wraps base (nil: http.DefaultTransport) so that the status and
// Retry-After header of a throttled (429) or unavailable (5xx) answer reach
// the pusher that sent the request. Build the http.Client of a Service with
// it; without it the pusher backs off on its own schedule.
func Transport(base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return hintTransport{base}
}

type hintTransport struct{ base http.RoundTripper }

func (t hintTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if err != nil {
		return resp, err
	}
	if h, ok := r.Context().Value(hintKey{}).(*retryHint); ok && (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500) {
		h.status = resp.StatusCode
		h.after = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	return resp, err
}

// retryHint carries what the transport saw of a refused request back to
// the pusher, through the request's context.
type retryHint struct {
	status int
	after  time.Duration // 0: not given
}

type hintKey struct{}

// parseRetryAfter reads a Retry-After value: seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseFloat(v, 64); err == nil && s >= 0 && s < 24*3600 {
		return time.Duration(s * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return min(t.Sub(now), 24*time.Hour)
	}
	return 0
}
