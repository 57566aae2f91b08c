package dps_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log"
	"math/big"
	"net/http/httptest"
	"os"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// Proof of possession of a CA's private key: upload the CA certificate,
// generate a verification code, and post a certificate whose subject CN is
// the code, signed by the CA. Enrollment groups that reference the CA in
// caReferences then accept the devices it signs. Here against Kiln's
// devserver.
func ExampleServiceClient_VerifyCertificate() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "kiln-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	srv, err := devserver.New(devserver.Config{DataDir: dir, HostName: "kiln-example.azure-devices-provisioning.net"})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	ts := httptest.NewTLSServer(srv.Handler())
	defer ts.Close()
	svc, err := dps.NewServiceClient(srv.ServiceConnectionString(), dps.ServiceOptions{HTTP: ts.Client(), BaseURL: ts.URL})
	if err != nil {
		log.Fatal(err)
	}

	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Line 7 device CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caPEM, ca := issue(ca, ca, caKey.Public(), caKey)

	up, err := svc.PutCertificate(ctx, "line-7", dps.CertificateUpload{Certificate: caPEM}, "")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("uploaded, verified:", up.Properties.IsVerified)

	code, err := svc.GenerateVerificationCode(ctx, "line-7", up.ETag)
	if err != nil {
		log.Fatal(err)
	}
	proofKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	proofPEM, _ := issue(&x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: code.Properties.VerificationCode},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}, ca, proofKey.Public(), caKey)
	v, err := svc.VerifyCertificate(ctx, "line-7", code.ETag, proofPEM)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("after proof of possession, verified:", v.Properties.IsVerified)
	// Output:
	// uploaded, verified: false
	// after proof of possession, verified: true
}

// issue signs tmpl with parent's key and returns it as PEM and parsed.
func issue(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (string, *x509.Certificate) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		log.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		log.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), c
}
