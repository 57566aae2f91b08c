package devserver_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
)

// x509Device is a device certificate with its chain (leaf first, as sent
// in the TLS handshake).
type x509Device struct {
	cert tls.Certificate
	leaf *x509.Certificate
}

// issueDevice issues a client certificate with subject CN cn from ca; the
// chain sent carries the leaf and the given intermediates.
func issueDevice(t testing.TB, ca *fixtures.CA, cn string, intermediates ...*fixtures.CA) *x509Device {
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
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	chain := [][]byte{der}
	for _, i := range intermediates {
		chain = append(chain, i.Cert.Raw)
	}
	return &x509Device{cert: tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, leaf: leaf}
}

func certPEM(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

func newTestRoot(t testing.TB, name string) *fixtures.CA {
	t.Helper()
	ca, err := fixtures.NewCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// doCert sends a device API request over a connection presenting cert
// (none when nil).
func (e *env) doCert(t testing.TB, cert *tls.Certificate, method, path, body string) *reply {
	t.Helper()
	tc := &tls.Config{RootCAs: e.pool}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	tr := &http.Transport{TLSClientConfig: tc}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(method, e.base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	rsp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer rsp.Body.Close()
	b, err := io.ReadAll(rsp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return &reply{status: rsp.StatusCode, header: rsp.Header, body: b}
}

// registerX509 runs an X.509 registration: register, then polls until the
// status is no longer assigning. It returns the final answer.
func (e *env) registerX509(t testing.TB, cert *tls.Certificate, regID string) (*dps.RegistrationOperationStatus, []byte) {
	t.Helper()
	scope := e.srv.IDScope()
	r := e.doCert(t, cert, http.MethodPut, registerPath(scope, regID), `{"registrationId":"`+regID+`"}`)
	if r.status != http.StatusAccepted {
		t.Fatalf("register %s: %d %s", regID, r.status, r.body)
	}
	var op dps.RegistrationOperationStatus
	r.decode(t, &op)
	path := "/" + scope + "/registrations/" + url.PathEscape(regID) + "/operations/" + url.PathEscape(op.OperationID) + "?api-version=2019-03-31"
	deadline := time.Now().Add(20 * time.Second)
	for {
		p := e.doCert(t, cert, http.MethodGet, path, "{}")
		switch p.status {
		case http.StatusOK:
			var final dps.RegistrationOperationStatus
			p.decode(t, &final)
			return &final, p.body
		case http.StatusAccepted:
		default:
			t.Fatalf("poll %s: %d %s", regID, p.status, p.body)
		}
		if time.Now().After(deadline) {
			t.Fatal("still assigning after 20 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func x509Group(id string, signing *x509.Certificate, edit ...func(*dps.EnrollmentGroup)) dps.EnrollmentGroup {
	g := dps.EnrollmentGroup{
		EnrollmentGroupID: id,
		Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(signing)}},
		}},
	}
	for _, f := range edit {
		f(&g)
	}
	return g
}

func (e *env) putGroup(t testing.TB, g dps.EnrollmentGroup) {
	t.Helper()
	if r := e.service(t, http.MethodPut, "/enrollmentGroups/"+url.PathEscape(g.EnrollmentGroupID), g); r.status != http.StatusOK {
		t.Fatalf("create group %s: %d %s", g.EnrollmentGroupID, r.status, r.body)
	}
}

func upperHex(b []byte) string { return strings.ToUpper(hex.EncodeToString(b)) }

func TestX509IndividualEnrollment(t *testing.T) {
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	root := newTestRoot(t, "x509 individual root")
	dev := issueDevice(t, root, "x509-ind-1")
	s1, s256 := sha1.Sum(dev.leaf.Raw), sha256.Sum256(dev.leaf.Raw)

	// By certificate (base64 DER), with a device ID.
	e.enroll(t, "x509-ind-1", nil, func(en *dps.IndividualEnrollment) {
		en.DeviceID = "dev-ind-1"
		en.Attestation = dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{
				Certificate: base64.StdEncoding.EncodeToString(dev.leaf.Raw)}},
		}}
	})
	final, raw := e.registerX509(t, &dev.cert, "x509-ind-1")
	st := final.RegistrationState
	if final.Status != dps.StatusAssigned || st == nil || st.X509 == nil || st.X509.EnrollmentGroupID != "" ||
		st.AssignedHub != hubA || st.DeviceID != "dev-ind-1" || st.TPM != nil || st.SymmetricKey != nil {
		t.Fatalf("final: %s", raw)
	}
	if !strings.Contains(string(raw), `"x509":{}`) {
		t.Errorf("want \"x509\":{} in %s", raw)
	}
	hd, err := e.srv.HubDevice(t.Context(), hubA, "dev-ind-1")
	if err != nil {
		t.Fatal(err)
	}
	if !hd.Enabled || hd.PrimaryKey != nil || !slices.Equal(hd.Thumbprints, []string{upperHex(s1[:]), upperHex(s256[:])}) {
		t.Errorf("hub device %+v", hd)
	}

	// By SHA-256 thumbprint only; the CN matches ignoring case.
	dev2 := issueDevice(t, root, "X509-Ind-2")
	s2 := sha256.Sum256(dev2.leaf.Raw)
	e.enroll(t, "x509-ind-2", nil, func(en *dps.IndividualEnrollment) {
		en.Attestation = dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{
				Info: &dps.X509CertificateInfo{SHA256Thumbprint: strings.ToLower(hex.EncodeToString(s2[:]))}}},
		}}
	})
	if final, raw := e.registerX509(t, &dev2.cert, "x509-ind-2"); final.Status != dps.StatusAssigned {
		t.Fatalf("by thumbprint: %s", raw)
	}

	// Another certificate with the same CN is refused.
	other := issueDevice(t, root, "x509-ind-1")
	r := e.doCert(t, &other.cert, http.MethodPut, registerPath(e.srv.IDScope(), "x509-ind-1"), "")
	r.errorBody(t, http.StatusUnauthorized)
}

