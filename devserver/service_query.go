package devserver

import (
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Paging of queries (§7.1).
const (
	// DefaultQueryPageSize is the page size of a query that sends no
	// x-ms-max-item-count.
	DefaultQueryPageSize = 100
	// MaxQueryPageSize is the largest page served; larger requests get it.
	MaxQueryPageSize = 1000
)

// Query targets: the table a query names and the x-ms-item-type of its
// answer.
const (
	queryEnrollments   = "enrollments"
	queryGroups        = "enrollmentGroups"
	queryRegistrations = "registrations"
)

var itemTypes = map[string]string{
	queryEnrollments:   "Enrollment",
	queryGroups:        "EnrollmentGroup",
	queryRegistrations: "DeviceRegistration",
}

// DecodeQuery reads a QuerySpecification body for a query of target
// ("enrollments", "enrollmentGroups" or "registrations"). Supported are
// "*" and "SELECT * FROM <target>" (case and spacing aside); anything else
// is refused. A registrations query may have no body (the spec has none).
// Kinds: Invalid.
func DecodeQuery(body []byte, target string) error {
	const op = "read query"
	var q dps.QuerySpecification
	if err := dps.Decode(body, &q); err != nil {
		return err
	}
	f := strings.Fields(q.Query)
	switch {
	case len(f) == 0 && target == queryRegistrations:
		return nil
	case len(f) == 0:
		return station.Errorf(op, station.KindInvalid, `the query specification has no query: send {"query":"*"}`)
	case len(f) == 1 && f[0] == "*":
		return nil
	case len(f) == 4 && strings.EqualFold(f[0], "select") && f[1] == "*" && strings.EqualFold(f[2], "from") &&
		strings.EqualFold(f[3], target):
		return nil
	}
	return station.Errorf(op, station.KindInvalid,
		"query %.100q is not supported by this provisioning service: use \"*\" or \"SELECT * FROM %s\" and filter on the client", q.Query, target)
}

// pageOf reads the paging headers of a query: the key to continue after
// ("" for the first page) and the page size. Kinds: Invalid.
func pageOf(r *http.Request) (after string, size int, err error) {
	const op = "read query paging"
	size = DefaultQueryPageSize
	if v := strings.TrimSpace(r.Header.Get("x-ms-max-item-count")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return "", 0, station.Errorf(op, station.KindInvalid, "x-ms-max-item-count %.20q: send a positive number of items", v)
		}
		size = min(n, MaxQueryPageSize)
	}
	if v := r.Header.Get("x-ms-continuation"); v != "" {
		b, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil || len(b) == 0 {
			return "", 0, station.Errorf(op, station.KindInvalid,
				"x-ms-continuation %.40q is not a token of this service: send the value of the previous page's header", v)
		}
		after = string(b)
	}
	return after, size, nil
}

// serveQuery answers POST /enrollments/query, /enrollmentGroups/query and
// /registrations/{groupId}/query (also /enrollmentGroups/{id}/registrations/query):
// a page of items in ID order, with x-ms-continuation only when more pages
// follow (Node reads its presence as "more results").
func (s *Server) serveQuery(w http.ResponseWriter, r *http.Request, trackingID, target, groupID string) {
	ctx := r.Context()
	right := RightEnrollmentRead
	if target == queryRegistrations {
		right = RightRegistrationStatusRead
	}
	if err := s.authorize(r, right); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	b, err := readBody(r)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	if err := DecodeQuery(b, target); err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	after, size, err := pageOf(r)
	if err != nil {
		s.writeError(w, r, trackingID, err)
		return
	}
	// One more than a page tells whether another page follows.
	var page any
	var keys []string
	switch target {
	case queryEnrollments:
		items, err := s.db.listEnrollments(ctx, after, size+1)
		if err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		for i := range items {
			keys = append(keys, regKey(items[i].RegistrationID))
		}
		items = items[:min(len(items), size)]
		for i := range items {
			if reg, err := s.db.registration(ctx, items[i].RegistrationID); err == nil {
				items[i].RegistrationState = reg.state()
			}
		}
		page = items
	case queryGroups:
		items, err := s.db.listGroups(ctx, after, size+1)
		if err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		for _, g := range items {
			keys = append(keys, regKey(g.EnrollmentGroupID))
		}
		page = items[:min(len(items), size)]
	case queryRegistrations:
		if _, err := s.db.group(ctx, groupID); err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		items, err := s.db.listGroupRegistrations(ctx, groupID, after, size+1)
		if err != nil {
			s.writeError(w, r, trackingID, err)
			return
		}
		for _, st := range items {
			keys = append(keys, regKey(st.RegistrationID))
		}
		page = items[:min(len(items), size)]
	}
	h := w.Header()
	h.Set("x-ms-item-type", itemTypes[target])
	h.Set("x-ms-max-item-count", strconv.Itoa(size))
	if len(keys) > size {
		h.Set("x-ms-continuation", base64.RawURLEncoding.EncodeToString([]byte(keys[size-1])))
	}
	writeJSON(w, http.StatusOK, page)
}
