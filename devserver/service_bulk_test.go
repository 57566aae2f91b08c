package devserver_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

func symEnrollment(id string) dps.IndividualEnrollment {
	return dps.IndividualEnrollment{RegistrationID: id, Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}}
}

func bulk(t *testing.T, e *env, path string, body any) dps.BulkEnrollmentOperationResult {
	t.Helper()
	r := e.service(t, http.MethodPost, path, body)
	if r.status != http.StatusOK {
		t.Fatalf("bulk: %d %s", r.status, r.body)
	}
	if !strings.Contains(string(r.body), `"errors":[`) {
		t.Errorf("bulk answer without an errors array: %s", r.body)
	}
	var res dps.BulkEnrollmentOperationResult
	r.decode(t, &res)
	return res
}

func TestBulkEnrollments(t *testing.T) {
	e := start(t, devserver.Config{})
	e.service(t, http.MethodPut, "/enrollments/bulk-03", symEnrollment("bulk-03")) // exists before: create fails for it

	// Create 10: one invalid, one existing; the rest are created.
	var items []dps.IndividualEnrollment
	for i := range 10 {
		items = append(items, symEnrollment(fmt.Sprintf("bulk-%02d", i)))
	}
	items[5].Attestation.Type = "magic"
	res := bulk(t, e, "/enrollments", dps.BulkEnrollmentOperation{Mode: "create", Enrollments: items})
	want := map[string]int{"bulk-05": dps.CodeBadRequest, "bulk-03": dps.CodeConflict}
	if res.IsSuccessful || len(res.Errors) != len(want) {
		t.Fatalf("create: %+v", res)
	}
	for _, er := range res.Errors {
		if want[er.RegistrationID] != er.ErrorCode || er.ErrorStatus == "" {
			t.Errorf("item error %+v, want code %d", er, want[er.RegistrationID])
		}
	}
	etags := map[string]string{}
	for i := range 10 {
		id := fmt.Sprintf("bulk-%02d", i)
		r := e.service(t, http.MethodGet, "/enrollments/"+id, nil)
		if i == 5 {
			if r.status != http.StatusNotFound {
				t.Errorf("the invalid item was stored: %d", r.status)
			}
			continue
		}
		var got dps.IndividualEnrollment
		r.decode(t, &got)
		if r.status != http.StatusOK || got.Attestation.SymmetricKey == nil || got.Attestation.SymmetricKey.PrimaryKey == "" {
			t.Errorf("%s: %d %s", id, r.status, r.body)
		}
		etags[id] = got.ETag
	}

	// A bulk of 11 is refused whole.
	eleven := append(items[:10:10], symEnrollment("bulk-10"))
	for i := range eleven {
		eleven[i].Attestation.Type = dps.AttestationSymmetricKey
	}
	r := e.service(t, http.MethodPost, "/enrollments", dps.BulkEnrollmentOperation{Mode: "update", Enrollments: eleven})
	if got := r.errorBody(t, http.StatusBadRequest); !strings.Contains(got.Message, "10") {
		t.Errorf("message %q does not name the limit", got.Message)
	}
	e.service(t, http.MethodGet, "/enrollments/bulk-10", nil).errorBody(t, http.StatusNotFound)

	// updateIfMatchEtag (Node's spelling): a stale etag fails that item only.
	a, b := symEnrollment("bulk-00"), symEnrollment("bulk-01")
	a.ETag, b.ETag = etags["bulk-00"], `"stale"`
	a.DeviceID, b.DeviceID = "dev-a", "dev-b"
	res = bulk(t, e, "/enrollments", map[string]any{"mode": "updateIfMatchEtag", "enrollments": []dps.IndividualEnrollment{a, b}})
	if res.IsSuccessful || len(res.Errors) != 1 || res.Errors[0].RegistrationID != "bulk-01" || res.Errors[0].ErrorCode != dps.CodePrecondition {
		t.Fatalf("updateIfMatchETag: %+v", res)
	}
	var got dps.IndividualEnrollment
	e.service(t, http.MethodGet, "/enrollments/bulk-00", nil).decode(t, &got)
	if got.DeviceID != "dev-a" || got.ETag == etags["bulk-00"] {
		t.Errorf("bulk-00 not updated: %+v", got)
	}
	var got1 dps.IndividualEnrollment
	e.service(t, http.MethodGet, "/enrollments/bulk-01", nil).decode(t, &got1)
	if got1.DeviceID != "" || got1.ETag != etags["bulk-01"] {
		t.Errorf("bulk-01 updated with a stale etag: %+v", got1)
	}

	// update upserts, ignoring etags.
	b.ETag = `"whatever"`
	if res := bulk(t, e, "/enrollments", dps.BulkEnrollmentOperation{Mode: "UPDATE", Enrollments: []dps.IndividualEnrollment{b, symEnrollment("bulk-new")}}); !res.IsSuccessful {
		t.Errorf("update: %+v", res)
	}
	if r := e.service(t, http.MethodGet, "/enrollments/bulk-new", nil); r.status != http.StatusOK {
		t.Errorf("bulk-new: %d", r.status)
	}

	// delete: the missing one fails, the others go.
	res = bulk(t, e, "/enrollments", dps.BulkEnrollmentOperation{Mode: "delete", Enrollments: []dps.IndividualEnrollment{
		{RegistrationID: "bulk-02"}, {RegistrationID: "bulk-05"}, {RegistrationID: "BULK-NEW"},
	}})
	if res.IsSuccessful || len(res.Errors) != 1 || res.Errors[0].RegistrationID != "bulk-05" || res.Errors[0].ErrorCode/1000 != 404 {
		t.Errorf("delete: %+v", res)
	}
	for _, id := range []string{"bulk-02", "bulk-new"} {
		e.service(t, http.MethodGet, "/enrollments/"+id, nil).errorBody(t, http.StatusNotFound)
	}

	// Whole-request errors.
	for name, body := range map[string]string{
		"no mode":     `{"enrollments":[{"registrationId":"x","attestation":{"type":"symmetricKey"}}]}`,
		"bad mode":    `{"mode":"upsert","enrollments":[{"registrationId":"x","attestation":{"type":"symmetricKey"}}]}`,
		"no items":    `{"mode":"create","enrollments":[]}`,
		"not objects": `{"mode":"create","enrollments":[1]}`,
		"not JSON":    `{"mode":`,
	} {
		t.Run(name, func(t *testing.T) {
			e.service(t, http.MethodPost, "/enrollments", body).errorBody(t, http.StatusBadRequest)
		})
	}
	// An item without an ID fails alone.
	res = bulk(t, e, "/enrollments", `{"mode":"create","enrollments":[{"attestation":{"type":"symmetricKey"}},{"registrationId":"bulk-ok","attestation":{"type":"symmetricKey"}}]}`)
	if res.IsSuccessful || len(res.Errors) != 1 || res.Errors[0].ErrorCode != dps.CodeBadRequest {
		t.Errorf("item without ID: %+v", res)
	}
	if r := e.service(t, http.MethodGet, "/enrollments/bulk-ok", nil); r.status != http.StatusOK {
		t.Errorf("bulk-ok: %d", r.status)
	}
}