func TestX509Group(t *testing.T) {
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	root := newTestRoot(t, "x509 group root")
	inter, err := root.NewIntermediate("x509 group intermediate")
	if err != nil {
		t.Fatal(err)
	}
	// Two groups on the same chain: the intermediate's is more specific.
	e.putGroup(t, x509Group("grp-root", root.Cert))
	e.putGroup(t, x509Group("grp-inter", inter.Cert, func(g *dps.EnrollmentGroup) {
		g.InitialTwin = &dps.InitialTwin{Properties: &dps.InitialTwinProperties{Desired: []byte(`{"fw":"2.1"}`)}}
	}))

	dev := issueDevice(t, inter, "x509-grp-1", inter)
	final, raw := e.registerX509(t, &dev.cert, "x509-grp-1")
	st := final.RegistrationState
	if final.Status != dps.StatusAssigned || st.X509 == nil || st.X509.EnrollmentGroupID != "grp-inter" ||
		st.DeviceID != "x509-grp-1" || st.AssignedHub != hubA {
		t.Fatalf("final: %s", raw)
	}
	hd, err := e.srv.HubDevice(t.Context(), hubA, "x509-grp-1")
	if err != nil {
		t.Fatal(err)
	}
	s256 := sha256.Sum256(dev.leaf.Raw)
	if !hd.Enabled || !slices.Contains(hd.Thumbprints, upperHex(s256[:])) || string(hd.Twin) != `{"fw":"2.1"}` {
		t.Errorf("hub device %+v", hd)
	}
	// The service lists the device under its group.
	r := e.service(t, http.MethodPost, "/registrations/grp-inter/query", nil)
	if r.status != http.StatusOK || !strings.Contains(string(r.body), `"x509-grp-1"`) {
		t.Errorf("group registrations: %d %s", r.status, r.body)
	}

	// Without the intermediate in the chain, the intermediate's group
	// still signs the leaf directly.
	dev2 := issueDevice(t, inter, "x509-grp-2")
	if final, raw := e.registerX509(t, &dev2.cert, "x509-grp-2"); final.RegistrationState.X509.EnrollmentGroupID != "grp-inter" {
		t.Errorf("leaf only: %s", raw)
	}

	// Delete the intermediate's group: the root's group takes over, via
	// the presented intermediate...
	if r := e.service(t, http.MethodDelete, "/enrollmentGroups/grp-inter", nil); r.status != http.StatusNoContent && r.status != http.StatusOK {
		t.Fatalf("delete group: %d %s", r.status, r.body)
	}
	if final, raw := e.registerX509(t, &dev.cert, "x509-grp-1"); final.RegistrationState.X509.EnrollmentGroupID != "grp-root" {
		t.Errorf("root group: %s", raw)
	}
	// ...but not without the intermediate (§6: a missing intermediate fails).
	e.doCert(t, &dev2.cert, http.MethodPut, registerPath(e.srv.IDScope(), "x509-grp-2"), "").errorBody(t, http.StatusUnauthorized)
}

