package dps

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
)

// PutEnrollmentGroup creates or replaces an enrollment group. ifMatch, when
// set, makes the write conditional on the group's current ETag. Kinds:
// Invalid, Unauthorized, Conflict (ETag mismatch, group limit),
// Unavailable.
func (c *ServiceClient) PutEnrollmentGroup(ctx context.Context, g *EnrollmentGroup, ifMatch string) (*EnrollmentGroup, error) {
	var out EnrollmentGroup
	if err := c.do(ctx, "put enrollment group", http.MethodPut, "/enrollmentGroups/"+url.PathEscape(g.EnrollmentGroupID), ifMatch, g, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// GetEnrollmentGroup returns an enrollment group. Kinds: NotFound,
// Unauthorized, Unavailable.
func (c *ServiceClient) GetEnrollmentGroup(ctx context.Context, groupID string) (*EnrollmentGroup, error) {
	var out EnrollmentGroup
	if err := c.do(ctx, "get enrollment group", http.MethodGet, "/enrollmentGroups/"+url.PathEscape(groupID), "", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// DeleteEnrollmentGroup deletes an enrollment group. Kinds: NotFound,
// Conflict (ETag mismatch), Unauthorized, Unavailable.
func (c *ServiceClient) DeleteEnrollmentGroup(ctx context.Context, groupID, ifMatch string) error {
	return c.do(ctx, "delete enrollment group", http.MethodDelete, "/enrollmentGroups/"+url.PathEscape(groupID), ifMatch, nil, nil)
}

// EnrollmentGroupAttestation returns a group's attestation mechanism,
// keys included. Kinds: NotFound, Unauthorized, Unavailable.
func (c *ServiceClient) EnrollmentGroupAttestation(ctx context.Context, groupID string) (*AttestationMechanism, error) {
	var out AttestationMechanism
	if err := c.do(ctx, "get enrollment group attestation", http.MethodPost,
		"/enrollmentGroups/"+url.PathEscape(groupID)+"/attestationmechanism", "", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// QueryPage selects a page of a query: up to Size items (0: the service's
// default) after the page whose Continuation this is ("" for the first).
type QueryPage struct {
	Size         int
	Continuation string
}

// QueryEnrollments returns one page of the individual enrollments matched
// by query ("*" selects all) and the continuation of the next page, ""
// after the last. Kinds: Invalid, Unauthorized, Unavailable.
func (c *ServiceClient) QueryEnrollments(ctx context.Context, query string, p QueryPage) ([]IndividualEnrollment, string, error) {
	var out []IndividualEnrollment
	next, err := c.query(ctx, "query enrollments", "/enrollments/query", query, p, &out)
	return out, next, err
}

// QueryEnrollmentGroups returns one page of the enrollment groups matched
// by query, as QueryEnrollments does. Kinds: Invalid, Unauthorized,
// Unavailable.
func (c *ServiceClient) QueryEnrollmentGroups(ctx context.Context, query string, p QueryPage) ([]EnrollmentGroup, string, error) {
	var out []EnrollmentGroup
	next, err := c.query(ctx, "query enrollment groups", "/enrollmentGroups/query", query, p, &out)
	return out, next, err
}

// QueryGroupRegistrations returns one page of the registration states of
// the devices that registered through an enrollment group. Kinds:
// NotFound (no such group), Invalid, Unauthorized, Unavailable.
func (c *ServiceClient) QueryGroupRegistrations(ctx context.Context, groupID string, p QueryPage) ([]DeviceRegistrationState, string, error) {
	var out []DeviceRegistrationState
	next, err := c.query(ctx, "query group registrations", "/registrations/"+url.PathEscape(groupID)+"/query", "*", p, &out)
	return out, next, err
}

func (c *ServiceClient) query(ctx context.Context, op, path, query string, p QueryPage, out any) (string, error) {
	hdr := http.Header{}
	if p.Size > 0 {
		hdr.Set("x-ms-max-item-count", strconv.Itoa(p.Size))
	}
	if p.Continuation != "" {
		hdr.Set("x-ms-continuation", p.Continuation)
	}
	h, err := c.exchange(ctx, op, http.MethodPost, path, hdr, QuerySpecification{Query: query}, out)
	if err != nil {
		return "", err
	}
	return h.Get("x-ms-continuation"), nil
}
