package pki_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"sync"
	"testing"
	"time"

	"github.com/kilnworks/kiln/pki"
)

// BenchmarkIssueLeaf measures leaves issued per second (checks, template,
// signature, issuance log) beside the raw signature rate of the same CA key,
// measured in the same run.
func BenchmarkIssueLeaf(b *testing.B) {
	for _, tc := range []struct {
		kt  pki.KeyType
		log string
	}{{pki.ECDSAP256, "file"}, {pki.ECDSAP256, "memory"}, {pki.RSA2048, "file"}, {pki.RSA2048, "memory"}} {
		b.Run(string(tc.kt)+"/log="+tc.log, func(b *testing.B) {
			cfg := pki.Config{KeyType: tc.kt}
			if tc.log == "memory" {
				cfg.Log = &memLog{} // no fsync: the issuance cost alone
			}
			ca := newCA(b, cfg)
			csr := makeCSR(b, deviceKey(b, pki.ECDSAP256), "unit-bench")
			sigRate := signatureRate(b, ca.Signer(), 300*time.Millisecond)

			b.ResetTimer()
			for b.Loop() {
				if _, err := ca.Issue(b.Context(), csr, pki.IssueRequest{RegistrationID: "unit-bench", Operator: "bench", Batch: "b"}); err != nil {
					b.Fatal(err)
				}
			}
			leaves := float64(b.N) / b.Elapsed().Seconds()
			b.ReportMetric(leaves, "leaves/s")
			b.ReportMetric(sigRate, "signatures/s")
			b.ReportMetric(sigRate/leaves, "x-signature")
		})
	}
}

// signatureRate signs SHA-256 digests with s for about d and returns
// signatures per second.
func signatureRate(b *testing.B, s crypto.Signer, d time.Duration) float64 {
	b.Helper()
	digest := sha256.Sum256([]byte("kiln"))
	n, start := 0, time.Now()
	for time.Since(start) < d || n < 10 {
		if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
			b.Fatal(err)
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds()
}

// memLog is an IssuanceLog in memory.
type memLog struct {
	mu  sync.Mutex
	all []pki.Issuance
}

func (m *memLog) Counts(_ context.Context, batch, shift string) (nb, ns int, _ error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, is := range m.all {
		if is.Batch == batch {
			nb++
		}
		if is.Shift == shift {
			ns++
		}
	}
	return nb, ns, nil
}

func (m *memLog) Record(_ context.Context, is pki.Issuance) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.all = append(m.all, is)
	return nil
}
