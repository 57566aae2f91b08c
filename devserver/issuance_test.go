package devserver_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"math/big"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

// caIssuer is a CertificateIssuer over a real (throwaway) CA: it checks the
// CSR's CN as the station CA does and signs a clientAuth leaf.
type caIssuer struct {
	ca     *fixtures.CA
	issued atomic.Int32
	refuse bool
}

func (c *caIssuer) IssueDeviceCertificate(_ context.Context, regID string, der []byte) ([]*x509.Certificate, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	if c.refuse || csr.Subject.CommonName != regID {
		return nil, station.Errorf("issue", station.KindInvalid, "CSR subject CN %q is not the registration ID %q", csr.Subject.CommonName, regID)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: regID},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	out, err := x509.CreateCertificate(rand.Reader, tmpl, c.ca.Cert, csr.PublicKey, c.ca.Key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(out)
	if err != nil {
		return nil, err
	}
	c.issued.Add(1)
	return []*x509.Certificate{leaf}, nil
}

func newCSR(t *testing.T, cn string) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

// A device that sends a CSR with its registration gets the issued chain
// with its assignment, and the hub accepts that certificate.
func TestRegistrationIssuesCertificate(t *testing.T) {
	ctx := t.Context()
	ca, err := fixtures.NewCA("operational CA")
	if err != nil {
		t.Fatal(err)
	}
	iss := &caIssuer{ca: ca}
	e := start(t, devserver.Config{Issuer: iss, Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	const regID = "csr-unit-1"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	key, csr := newCSR(t, regID)
	dc := &dps.DeviceClient{Endpoint: e.srv.Addr(), IDScope: e.srv.IDScope(), HTTP: e.client, CSR: csr}
	st, err := dc.RegisterSymmetricKey(ctx, regID, primary, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != dps.StatusAssigned || st.IssuedClientCertificate == "" {
		t.Fatalf("registration: status %s, issued %q", st.Status, st.IssuedClientCertificate)
	}
	chain, err := pki.ParseCertificates([]byte(st.IssuedClientCertificate))
	if err != nil || len(chain) != 1 {
		t.Fatalf("issued chain: %d certificates, %v", len(chain), err)
	}
	if chain[0].Subject.CommonName != regID || chain[0].CheckSignatureFrom(ca.Cert) != nil {
		t.Errorf("issued leaf: CN %q, signed by the CA: %v", chain[0].Subject.CommonName, chain[0].CheckSignatureFrom(ca.Cert))
	}
	if !chain[0].PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Error("the issued leaf is not for the CSR's key")
	}

	// The hub takes the issued certificate for the device.
	h := startHub(t, func(c *devserver.HubConfig) {
		c.Directory = e.srv
		c.Now = time.Now
		c.TLS.ClientAuth, c.TLS.ClientCAs = tls.RequestClientCert, nil // thumbprint devices: no issuer list
	})
	cert := &tls.Certificate{Certificate: [][]byte{chain[0].Raw}, PrivateKey: key}
	c := h.mustDial(t, dialer{id: regID, username: hubUsername(hubA, regID), cert: cert})
	wait(t, c.Publish("devices/"+regID+"/messages/events/", 1, false, []byte(`{"op":"cert"}`)))
	if _, err := h.hub.WaitTelemetry(ctx, hubA, regID); err != nil {
		t.Fatal(err)
	}
	// A certificate from the same CA for another key is not the device's.
	otherKey, otherCSR := newCSR(t, regID)
	other, err := iss.IssueDeviceCertificate(ctx, regID, otherCSR)
	if err != nil {
		t.Fatal(err)
	}
	_, code, _ := h.dial(t, dialer{id: regID, username: hubUsername(hubA, regID), cert: &tls.Certificate{Certificate: [][]byte{other[0].Raw}, PrivateKey: otherKey}})
	if code == 0 {
		t.Error("the hub accepted a certificate that was not issued through the registration")
	}
}

// Refusals: a CSR to a service without an issuer gets DPS's exact message
// (the aziot client matches it and retries without the CSR); a CSR that is
// not one, or whose CN the issuer refuses, fails with the reason.
func TestRegistrationCSRRefusals(t *testing.T) {
	ctx := t.Context()
	plain := start(t, devserver.Config{})
	_, primary, _ := plain.enrollSymmetricKey(t, "csr-unit-2")
	_, csr := newCSR(t, "csr-unit-2")
	dc := &dps.DeviceClient{Endpoint: plain.srv.Addr(), IDScope: plain.srv.IDScope(), HTTP: plain.client, CSR: csr}
	_, err := dc.RegisterSymmetricKey(ctx, "csr-unit-2", primary, nil)
	if err == nil || !strings.Contains(err.Error(), "Device sent CSR but it is not configured in the service.") {
		t.Errorf("CSR without an issuer: %v", err)
	}

	ca, _ := fixtures.NewCA("operational CA")
	iss := &caIssuer{ca: ca}
	e := start(t, devserver.Config{Issuer: iss})
	_, primary, _ = e.enrollSymmetricKey(t, "csr-unit-3")
	token := rawSAS(e.srv.IDScope()+"/registrations/csr-unit-3", primary, time.Now().Add(time.Hour))
	r := e.do(t, http.MethodPut, registerPath(e.srv.IDScope(), "csr-unit-3"), token,
		map[string]string{"registrationId": "csr-unit-3", "clientCertificateCsr": base64.StdEncoding.EncodeToString([]byte("not a CSR"))})
	if body := r.errorBody(t, http.StatusBadRequest); !strings.Contains(body.Message, "PKCS#10") {
		t.Errorf("a body that is not a CSR: %+v", body)
	}

	_, wrongCN := newCSR(t, "someone-else")
	dc = &dps.DeviceClient{Endpoint: e.srv.Addr(), IDScope: e.srv.IDScope(), HTTP: e.client, CSR: wrongCN}
	st, err := dc.RegisterSymmetricKey(ctx, "csr-unit-3", primary, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != dps.StatusFailed || st.ErrorCode != dps.CodeBadRequest || !strings.Contains(st.ErrorMessage, "someone-else") || st.IssuedClientCertificate != "" {
		t.Errorf("a CSR for another CN: %+v", st)
	}
	if iss.issued.Load() != 0 {
		t.Errorf("%d certificates issued for refused CSRs", iss.issued.Load())
	}
}

func FuzzDecodeClientCSR(f *testing.F) {
	_, der := newCSRFuzz()
	f.Add(base64.StdEncoding.EncodeToString(der))
	f.Add("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
	f.Add("%%%")
	f.Fuzz(func(t *testing.T, s string) {
		der, err := devserver.DecodeClientCSR(s)
		if err != nil {
			if station.KindOf(err) != station.KindInvalid {
				t.Fatalf("kind %v for %q", station.KindOf(err), s)
			}
			return
		}
		if _, err := x509.ParseCertificateRequest(der); err != nil {
			t.Fatalf("accepted a CSR that does not parse: %v", err)
		}
	})
}

func newCSRFuzz() (*ecdsa.PrivateKey, []byte) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "seed"}}, key)
	return key, der
}
