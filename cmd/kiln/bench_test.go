package main

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// BenchmarkProvisionTPM115200 provisions a unit with the TPM method over a
// pty paced to 115200 8N1 and compares the wall time with the line-time
// limit measured in the same run: the bytes that crossed the line at 10 bits
// per byte, plus the time the TPM itself spent on the commands. A ratio of
// 1.0 means the protocol adds nothing; the goal is at most 1.25.
func BenchmarkProvisionTPM115200(b *testing.B) {
	const rate = 115200
	ctx := context.Background()
	var wall, limit, tpmTime time.Duration
	var bytes int64
	for range b.N {
		b.StopTimer()
		tpm, err := tpmsim.Open()
		if err != nil {
			b.Fatal(err)
		}
		ca, err := fixtures.NewCA("bench TPM maker")
		if err != nil {
			b.Fatal(err)
		}
		roots := b.TempDir()
		if _, err := ca.WritePEM(roots); err != nil {
			b.Fatal(err)
		}
		if err := fixtures.Manufacture(ctx, tpm, ca); err != nil {
			b.Fatal(err)
		}
		verifier, err := hsm.LoadRoots(roots)
		if err != nil {
			b.Fatal(err)
		}
		dut, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{
			Info:     station.DeviceInfo{Serial: "BENCH-1", Model: "bench"},
			TPM:      tpm,
			LineRate: rate,
		})
		if err != nil {
			b.Fatal(err)
		}
		store, err := sqlite.Open(ctx, filepath.Join(b.TempDir(), "kiln.db"))
		if err != nil {
			b.Fatal(err)
		}
		p := &station.Provisioner{
			Store: store,
			Dial: func(ctx context.Context, port string) (station.Link, error) {
				return link.Open(ctx, port, link.Config{BaudRate: rate})
			},
			Endorser: hsm.Endorser{},
			Verifier: verifier,
			Profile:  station.Profile{Station: "bench", Method: station.MethodTPM, RegID: station.RegIDFromEK, EKCertPolicy: station.EKCertRequire},
			Logger:   slog.New(slog.DiscardHandler),
		}
		tpm0 := dut.TPMTime()
		b.StartTimer()
		start := time.Now()
		r, err := p.Provision(ctx, station.Request{Port: dut.Path()})
		elapsed := time.Since(start)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		n := r.BytesOut + r.BytesIn
		tt := dut.TPMTime() - tpm0
		wall += elapsed
		bytes += n
		tpmTime += tt
		limit += time.Duration(n*10) * time.Second / rate
		limit += tt
		store.Close()
		dut.Close()
		tpm.Close()
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(float64(bytes)/n, "bytes/unit")
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / n }
	b.ReportMetric(ms(tpmTime), "tpm-ms/unit")
	b.ReportMetric(ms(limit), "limit-ms/unit")
	b.ReportMetric(ms(wall), "wall-ms/unit")
	b.ReportMetric(float64(wall)/float64(limit), "line-time-ratio")
}
