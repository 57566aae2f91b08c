package devserver_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

func TestServiceAuth(t *testing.T) {
	e := start(t, devserver.Config{})
	cs, err := dps.ParseConnectionString(e.srv.ServiceConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	if cs.SharedAccessKeyName != devserver.DefaultPolicy || cs.HostName != e.srv.Addr() {
		t.Errorf("connection string %s", cs)
	}
	path := "/enrollments/x?api-version=2021-10-01"
	for _, tc := range []struct{ name, auth string }{
		{"none", ""},
		{"not SAS", "Bearer abc"},
		{"bad signature", dps.NewServiceSAS(cs.HostName, cs.SharedAccessKeyName, []byte("wrong key"), time.Now().Add(time.Hour))},
		{"unknown policy", dps.NewServiceSAS(cs.HostName, "nobody", cs.Key, time.Now().Add(time.Hour))},
		{"expired", dps.NewServiceSAS(cs.HostName, cs.SharedAccessKeyName, cs.Key, time.Now().Add(-time.Minute))},
		{"other host", dps.NewServiceSAS("other.example", cs.SharedAccessKeyName, cs.Key, time.Now().Add(time.Hour))},
		{"scoped to another resource", dps.NewSAS(strings.ToLower(cs.HostName)+"/enrollmentGroups", cs.Key, time.Now().Add(time.Hour), cs.SharedAccessKeyName)},
		{"scoped to a longer name", dps.NewSAS(strings.ToLower(cs.HostName)+"/enrollmentsX", cs.Key, time.Now().Add(time.Hour), cs.SharedAccessKeyName)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := e.do(t, http.MethodGet, path, tc.auth, nil).errorBody(t, http.StatusUnauthorized)
			if got.ErrorCode != dps.CodeUnauthorized {
				t.Errorf("errorCode %d", got.ErrorCode)
			}
		})
	}
	// A valid token, and one scoped to /enrollments.
	e.do(t, http.MethodGet, path, cs.SAS(time.Now().Add(time.Hour)), nil).errorBody(t, http.StatusNotFound)
	scoped := dps.NewSAS(strings.ToLower(cs.HostName)+"/enrollments", cs.Key, time.Now().Add(time.Hour), cs.SharedAccessKeyName)
	e.do(t, http.MethodGet, path, scoped, nil).errorBody(t, http.StatusNotFound)
}

func TestEnrollmentCRUD(t *testing.T) {
	e := start(t, devserver.Config{})
	dev := newSoftDevice(t, true)
	created := e.enroll(t, "crud-1", dev.ek, func(en *dps.IndividualEnrollment) { en.DeviceID = "dev-1" })
	if created.ETag == "" || !strings.HasPrefix(created.ETag, `"`) || created.CreatedDateTimeUTC.IsZero() ||
		created.LastUpdatedDateTimeUTC.IsZero() || created.ProvisioningStatus != "enabled" || created.DeviceID != "dev-1" {
		t.Errorf("created %+v", created)
	}

	got := e.service(t, http.MethodGet, "/enrollments/CRUD-1", nil)
	var read dps.IndividualEnrollment
	got.decode(t, &read)
	if got.status != http.StatusOK || read.ETag != created.ETag || read.Attestation.TPM == nil || read.RegistrationID != "crud-1" {
		t.Errorf("read: %d %s", got.status, got.body)
	}

	// If-Match mismatch: 412 on PUT and DELETE.
	upd := read
	upd.DeviceID = "dev-2"
	e.service(t, http.MethodPut, "/enrollments/crud-1", upd, "If-Match", `"stale"`).errorBody(t, http.StatusPreconditionFailed)
	upd.ETag = `"stale"` // the body's etag counts as If-Match (Node sends both)
	e.service(t, http.MethodPut, "/enrollments/crud-1", upd).errorBody(t, http.StatusPreconditionFailed)
	upd.ETag = ""
	r := e.service(t, http.MethodPut, "/enrollments/crud-1", upd, "If-Match", created.ETag)
	var updated dps.IndividualEnrollment
	r.decode(t, &updated)
	if r.status != http.StatusOK || updated.ETag == created.ETag || updated.DeviceID != "dev-2" ||
		!updated.CreatedDateTimeUTC.Equal(created.CreatedDateTimeUTC.Time) {
		t.Errorf("update: %d %s", r.status, r.body)
	}
	// registrationState in a PUT is ignored (read-only).
	upd.RegistrationState = &dps.DeviceRegistrationState{RegistrationID: "crud-1", Status: "assigned", AssignedHub: "evil"}
	if r := e.service(t, http.MethodPut, "/enrollments/crud-1", upd); strings.Contains(string(r.body), "evil") {
		t.Errorf("registrationState was taken from the request: %s", r.body)
	}
	e.service(t, http.MethodDelete, "/enrollments/crud-1", nil, "If-Match", `"stale"`).errorBody(t, http.StatusPreconditionFailed)
	if r := e.service(t, http.MethodDelete, "/enrollments/crud-1", nil, "If-Match", "*"); r.status != http.StatusNoContent {
		t.Errorf("delete: %d %s", r.status, r.body)
	}
	if got := e.service(t, http.MethodGet, "/enrollments/crud-1", nil).errorBody(t, http.StatusNotFound); got.ErrorCode != dps.CodeEnrollmentMissing {
		t.Errorf("errorCode %d", got.ErrorCode)
	}
	e.service(t, http.MethodDelete, "/enrollments/crud-1", nil).errorBody(t, http.StatusNotFound)
	if got := e.service(t, http.MethodGet, "/registrations/crud-1", nil).errorBody(t, http.StatusNotFound); got.ErrorCode != dps.CodeRegistrationGone {
		t.Errorf("errorCode %d", got.ErrorCode)
	}

	// Bad enrollments.
	for name, body := range map[string]string{
		"not JSON":         `{`,
		"other ID":         `{"registrationId":"other","attestation":{"type":"tpm","tpm":{"endorsementKey":"AAAA"}}}`,
		"no attestation":   `{"registrationId":"crud-2"}`,
		"EK not TPM":       `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"AAAA"}}}`,
		"unknown type":     `{"attestation":{"type":"magic"}}`,
		"bad status":       `{"attestation":{"type":"symmetricKey"},"provisioningStatus":"maybe"}`,
		"bad symmetricKey": `{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"!!"}}}`,
	} {
		t.Run(name, func(t *testing.T) {
			e.service(t, http.MethodPut, "/enrollments/crud-2", body).errorBody(t, http.StatusBadRequest)
		})
	}
	// Symmetric-key enrollments are stored, with generated keys.
	r = e.service(t, http.MethodPut, "/enrollments/sym-1", `{"attestation":{"type":"SymmetricKey"}}`)
	var sym dps.IndividualEnrollment
	r.decode(t, &sym)
	if r.status != http.StatusOK || sym.Attestation.SymmetricKey == nil || sym.Attestation.SymmetricKey.PrimaryKey == "" {
		t.Errorf("symmetric key enrollment: %d %s", r.status, r.body)
	}
}