func TestX509Refusals(t *testing.T) {
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	scope := e.srv.IDScope()
	root := newTestRoot(t, "x509 known root")
	e.putGroup(t, x509Group("grp-known", root.Cert))

	t.Run("CN is not the registration ID", func(t *testing.T) {
		dev := issueDevice(t, root, "x509-cn-a")
		got := e.doCert(t, &dev.cert, http.MethodPut, registerPath(scope, "x509-cn-b"), "").errorBody(t, http.StatusUnauthorized)
		if got.ErrorCode != dps.CodeUnauthorized {
			t.Errorf("errorCode %d", got.ErrorCode)
		}
	})
	t.Run("chain to an unknown CA", func(t *testing.T) {
		unknown := newTestRoot(t, "x509 unknown root")
		inter, err := unknown.NewIntermediate("x509 unknown intermediate")
		if err != nil {
			t.Fatal(err)
		}
		dev := issueDevice(t, inter, "x509-unknown", inter)
		e.doCert(t, &dev.cert, http.MethodPut, registerPath(scope, "x509-unknown"), "").errorBody(t, http.StatusUnauthorized)
	})
	t.Run("expired leaf", func(t *testing.T) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "x509-expired"},
			NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, root.Cert, key.Public(), root.Key)
		if err != nil {
			t.Fatal(err)
		}
		cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
		e.doCert(t, &cert, http.MethodPut, registerPath(scope, "x509-expired"), "").errorBody(t, http.StatusUnauthorized)
	})
	t.Run("no client certificate", func(t *testing.T) {
		dev := issueDevice(t, root, "x509-nocert")
		e.enroll(t, "x509-nocert", nil, func(en *dps.IndividualEnrollment) {
			en.Attestation = dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
				ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(dev.leaf)}},
			}}
		})
		e.doCert(t, nil, http.MethodPut, registerPath(scope, "x509-nocert"), "").errorBody(t, http.StatusUnauthorized)
		// A group device without a certificate has nothing to match.
		e.doCert(t, nil, http.MethodPut, registerPath(scope, "x509-grp-nocert"), "").errorBody(t, http.StatusUnauthorized)
	})
	t.Run("disabled group", func(t *testing.T) {
		other := newTestRoot(t, "x509 disabled root")
		e.putGroup(t, x509Group("grp-disabled", other.Cert, func(g *dps.EnrollmentGroup) { g.ProvisioningStatus = dps.ProvisioningDisabled }))
		dev := issueDevice(t, other, "x509-disabled")
		final, raw := e.registerX509(t, &dev.cert, "x509-disabled")
		if final.Status != dps.StatusDisabled || final.RegistrationState == nil || final.RegistrationState.Status != dps.StatusDisabled {
			t.Fatalf("final: %s", raw)
		}
		if _, err := e.srv.HubDevice(t.Context(), hubA, "x509-disabled"); err == nil {
			t.Error("a disabled device is on the hub")
		}
	})
	t.Run("disabled individual", func(t *testing.T) {
		dev := issueDevice(t, root, "x509-ind-disabled")
		e.enroll(t, "x509-ind-disabled", nil, func(en *dps.IndividualEnrollment) {
			en.ProvisioningStatus = dps.ProvisioningDisabled
			en.Attestation = dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
				ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(dev.leaf)}},
			}}
		})
		// The individual enrollment wins over the (enabled) group of its CA.
		final, raw := e.registerX509(t, &dev.cert, "x509-ind-disabled")
		if final.Status != dps.StatusDisabled {
			t.Fatalf("final: %s", raw)
		}
	})
	t.Run("symmetric-key device presenting a certificate", func(t *testing.T) {
		// A SAS request keeps its attestation even with a client certificate.
		dev := issueDevice(t, root, "x509-sas")
		key := make([]byte, 32)
		e.enroll(t, "x509-sas", nil, func(en *dps.IndividualEnrollment) {
			en.Attestation = dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{
				PrimaryKey: base64.StdEncoding.EncodeToString(key), SecondaryKey: base64.StdEncoding.EncodeToString(key)}}
		})
		tok := dps.NewSAS(dps.DeviceResource(scope, "x509-sas"), key, time.Now().Add(time.Hour), dps.RegistrationKeyName)
		tc := &tls.Config{RootCAs: e.pool, Certificates: []tls.Certificate{dev.cert}}
		tr := &http.Transport{TLSClientConfig: tc}
		defer tr.CloseIdleConnections()
		req, _ := http.NewRequest(http.MethodPut, e.base+registerPath(scope, "x509-sas"), strings.NewReader("{}"))
		req.Header.Set("Authorization", tok)
		rsp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		rsp.Body.Close()
		if rsp.StatusCode != http.StatusAccepted {
			t.Errorf("status %d", rsp.StatusCode)
		}
	})
}

