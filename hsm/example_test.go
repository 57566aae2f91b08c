package hsm_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
)

// Read a TPM's endorsement identity, here from a simulator that a "maker"
// manufactured with an EK certificate, and check the certificate against
// the maker's root.
func ExampleTPM_Endorsement() {
	ctx := context.Background()
	sim, err := tpmsim.Open()
	if err != nil {
		log.Fatal(err)
	}
	defer sim.Close()

	maker, err := fixtures.NewCA("Example TPM Maker Root")
	if err != nil {
		log.Fatal(err)
	}
	if err := fixtures.Manufacture(ctx, sim, maker); err != nil {
		log.Fatal(err)
	}

	tpm := hsm.New(sim)
	e, err := tpm.Endorsement(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("EK created now:", e.EKCreated)
	fmt.Println("EK certificate:", len(e.EKCert) > 0)

	dir, err := os.MkdirTemp("", "roots")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if _, err := maker.WritePEM(dir); err != nil {
		log.Fatal(err)
	}
	roots, err := hsm.LoadRoots(dir)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("EK certificate valid:", roots.VerifyEKCert(ctx, e) == nil)
	// Output:
	// EK created now: false
	// EK certificate: true
	// EK certificate valid: true
}

// Open names a TPM by a spec string; the simulator is not one of them.
func ExampleOpen() {
	_, err := hsm.Open("sim")
	fmt.Println(err)
	_, err = hsm.Open(filepath.Join("/dev", "no-such-tpm"))
	fmt.Println(err != nil)
	// Output:
	// open TPM: "sim" is the in-process simulator, which hsm does not link: open it with hsm/tpmsim.Open and wrap it with hsm.New
	// true
}
