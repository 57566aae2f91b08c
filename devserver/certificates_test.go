package devserver_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// serviceClient returns a dps.ServiceClient for the env's server, over its
// real HTTPS listener.
func (e *env) serviceClient(t testing.TB) *dps.ServiceClient {
	t.Helper()
	c, err := dps.NewServiceClient(e.srv.ServiceConnectionString(), dps.ServiceOptions{HTTP: e.client, BaseURL: e.base})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// caRefGroup is an X.509 enrollment group that references CA certificates
// by name.
func caRefGroup(id, primary string) dps.EnrollmentGroup {
	return dps.EnrollmentGroup{
		EnrollmentGroupID: id,
		Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			CAReferences: &dps.X509CAReferences{Primary: primary},
		}},
	}
}

func TestCACertificateProofOfPossession(t *testing.T) {
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA, ApplyAllocationPolicy: true}}})
	ctx := t.Context()
	svc := e.serviceClient(t)
	scope := e.srv.IDScope()
	root := newTestRoot(t, "line CA")
	other := newTestRoot(t, "someone else's CA")

	up, err := svc.PutCertificate(ctx, "line-ca", dps.CertificateUpload{Certificate: certPEM(root.Cert)}, "")
	if err != nil {
		t.Fatal(err)
	}
	if up.Properties.IsVerified || up.Name != "line-ca" || up.ETag == "" || !strings.Contains(up.Properties.Subject, "CN=line CA") ||
		len(up.Properties.Thumbprint) != 40 || up.Type != dps.CertificateType || up.Properties.VerificationCode != "" {
		t.Errorf("upload answer %+v: want unverified line-ca with subject, thumbprint, etag and no code", up)
	}
	e.putGroup(t, caRefGroup("grp-caref", "line-ca"))

	// A device chain to the unverified CA is refused: 401 with a DPS body.
	dev := issueDevice(t, root, "caref-dev-1")
	b := e.doCert(t, &dev.cert, http.MethodPut, registerPath(scope, "caref-dev-1"), `{"registrationId":"caref-dev-1"}`).errorBody(t, http.StatusUnauthorized)
	if b.ErrorCode != dps.CodeUnauthorized {
		t.Errorf("unverified CA: errorCode %d, want 401002", b.ErrorCode)
	}

	// Verify before any code: refused, saying to generate one.
	if _, err := svc.VerifyCertificate(ctx, "line-ca", "", certPEM(issueDevice(t, root, "no-code-yet").leaf)); station.KindOf(err) != station.KindInvalid ||
		!strings.Contains(err.Error(), "generate one") {
		t.Errorf("verify without a code: %v, want Invalid asking for a code first", err)
	}

	code, err := svc.GenerateVerificationCode(ctx, "line-ca", up.ETag)
	if err != nil {
		t.Fatal(err)
	}
	vc := code.Properties.VerificationCode
	if len(vc) != 48 || code.Properties.IsVerified || code.ETag == up.ETag {
		t.Fatalf("generateVerificationCode answer %+v: want a 48-digit code, unverified, a new etag", code)
	}
	if _, err := svc.GenerateVerificationCode(ctx, "line-ca", up.ETag); station.KindOf(err) != station.KindConflict {
		t.Errorf("generateVerificationCode with a stale If-Match: %v, want Conflict (412)", err)
	}

	refusals := []struct {
		name, proof, want string
	}{
		{"wrong CN", certPEM(issueDevice(t, root, "not-the-code").leaf), "not the verification code"},
		{"signed by another CA", certPEM(issueDevice(t, other, vc).leaf), "not signed by the key"},
		{"the CA certificate itself", certPEM(root.Cert), "not the verification code"},
		{"not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "certificate"},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			_, err := svc.VerifyCertificate(ctx, "line-ca", "", tt.proof)
			if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("verify: %v, want Invalid (400) saying %q", err, tt.want)
			}
		})
	}
	// The raw answer is a 400 with a DPS error body that says what to do.
	rb := e.service(t, http.MethodPost, "/certificates/line-ca/verify", dps.VerificationCodeRequest{Certificate: refusals[0].proof}).errorBody(t, http.StatusBadRequest)
	if !strings.Contains(rb.Message, "CN="+vc) {
		t.Errorf("wrong-CN message %q: want it to name the CN to issue", rb.Message)
	}
	// Still unverified: the device is still refused.
	e.doCert(t, &dev.cert, http.MethodPut, registerPath(scope, "caref-dev-1"), "").errorBody(t, http.StatusUnauthorized)

	verified, err := svc.VerifyCertificate(ctx, "line-ca", code.ETag, certPEM(issueDevice(t, root, vc).leaf))
	if err != nil {
		t.Fatal(err)
	}
	if !verified.Properties.IsVerified {
		t.Fatalf("verify answer %+v: want isVerified", verified)
	}
	if got, err := svc.GetCertificate(ctx, "LINE-CA"); err != nil || !got.Properties.IsVerified || got.ETag != verified.ETag {
		t.Errorf("get after verify: %+v %v", got, err)
	}
	// The code is used up.
	if _, err := svc.VerifyCertificate(ctx, "line-ca", "", certPEM(issueDevice(t, root, vc).leaf)); station.KindOf(err) != station.KindInvalid {
		t.Errorf("verify twice with one code: %v, want Invalid", err)
	}

	// Now the device registers through the group.
	final, raw := e.registerX509(t, &dev.cert, "caref-dev-1")
	st := final.RegistrationState
	if final.Status != dps.StatusAssigned || st.X509 == nil || st.X509.EnrollmentGroupID != "grp-caref" || st.AssignedHub != hubA {
		t.Fatalf("final after verification: %s", raw)
	}
	// A device of another CA does not.
	odev := issueDevice(t, other, "caref-dev-2")
	e.doCert(t, &odev.cert, http.MethodPut, registerPath(scope, "caref-dev-2"), "").errorBody(t, http.StatusUnauthorized)

	// Replacing the certificate under the name makes it unverified again.
	if re, err := svc.PutCertificate(ctx, "line-ca", dps.CertificateUpload{Certificate: certPEM(root.Cert)}, ""); err != nil || !re.Properties.IsVerified {
		t.Errorf("re-upload of the same certificate: %+v %v, want it to stay verified", re, err)
	}
	if re, err := svc.PutCertificate(ctx, "line-ca", dps.CertificateUpload{Certificate: certPEM(other.Cert)}, ""); err != nil || re.Properties.IsVerified {
		t.Errorf("upload of another certificate: %+v %v, want unverified", re, err)
	}
	e.doCert(t, &dev.cert, http.MethodPut, registerPath(scope, "caref-dev-1"), "").errorBody(t, http.StatusUnauthorized)
	e.doCert(t, &odev.cert, http.MethodPut, registerPath(scope, "caref-dev-2"), "").errorBody(t, http.StatusUnauthorized)

	// isVerified on upload skips proof of possession, as DPS allows.
	if _, err := svc.PutCertificate(ctx, "line-ca", dps.CertificateUpload{Certificate: certPEM(root.Cert), IsVerified: true}, ""); err != nil {
		t.Fatal(err)
	}
	if final, raw := e.registerX509(t, &dev.cert, "caref-dev-1"); final.Status != dps.StatusAssigned {
		t.Errorf("after upload with isVerified: %s", raw)
	}

	// Deleted: refused again.
	if err := svc.DeleteCertificate(ctx, "line-ca", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.GetCertificate(ctx, "line-ca"); station.KindOf(err) != station.KindNotFound {
		t.Errorf("get after delete: %v", err)
	}
	e.doCert(t, &dev.cert, http.MethodPut, registerPath(scope, "caref-dev-1"), "").errorBody(t, http.StatusUnauthorized)
}

