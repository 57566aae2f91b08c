package tpmsim_test

import (
	"bytes"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
)

func ekOf(t *testing.T, open func() (transport.TPMCloser, error)) []byte {
	t.Helper()
	sim, err := open()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	ek, err := hsm.New(sim).EK(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return ek.Public
}

func TestSeededSimulatorsShareEK(t *testing.T) {
	seeded := func(seed int64) func() (transport.TPMCloser, error) {
		return func() (transport.TPMCloser, error) { return tpmsim.OpenSeeded(seed) }
	}
	a, b, c := ekOf(t, seeded(42)), ekOf(t, seeded(42)), ekOf(t, seeded(43))
	if !bytes.Equal(a, b) {
		t.Error("two simulators with seed 42 have different EKs")
	}
	if bytes.Equal(a, c) {
		t.Error("seeds 42 and 43 give the same EK")
	}
	if bytes.Equal(ekOf(t, tpmsim.Open), ekOf(t, tpmsim.Open)) {
		t.Error("two fresh simulators have the same EK")
	}
}

// The transport reads whole responses, large ones included, and a closed
// simulator releases the process-wide lock exactly once.
func TestTransport(t *testing.T) {
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		rsp, err := tpm2.GetRandom{BytesRequested: 32}.Execute(sim)
		if err != nil {
			t.Fatal(err)
		}
		if len(rsp.RandomBytes.Buffer) != 32 {
			t.Fatalf("GetRandom returned %d bytes", len(rsp.RandomBytes.Buffer))
		}
	}
	if _, err := (tpm2.GetCapability{Capability: tpm2.TPMCapAlgs, Property: 0, PropertyCount: 64}).Execute(sim); err != nil {
		t.Fatal(err)
	}
	if err := sim.Close(); err != nil {
		t.Fatal(err)
	}
	if err := sim.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	// The lock is free: another simulator opens without blocking.
	again, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
}
