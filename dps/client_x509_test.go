package dps_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"testing"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/station"
)

// issueClientCert issues a device certificate with CN cn from ca, the chain
// carrying the leaf then ca's certificate.
func issueClientCert(t *testing.T, ca *fixtures.CA, cn string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key}
}

// TestRegisterX509EndToEnd registers a device of an X.509 enrollment group
// (signing certificate: the root; the device sends its intermediate), then
// connects to the embedded hub with the same certificate and sends
// telemetry.
func TestRegisterX509EndToEnd(t *testing.T) {
	env := startDevserver(t)
	ctx := t.Context()
	root, err := fixtures.NewCA("dps x509 root")
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate("dps x509 intermediate")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := dps.NewServiceClient(env.dps.ServiceConnectionString(), dps.ServiceOptions{HTTP: env.httpClient(), BaseURL: "https://" + env.dps.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	_, err = svc.PutEnrollmentGroup(ctx, &dps.EnrollmentGroup{
		EnrollmentGroupID: "x509-line",
		Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{
				Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Cert.Raw}))}},
		}},
	}, "")
	if err != nil {
		t.Fatal(err)
	}

	const regID = "x509-client-1"
	cert := issueClientCert(t, inter, regID)
	dc := &dps.DeviceClient{Endpoint: env.dps.Addr(), IDScope: env.dps.IDScope(), HTTP: env.httpClient()}
	st, err := dc.RegisterX509(ctx, regID, cert, nil)
	if err != nil {
		t.Fatalf("RegisterX509: %v", err)
	}
	if st.Status != dps.StatusAssigned || st.AssignedHub != env.hubName || st.DeviceID != regID ||
		st.X509 == nil || st.X509.EnrollmentGroupID != "x509-line" {
		t.Fatalf("state = %+v, want assigned through group x509-line", st)
	}

	hub, err := dps.ConnectHub(ctx, dps.HubConfig{
		Addr: st.AssignedHub, DeviceID: st.DeviceID, Certificate: &cert, TLS: &tls.Config{RootCAs: env.roots},
	})
	if err != nil {
		t.Fatalf("ConnectHub with the certificate: %v", err)
	}
	defer hub.Close()
	if _, err := hub.SendTelemetry(ctx, []byte(`{"kiln":"x509"}`), nil); err != nil {
		t.Fatal(err)
	}
	got, err := env.hub.WaitTelemetry(ctx, st.AssignedHub, st.DeviceID)
	if err != nil || string(got.Body) != `{"kiln":"x509"}` {
		t.Fatalf("telemetry %q, %v", got.Body, err)
	}

	// Refusals: a CN that is not the registration ID (caught before
	// sending), a certificate of an unknown CA.
	if _, err := dc.RegisterX509(ctx, "x509-other", cert, nil); station.KindOf(err) != station.KindInvalid {
		t.Errorf("CN mismatch: %v, want invalid", err)
	}
	stranger, err := fixtures.NewCA("dps x509 stranger")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dc.RegisterX509(ctx, "x509-client-2", issueClientCert(t, stranger, "x509-client-2"), nil); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("unknown CA: %v, want unauthorized", err)
	}
	// A hub connection with another certificate of the same CN is refused.
	if _, err := dps.ConnectHub(ctx, dps.HubConfig{
		Addr: st.AssignedHub, DeviceID: st.DeviceID, Certificate: new(issueClientCert(t, inter, regID)), TLS: &tls.Config{RootCAs: env.roots},
	}); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("hub with another certificate: %v, want unauthorized", err)
	}
}