func TestBulkEnrollmentGroups(t *testing.T) {
	e := start(t, devserver.Config{})
	groups := []dps.EnrollmentGroup{
		{EnrollmentGroupID: "g-1", Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}},
		{EnrollmentGroupID: "g-2", Attestation: dps.AttestationMechanism{Type: dps.AttestationTPM}},
		{EnrollmentGroupID: "g-3", Attestation: dps.AttestationMechanism{Type: dps.AttestationX509, X509: &dps.X509Attestation{CAReferences: &dps.X509CAReferences{Primary: "ca"}}}},
	}
	r := e.service(t, http.MethodPost, "/enrollmentgroups", dps.BulkEnrollmentGroupOperation{Mode: "create", EnrollmentGroups: groups})
	var res dps.BulkEnrollmentGroupOperationResult
	r.decode(t, &res)
	if r.status != http.StatusOK || res.IsSuccessful || len(res.Errors) != 1 || res.Errors[0].EnrollmentGroupID != "g-2" ||
		res.Errors[0].ErrorCode != dps.CodeBadRequest || strings.Contains(string(r.body), "registrationId") {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	var g1 dps.EnrollmentGroup
	e.service(t, http.MethodGet, "/enrollmentGroups/g-1", nil).decode(t, &g1)
	if g1.Attestation.SymmetricKey == nil || g1.Attestation.SymmetricKey.PrimaryKey == "" {
		t.Errorf("g-1: %+v", g1)
	}
	// updateIfMatchETag with a stale etag, then delete.
	g1.ETag = `"stale"`
	r = e.service(t, http.MethodPost, "/enrollmentGroups", dps.BulkEnrollmentGroupOperation{Mode: "updateIfMatchETag", EnrollmentGroups: []dps.EnrollmentGroup{g1}})
	r.decode(t, &res)
	if res.IsSuccessful || len(res.Errors) != 1 || res.Errors[0].ErrorCode != dps.CodePrecondition {
		t.Errorf("stale etag: %s", r.body)
	}
	r = e.service(t, http.MethodPost, "/enrollmentGroups", dps.BulkEnrollmentGroupOperation{Mode: "delete", EnrollmentGroups: []dps.EnrollmentGroup{{EnrollmentGroupID: "g-1"}, {EnrollmentGroupID: "g-3"}}})
	r.decode(t, &res)
	if r.status != http.StatusOK || !res.IsSuccessful || len(res.Errors) != 0 {
		t.Errorf("delete: %d %s", r.status, r.body)
	}
	e.service(t, http.MethodGet, "/enrollmentGroups/g-3", nil).errorBody(t, http.StatusNotFound)
	var eleven []dps.EnrollmentGroup
	for i := range 11 {
		eleven = append(eleven, dps.EnrollmentGroup{EnrollmentGroupID: fmt.Sprint("e-", i), Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}})
	}
	e.service(t, http.MethodPost, "/enrollmentGroups", dps.BulkEnrollmentGroupOperation{Mode: "create", EnrollmentGroups: eleven}).errorBody(t, http.StatusBadRequest)
	e.service(t, http.MethodGet, "/enrollmentGroups/e-0", nil).errorBody(t, http.StatusNotFound)
	// GET on the bulk path is not an operation.
	if r := e.service(t, http.MethodGet, "/enrollmentGroups", nil); r.status != http.StatusMethodNotAllowed {
		t.Errorf("GET /enrollmentGroups: %d", r.status)
	}
}

// The bulk limit is a quota: lower it and a bulk over it is refused; turn
// it off and a bulk of 11 goes through.
func TestBulkLimitQuota(t *testing.T) {
	for _, c := range []struct {
		max, n int
		ok     bool
	}{{3, 4, false}, {3, 3, true}, {-1, 11, true}} {
		e := start(t, devserver.Config{Quotas: devserver.Quotas{MaxBulkItems: c.max}})
		var items []dps.IndividualEnrollment
		for i := range c.n {
			items = append(items, symEnrollment(fmt.Sprintf("lim-%02d", i)))
		}
		r := e.service(t, http.MethodPost, "/enrollments", dps.BulkEnrollmentOperation{Mode: "create", Enrollments: items})
		if c.ok && r.status != http.StatusOK {
			t.Errorf("limit %d, bulk of %d: %d %s", c.max, c.n, r.status, r.body)
		}
		if !c.ok {
			if got := r.errorBody(t, http.StatusBadRequest); !strings.Contains(got.Message, "limit of 3") {
				t.Errorf("limit %d, bulk of %d: %q does not name the limit", c.max, c.n, got.Message)
			}
		}
	}
}
