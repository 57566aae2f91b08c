package pki_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"os"

	"github.com/kilnworks/kiln/pki"
)

// Open creates the station CA on first use: a root and an intermediate, with
// their keys encrypted under the passphrase.
func ExampleOpen() {
	dir, _ := os.MkdirTemp("", "kiln-ca")
	defer os.RemoveAll(dir)

	ca, err := pki.Open(context.Background(), pki.Config{
		Dir:  dir,
		Keys: &pki.FileKeys{Dir: dir, Passphrase: []byte("station passphrase")},
		Name: "Line 3",
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ca.Close()
	fmt.Println(ca.Root().Subject.CommonName)
	fmt.Println(ca.Intermediate().Subject.CommonName, pki.KeyTypeOf(ca.Intermediate().PublicKey))
	// Output:
	// Line 3 Root CA
	// Line 3 Intermediate CA EC-P256
}

// Issue signs a leaf for a key made on the device; the CSR's CN is the unit's
// registration ID.
func ExampleCA_Issue() {
	dir, _ := os.MkdirTemp("", "kiln-ca")
	defer os.RemoveAll(dir)
	ctx := context.Background()
	ca, err := pki.Open(ctx, pki.Config{
		Dir:     dir,
		Keys:    &pki.FileKeys{Dir: dir, Passphrase: []byte("station passphrase")},
		Profile: pki.Profile{AllowedKeys: []pki.KeyType{pki.ECDSAP256}, MaxPerBatch: 500},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ca.Close()

	// On the DUT: a key and a CSR.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "sn-000123"}}, key)
	csr, _ := x509.ParseCertificateRequest(der)

	leaf, err := ca.Issue(ctx, csr, pki.IssueRequest{RegistrationID: "sn-000123", Operator: "ana", Batch: "2025-06-02-a"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(leaf.Certificate.Subject.CommonName, leaf.Certificate.ExtKeyUsage[0] == x509.ExtKeyUsageClientAuth, len(leaf.Chain))

	// A CSR for another unit is refused.
	_, err = ca.Issue(ctx, csr, pki.IssueRequest{RegistrationID: "sn-000124", Batch: "2025-06-02-a"})
	fmt.Println(err)
	// Output:
	// sn-000123 true 2
	// check CSR: CSR subject CN "sn-000123" is not the unit's registration ID "sn-000124"
}