func TestRegistrationDelete(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{})
	dev := newSoftDevice(t, true)
	e.enroll(t, "reg-del", dev.ek)
	st := e.register(ctx, t, "reg-del", dev).final.RegistrationState
	r := e.service(t, http.MethodGet, "/registrations/reg-del", nil)
	var got dps.DeviceRegistrationState
	r.decode(t, &got)
	if r.status != http.StatusOK || got.ETag == "" || got.AssignedHub != st.AssignedHub {
		t.Fatalf("registration: %d %s", r.status, r.body)
	}
	e.service(t, http.MethodDelete, "/registrations/reg-del", nil, "If-Match", `"nope"`).errorBody(t, http.StatusPreconditionFailed)
	if r := e.service(t, http.MethodDelete, "/registrations/reg-del", nil, "If-Match", got.ETag); r.status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	if _, err := e.srv.HubDevice(ctx, st.AssignedHub, "reg-del"); err == nil {
		t.Error("the hub still knows a device whose registration was deleted")
	}
	// The enrollment stays.
	if r := e.service(t, http.MethodGet, "/enrollments/reg-del", nil); r.status != http.StatusOK {
		t.Errorf("enrollment after registration delete: %d", r.status)
	}
}

func TestRestartKeepsState(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{})
	dev := newSoftDevice(t, true)
	en := e.enroll(t, "keep-1", dev.ek)
	st := e.register(ctx, t, "keep-1", dev).final.RegistrationState
	scope, cs := e.srv.IDScope(), e.srv.ServiceConnectionString()

	// The data key is private and the database holds no key in clear.
	info, err := os.Stat(filepath.Join(e.cfg.DataDir, "devserver.key"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("devserver.key: %v %v", info.Mode(), err)
	}

	e2 := e.restart(t)
	if e2.srv.IDScope() != scope {
		t.Errorf("ID scope %s after restart, was %s", e2.srv.IDScope(), scope)
	}
	csAfter, _ := dps.ParseConnectionString(e2.srv.ServiceConnectionString())
	csBefore, _ := dps.ParseConnectionString(cs)
	if string(csAfter.Key) != string(csBefore.Key) {
		t.Error("the service key changed across a restart")
	}
	r := e2.service(t, http.MethodGet, "/enrollments/keep-1", nil)
	var got dps.IndividualEnrollment
	r.decode(t, &got)
	if r.status != http.StatusOK || got.ETag != en.ETag || got.RegistrationState == nil || got.RegistrationState.AssignedHub != st.AssignedHub {
		t.Errorf("enrollment after restart: %d %s", r.status, r.body)
	}
	hd, err := e2.srv.HubDevice(ctx, st.AssignedHub, "keep-1")
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := dev.sign(ctx, []byte("x"))
	if !hmacEqual(hd.PrimaryKey, sig, []byte("x")) {
		t.Error("the hub device key changed across a restart")
	}
	// The device registers again after the restart.
	if again := e2.register(ctx, t, "keep-1", dev).final; again.Status != "assigned" || again.RegistrationState.AssignedHub != st.AssignedHub {
		t.Errorf("re-registration after restart: %+v", again)
	}
}
