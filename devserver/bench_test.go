package devserver_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
)

// handshakeRequest opens a new TLS connection to e, sends one request that
// the server answers without touching the database, and closes it.
func handshakeRequest(tb testing.TB, e *env) {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.pool}, DisableKeepAlives: true}
	rsp, err := (&http.Client{Transport: tr}).Get(e.base + "/health")
	if err != nil {
		tb.Fatal(err)
	}
	rsp.Body.Close()
	tr.CloseIdleConnections()
}

// BenchmarkTLSHandshakeRequest is the baseline: a full TLS handshake
// (ECDSA P-256 server certificate) and one trivial request.
func BenchmarkTLSHandshakeRequest(b *testing.B) {
	e := start(b, devserver.Config{})
	b.ResetTimer()
	for range b.N {
		handshakeRequest(b, e)
	}
}

// timedDevice is a software TPM device that adds up the time spent in its
// own math (RSA-OAEP decryption, unwrapping, HMAC), so that the device's
// share can be told apart from the server's.
type timedDevice struct {
	*softDevice
	spent time.Duration
}

func (d *timedDevice) activate(ctx context.Context, blob []byte) error {
	t0 := time.Now()
	defer func() { d.spent += time.Since(t0) }()
	return d.softDevice.activate(ctx, blob)
}

func (d *timedDevice) sign(ctx context.Context, data []byte) ([]byte, error) {
	t0 := time.Now()
	defer func() { d.spent += time.Since(t0) }()
	return d.softDevice.sign(ctx, data)
}

// BenchmarkTPMRegistrationHTTPS measures one complete TPM registration
// through the HTTPS device API, each device on a new TLS connection:
// challenge (activation blob built), SAS-authenticated register, polls
// every 0.2 ms until assigned (second blob built, SQLite writes). The
// devices are software TPMs (their RSA-OAEP decryptions and unwrapping run
// in Go in the same process); device-ms/op is their share and server-ms/op
// the rest. x-handshake is ms/op over the cost of a bare TLS handshake plus
// one request, measured in the same run.
func BenchmarkTPMRegistrationHTTPS(b *testing.B) {
	ctx := context.Background()
	e := start(b, devserver.Config{RetryAfter: time.Millisecond})
	e.pollEvery = 200 * time.Microsecond
	dev := &timedDevice{softDevice: newSoftDevice(b, true)}
	ids := make([]string, b.N)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%06d", i)
		e.enroll(b, ids[i], dev.ek)
	}
	polls := 0
	b.ResetTimer()
	for i := range b.N {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.pool}}
		e.client = &http.Client{Transport: tr}
		reg := e.register(ctx, b, ids[i], dev)
		if reg.final.Status != "assigned" {
			b.Fatalf("%s: %s", ids[i], reg.finalRaw)
		}
		polls += len(reg.polls)
		tr.CloseIdleConnections()
	}
	b.StopTimer()
	perOp := b.Elapsed() / time.Duration(b.N)

	const baselineN = 100
	t0 := time.Now()
	for range baselineN {
		handshakeRequest(b, e)
	}
	baseline := time.Since(t0) / baselineN

	device := dev.spent / time.Duration(b.N)
	b.ReportMetric(float64(device)/1e6, "device-ms/op")
	b.ReportMetric(float64(perOp-device)/1e6, "server-ms/op")
	b.ReportMetric(float64(polls)/float64(b.N), "polls/op")
	b.ReportMetric(float64(baseline)/1e6, "handshake-ms")
	b.ReportMetric(float64(perOp)/float64(baseline), "x-handshake")
	b.ReportMetric(float64(time.Second)/float64(perOp-device), "registrations/s")
	b.ReportMetric(float64(time.Second)/float64(baseline), "handshake+request/s")
}
