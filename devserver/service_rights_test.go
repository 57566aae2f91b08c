package devserver_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

func TestServiceRights(t *testing.T) {
	keys := map[string][]byte{
		"owner":     []byte("owner key 0123456789abcdef"),
		"Reader":    []byte("reader key 0123456789abcdef"),
		"registrar": []byte("registrar key 0123456789abcdef"),
	}
	e := start(t, devserver.Config{ServiceKeys: keys, ServiceRights: map[string][]devserver.Right{
		"reader":    {devserver.RightEnrollmentRead},
		"registrar": {"registrationStatusRead", devserver.RightRegistrationStatusWrite},
	}})
	as := func(policy, method, path string, body any) *reply {
		t.Helper()
		k := keys[policy]
		if policy == "reader" {
			k = keys["Reader"]
		}
		tok := dps.NewServiceSAS(e.srv.Addr(), policy, k, time.Now().Add(time.Hour))
		return e.do(t, method, path+"?api-version=2021-10-01", tok, body)
	}
	sym := `{"attestation":{"type":"symmetricKey"}}`
	bulkBody := `{"mode":"create","enrollments":[{"registrationId":"r-2","attestation":{"type":"symmetricKey"}}]}`
	for _, tc := range []struct {
		policy, method, path string
		body                 any
		want                 int
	}{
		{"owner", http.MethodPut, "/enrollments/r-1", sym, http.StatusOK},
		{"owner", http.MethodPut, "/enrollmentGroups/g-1", sym, http.StatusOK},
		{"reader", http.MethodGet, "/enrollments/r-1", nil, http.StatusOK},
		{"reader", http.MethodGet, "/enrollmentGroups/g-1", nil, http.StatusOK},
		{"reader", http.MethodPost, "/enrollments/r-1/attestationmechanism", nil, http.StatusOK},
		{"reader", http.MethodPost, "/enrollments/query", `{"query":"*"}`, http.StatusOK},
		{"reader", http.MethodPost, "/enrollmentGroups/query", `{"query":"*"}`, http.StatusOK},
		{"reader", http.MethodPut, "/enrollments/r-1", sym, http.StatusUnauthorized},
		{"reader", http.MethodDelete, "/enrollments/r-1", nil, http.StatusUnauthorized},
		{"reader", http.MethodPut, "/enrollmentGroups/g-2", sym, http.StatusUnauthorized},
		{"reader", http.MethodPost, "/enrollments", bulkBody, http.StatusUnauthorized},
		{"reader", http.MethodGet, "/registrations/r-1", nil, http.StatusUnauthorized},
		{"reader", http.MethodPost, "/registrations/g-1/query", `{"query":"*"}`, http.StatusUnauthorized},
		{"registrar", http.MethodGet, "/enrollments/r-1", nil, http.StatusUnauthorized},
		{"registrar", http.MethodGet, "/registrations/r-1", nil, http.StatusNotFound},
		{"registrar", http.MethodDelete, "/registrations/r-1", nil, http.StatusNotFound},
		{"registrar", http.MethodPost, "/registrations/g-1/query", `{"query":"*"}`, http.StatusOK},
		{"owner", http.MethodPost, "/enrollments", bulkBody, http.StatusOK},
		{"owner", http.MethodDelete, "/enrollments/r-1", nil, http.StatusNoContent},
	} {
		r := as(tc.policy, tc.method, tc.path, tc.body)
		if r.status != tc.want {
			t.Errorf("%s %s %s: %d, want %d: %s", tc.policy, tc.method, tc.path, r.status, tc.want, r.body)
		}
		if tc.want == http.StatusUnauthorized {
			if got := r.errorBody(t, http.StatusUnauthorized); got.ErrorCode != dps.CodeUnauthorized {
				t.Errorf("errorCode %d", got.ErrorCode)
			}
		}
	}
	// The reader's refused PUT wrote nothing.
	if r := as("owner", http.MethodGet, "/enrollmentGroups/g-2", nil); r.status != http.StatusNotFound {
		t.Errorf("g-2 after a refused PUT: %d", r.status)
	}
}

func TestServiceRightsConfig(t *testing.T) {
	key := []byte("0123456789abcdef")
	for name, rights := range map[string]map[string][]devserver.Right{
		"unknown right":  {"owner": {"EnrollmentDelete"}},
		"unknown policy": {"other": {devserver.RightEnrollmentRead}},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := devserver.New(devserver.Config{DataDir: t.TempDir(), ServiceKeys: map[string][]byte{"owner": key}, ServiceRights: rights})
			if station.KindOf(err) != station.KindInvalid {
				t.Errorf("New: %v", err)
			}
		})
	}
	// The default policy can be restricted too.
	srv, err := devserver.New(devserver.Config{DataDir: t.TempDir(), ServiceRights: map[string][]devserver.Right{
		devserver.DefaultPolicy: {devserver.RightEnrollmentRead},
	}})
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
}