func TestCACertificateUploadRules(t *testing.T) {
	e := start(t, devserver.Config{})
	ctx := t.Context()
	svc := e.serviceClient(t)
	root := newTestRoot(t, "rules CA")

	// Only CA certificates: a device certificate cannot sign devices.
	leaf := issueDevice(t, root, "a-leaf").leaf
	if _, err := svc.PutCertificate(ctx, "leaf", dps.CertificateUpload{Certificate: certPEM(leaf)}, ""); station.KindOf(err) != station.KindInvalid ||
		!strings.Contains(err.Error(), "not a CA certificate") {
		t.Errorf("leaf upload: %v, want Invalid: not a CA certificate", err)
	}
	for _, body := range []string{`{}`, `{"properties":{"certificate":"bm90IGEgY2VydA=="}}`, `[`} {
		e.service(t, http.MethodPut, "/certificates/bad", body).errorBody(t, http.StatusBadRequest)
	}
	e.service(t, http.MethodPut, "/certificates/bad name", `{}`).errorBody(t, http.StatusBadRequest)
	e.service(t, http.MethodGet, "/certificates/nope", nil).errorBody(t, http.StatusNotFound)
	e.service(t, http.MethodPost, "/certificates/nope/generateVerificationCode", nil).errorBody(t, http.StatusNotFound)
	// Base64 DER is accepted as well as PEM; a bare body too.
	if r := e.service(t, http.MethodPut, "/certificates/der", `{"certificate":"`+dps.EncodeKey(root.Cert.Raw)+`"}`); r.status != http.StatusOK {
		t.Errorf("base64 DER upload: %d %s", r.status, r.body)
	}

	// At most 25 CA certificates (§10): the 26th is refused with 409.
	for i := 1; i < dps.MaxCertificates; i++ {
		ca := newTestRoot(t, fmt.Sprintf("CA %d", i))
		if _, err := svc.PutCertificate(ctx, fmt.Sprintf("ca-%02d", i), dps.CertificateUpload{Certificate: certPEM(ca.Cert)}, ""); err != nil {
			t.Fatalf("certificate %d: %v", i, err)
		}
	}
	list, err := svc.ListCertificates(ctx)
	if err != nil || len(list) != dps.MaxCertificates {
		t.Fatalf("list: %d certificates, %v; want %d", len(list), err, dps.MaxCertificates)
	}
	b := e.service(t, http.MethodPut, "/certificates/one-too-many", dps.CertificateUpload{Certificate: certPEM(root.Cert)}).errorBody(t, http.StatusConflict)
	if b.ErrorCode != 409001 || !strings.Contains(b.Message, "delete one") {
		t.Errorf("26th certificate: %d %q", b.ErrorCode, b.Message)
	}
	// Replacing one at the limit is fine.
	if _, err := svc.PutCertificate(ctx, "ca-01", dps.CertificateUpload{Certificate: certPEM(root.Cert)}, ""); err != nil {
		t.Errorf("replace at the limit: %v", err)
	}
}