// TestX509DeviceReachesHub registers a group device and connects it to the
// embedded hub with the same certificate.
func TestX509DeviceReachesHub(t *testing.T) {
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	root := newTestRoot(t, "x509 hub root")
	inter, err := root.NewIntermediate("x509 hub intermediate")
	if err != nil {
		t.Fatal(err)
	}
	e.putGroup(t, x509Group("grp-hub", root.Cert))
	const regID = "x509-hub-1"
	dev := issueDevice(t, inter, regID, inter)
	if final, raw := e.registerX509(t, &dev.cert, regID); final.Status != dps.StatusAssigned {
		t.Fatalf("final: %s", raw)
	}
	h := startHub(t, func(c *devserver.HubConfig) {
		c.TLS = &tls.Config{Certificates: c.TLS.Certificates} // the hub requests any certificate
		c.Directory = e.srv
		c.Now = time.Now
	})
	c := h.mustDial(t, dialer{id: regID, username: hubUsername(hubA, regID), cert: &dev.cert})
	wait(t, c.Publish("devices/"+regID+"/messages/events/", 1, false, []byte(`{"t":1}`)))
	got, err := h.hub.WaitTelemetry(t.Context(), hubA, regID)
	if err != nil || string(got.Body) != `{"t":1}` {
		t.Fatalf("telemetry %q, %v", got.Body, err)
	}
	// Another certificate of the same CA and CN is not the registered one.
	other := issueDevice(t, inter, regID, inter)
	if _, _, err := h.dial(t, dialer{id: regID, username: hubUsername(hubA, regID), cert: &other.cert}); err == nil {
		t.Error("the hub accepted a certificate the device did not register with")
	}
}
