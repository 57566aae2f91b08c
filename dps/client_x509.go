package dps

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/kilnworks/kiln/station"
)

// RegisterX509 registers the device regID with X.509 attestation, as in §6:
// the register and the polls carry no token; the device certificate cert
// (leaf first, then the intermediates up to the enrolled signing
// certificate) is presented in the TLS handshake of every request. regID
// must be the leaf's subject CN. The device then connects to the assigned
// hub with the same certificate (HubConfig.Certificate). payload, when not
// nil, is sent as custom allocation data.
//
// The certificate is sent whatever CA names the server asks for (a Go TLS
// client otherwise drops a certificate whose issuer the server does not
// list). A final status of failed or disabled is returned in the state with
// a nil error. Kinds: Unauthorized (DPS refused the certificate, or its TLS
// certificate did not check out), NotFound, Unavailable, Invalid (bad
// arguments, a CN that is not regID, an HTTP client whose transport is not
// an *http.Transport, a malformed answer).
func (c *DeviceClient) RegisterX509(ctx context.Context, regID string, cert tls.Certificate, payload json.RawMessage) (*DeviceRegistrationState, error) {
	const op = "register with DPS"
	if c.Endpoint == "" || c.IDScope == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the DPS endpoint and ID scope must be set: write the device's provisioning config")
	}
	if err := station.ValidRegistrationID(regID); err != nil {
		return nil, err
	}
	if len(cert.Certificate) == 0 || cert.PrivateKey == nil {
		return nil, station.Errorf(op, station.KindInvalid, "no device certificate or key: load the device's certificate chain and key")
	}
	leaf := cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, station.Errorf(op, station.KindInvalid, "the device certificate does not parse: %w", err)
		}
	}
	if !strings.EqualFold(leaf.Subject.CommonName, regID) {
		return nil, station.Errorf(op, station.KindInvalid,
			"the device certificate's CN is %q, not the registration ID %q: DPS takes the CN as the registration ID", leaf.Subject.CommonName, regID)
	}
	hc, err := c.withClientCertificate(cert)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(DeviceRegistration{RegistrationID: regID, Payload: payload, ClientCertificateCSR: c.csr()})
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the custom payload is not JSON: %w", err)
	}
	cc := *c
	cc.HTTP = hc
	base := cc.baseURL(regID)

	cc.progress("register", "presenting the device certificate to "+c.Endpoint)
	st, err := cc.call(ctx, op, http.MethodPut, base+"/register", body, "")
	if err != nil {
		return nil, err
	}
	rs, err := cc.poll(ctx, op, base, regID, st, "")
	if err != nil || rs.Status != StatusAssigned {
		return rs, err
	}
	cc.progress(StatusAssigned, fmt.Sprintf("device %s on hub %s", rs.DeviceID, rs.AssignedHub))
	return rs, nil
}

// withClientCertificate returns a copy of the client's HTTP client whose
// TLS connections present cert. Kinds: Invalid.
func (c *DeviceClient) withClientCertificate(cert tls.Certificate) (*http.Client, error) {
	hc := http.Client{}
	if c.HTTP != nil {
		hc = *c.HTTP
	}
	var tr *http.Transport
	switch t := hc.Transport.(type) {
	case nil:
		tr = http.DefaultTransport.(*http.Transport).Clone()
	case *http.Transport:
		tr = t.Clone()
	default:
		return nil, station.Errorf("register with DPS", station.KindInvalid,
			"the DPS HTTP client's transport is a %T: X.509 registration needs an *http.Transport to present the certificate", t)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if tr.TLSClientConfig != nil {
		tc = tr.TLSClientConfig.Clone()
	}
	tc.Certificates = nil
	tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	tr.TLSClientConfig = tc
	hc.Transport = tr
	return &hc, nil
}