func TestCACertificateNeedsServiceConfig(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	e := start(t, devserver.Config{
		ServiceKeys:   map[string][]byte{"enrollments": key, devserver.DefaultPolicy: key},
		ServiceRights: map[string][]devserver.Right{"enrollments": {devserver.RightEnrollmentRead, devserver.RightEnrollmentWrite}},
	})
	root := newTestRoot(t, "rights CA")
	tok := dps.NewServiceSAS(e.srv.Addr(), "enrollments", key, time.Now().Add(time.Hour))
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/certificates"},
		{http.MethodPut, "/certificates/ca"},
		{http.MethodPost, "/certificates/ca/generateVerificationCode"},
	} {
		r := e.do(t, tc.method, tc.path+"?api-version=2021-10-01", tok, dps.CertificateUpload{Certificate: certPEM(root.Cert)})
		r.errorBody(t, http.StatusUnauthorized)
	}
	if r := e.do(t, http.MethodPut, "/certificates/ca?api-version=2021-10-01",
		dps.NewServiceSAS(e.srv.Addr(), devserver.DefaultPolicy, key, time.Now().Add(time.Hour)), dps.CertificateUpload{Certificate: certPEM(root.Cert)}); r.status != http.StatusOK {
		t.Errorf("owner policy upload: %d %s", r.status, r.body)
	}
}
