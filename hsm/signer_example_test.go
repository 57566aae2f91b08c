package hsm_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
)

// Make a device key in the TPM and a CSR signed inside the TPM; the blob is
// what the device stores, and it is useless outside this TPM.
func ExampleTPM_CreateSigningKey() {
	ctx := context.Background()
	sim, err := tpmsim.Open()
	if err != nil {
		log.Fatal(err)
	}
	defer sim.Close()
	tpm := hsm.New(sim)

	blob, _, err := tpm.CreateSigningKey(ctx, hsm.KeyECP256)
	if err != nil {
		log.Fatal(err)
	}
	signer, err := tpm.Signer(*blob)
	if err != nil {
		log.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "sn-0001"}}, signer)
	if err != nil {
		log.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("CSR for:", csr.Subject.CommonName)
	fmt.Println("signature:", csr.SignatureAlgorithm, csr.CheckSignature() == nil)
	// Output:
	// CSR for: sn-0001
	// signature: ECDSA-SHA256 true
}
