// Package tpmsim opens the in-process TPM 2.0 simulator (the Microsoft
// reference TPM, through go-tpm-tools; cgo, links libcrypto) as a go-tpm
// transport. It is for tests, fixtures, `kiln simulate` and the demo, and
// stays out of the production path.
//
// Only one simulator can exist per process at a time: the reference TPM is
// global C state, and Open blocks until the simulator opened before it is
// closed. Close a simulator as soon as you are done with it, and do not
// open two from one goroutine.
package tpmsim

import (
	"sync"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/station"
)

// Open starts a fresh simulator (new random seeds, empty NV) and returns it
// as a transport; the simulator has run TPM2_Startup. It blocks while
// another simulator of this process is open. Kinds: Internal.
func Open() (transport.TPMCloser, error) {
	s, err := simulator.Get()
	if err != nil {
		return nil, station.E("open TPM simulator", station.KindInternal, err)
	}
	return wrap(s), nil
}

// OpenSeeded is Open with every hierarchy seed derived from seed: two
// simulators with the same seed have the same EK and SRK, like a cloned
// TPM. Insecure by design; for tests only.
func OpenSeeded(seed int64) (transport.TPMCloser, error) {
	s, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		return nil, station.E("open TPM simulator", station.KindInternal, err)
	}
	return wrap(s), nil
}

// sim adapts the simulator, an io.ReadWriteCloser whose Read returns a
// whole response with a nil error, to transport.TPMCloser, and makes Close
// idempotent (the simulator's own Close fails the second time, and its
// process-wide lock must be released exactly once).
type sim struct {
	t    transport.TPMCloser
	once sync.Once
	err  error
}

func wrap(s *simulator.Simulator) *sim { return &sim{t: transport.FromReadWriteCloser(s)} }

func (s *sim) Send(cmd []byte) ([]byte, error) { return s.t.Send(cmd) }

func (s *sim) Close() error {
	s.once.Do(func() { s.err = s.t.Close() })
	if s.err != nil {
		return station.E("close TPM simulator", station.KindInternal, s.err)
	}
	return nil
}
