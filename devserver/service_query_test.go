package devserver_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// queryAll pages through a query and returns the pages' IDs.
func queryAll(t *testing.T, e *env, path, query string, size int, id func(*reply) []string) [][]string {
	t.Helper()
	var pages [][]string
	cont := ""
	for range 20 {
		hdr := []string{"x-ms-max-item-count", fmt.Sprint(size)}
		if cont != "" {
			hdr = append(hdr, "x-ms-continuation", cont)
		}
		r := e.service(t, http.MethodPost, path, dps.QuerySpecification{Query: query}, hdr...)
		if r.status != http.StatusOK {
			t.Fatalf("query: %d %s", r.status, r.body)
		}
		if got := r.header.Get("x-ms-max-item-count"); got != fmt.Sprint(size) {
			t.Errorf("x-ms-max-item-count %q", got)
		}
		pages = append(pages, id(r))
		_, more := r.header["X-Ms-Continuation"]
		if !more {
			return pages
		}
		if cont = r.header.Get("x-ms-continuation"); cont == "" {
			t.Fatal("an empty x-ms-continuation header")
		}
	}
	t.Fatal("the query does not end")
	return nil
}

func enrollmentIDs(t *testing.T) func(*reply) []string {
	return func(r *reply) []string {
		if got := r.header.Get("x-ms-item-type"); got != "Enrollment" {
			t.Errorf("x-ms-item-type %q", got)
		}
		var es []dps.IndividualEnrollment
		r.decode(t, &es)
		var ids []string
		for _, e := range es {
			ids = append(ids, e.RegistrationID)
		}
		return ids
	}
}

func TestQueryEnrollmentsPaging(t *testing.T) {
	e := start(t, devserver.Config{})
	var want []string
	// Created out of order, in bulks of 10.
	for b := range 3 {
		var items []dps.IndividualEnrollment
		for i := range 10 {
			n := (b*10 + i) * 7 % 30
			if n >= 25 {
				continue
			}
			id := fmt.Sprintf("q-%02d", n)
			want = append(want, id)
			items = append(items, symEnrollment(id))
		}
		if res := bulk(t, e, "/enrollments", dps.BulkEnrollmentOperation{Mode: "create", Enrollments: items}); !res.IsSuccessful {
			t.Fatalf("bulk: %+v", res)
		}
	}
	slices.Sort(want)
	if len(want) != 25 {
		t.Fatalf("%d enrollments", len(want))
	}
	for _, q := range []string{"*", "select *  FROM Enrollments"} {
		pages := queryAll(t, e, "/enrollments/query", q, 10, enrollmentIDs(t))
		if len(pages) != 3 || len(pages[0]) != 10 || len(pages[1]) != 10 || len(pages[2]) != 5 {
			t.Fatalf("query %q: pages %v", q, pages)
		}
		if got := slices.Concat(pages...); !slices.Equal(got, want) {
			t.Errorf("query %q: ids %v, want %v", q, got, want)
		}
	}
	// An exact multiple of the page size has no empty last page.
	if pages := queryAll(t, e, "/ENROLLMENTS/query", "*", 5, enrollmentIDs(t)); len(pages) != 5 || len(pages[4]) != 5 {
		t.Errorf("pages of 5: %v", pages)
	}
	// Without x-ms-max-item-count, one page holds all.
	r := e.service(t, http.MethodPost, "/enrollments/query", `{"query":"*"}`)
	if _, more := r.header["X-Ms-Continuation"]; r.status != http.StatusOK || more || len(enrollmentIDs(t)(r)) != 25 {
		t.Errorf("default page: %d %v", r.status, r.header)
	}

	// Refused queries and paging headers.
	for name, tc := range map[string]struct {
		body string
		hdr  []string
	}{
		"where clause":        {`{"query":"SELECT * FROM enrollments WHERE registrationId = 'q-01'"}`, nil},
		"other table":         {`{"query":"SELECT * FROM enrollmentGroups"}`, nil},
		"no query":            {`{}`, nil},
		"not JSON":            {`{"query":`, nil},
		"zero page":           {`{"query":"*"}`, []string{"x-ms-max-item-count", "0"}},
		"bad page":            {`{"query":"*"}`, []string{"x-ms-max-item-count", "ten"}},
		"forged continuation": {`{"query":"*"}`, []string{"x-ms-continuation", "!!!"}},
	} {
		t.Run(name, func(t *testing.T) {
			e.service(t, http.MethodPost, "/enrollments/query", tc.body, tc.hdr...).errorBody(t, http.StatusBadRequest)
		})
	}
}

func TestQueryEnrollmentGroups(t *testing.T) {
	e := start(t, devserver.Config{})
	var want []string
	for i := range 12 {
		id := fmt.Sprintf("grp-%02d", 11-i)
		want = append(want, id)
		if r := e.service(t, http.MethodPut, "/enrollmentGroups/"+id, `{"attestation":{"type":"symmetricKey"}}`); r.status != http.StatusOK {
			t.Fatalf("%s: %d", id, r.status)
		}
	}
	slices.Sort(want)
	pages := queryAll(t, e, "/enrollmentgroups/query", "*", 5, func(r *reply) []string {
		if got := r.header.Get("x-ms-item-type"); got != "EnrollmentGroup" {
			t.Errorf("x-ms-item-type %q", got)
		}
		var gs []dps.EnrollmentGroup
		r.decode(t, &gs)
		var ids []string
		for _, g := range gs {
			if g.ETag == "" || g.Attestation.SymmetricKey == nil {
				t.Errorf("group %+v", g)
			}
			ids = append(ids, g.EnrollmentGroupID)
		}
		return ids
	})
	if len(pages) != 3 || !slices.Equal(slices.Concat(pages...), want) {
		t.Errorf("pages %v", pages)
	}

	// Registrations of a group: none yet, through either path; an unknown
	// group is 404.
	for _, path := range []string{"/registrations/grp-01/query", "/enrollmentGroups/GRP-01/registrations/query"} {
		r := e.service(t, http.MethodPost, path, `{"query":"*"}`)
		if r.status != http.StatusOK || string(r.body) != "[]" || r.header.Get("x-ms-item-type") != "DeviceRegistration" {
			t.Errorf("%s: %d %s %v", path, r.status, r.body, r.header)
		}
	}
	if r := e.service(t, http.MethodPost, "/registrations/grp-01/query", nil); r.status != http.StatusOK {
		t.Errorf("registrations query without a body: %d %s", r.status, r.body)
	}
	e.service(t, http.MethodPost, "/registrations/nobody/query", `{"query":"*"}`).errorBody(t, http.StatusNotFound)
	// An empty service answers [] (not null).
	e2 := start(t, devserver.Config{})
	if r := e2.service(t, http.MethodPost, "/enrollmentGroups/query", `{"query":"*"}`); r.status != http.StatusOK || string(r.body) != "[]" {
		t.Errorf("empty: %d %s", r.status, r.body)
	}
}
