package dps

import (
	"context"
	"net/http"

	"github.com/kilnworks/kiln/station"
)

// MaxBulkItems is the most items one bulk operation may carry (§10).
const MaxBulkItems = 10

// BulkEnrollmentGroupOperation applies one mode to up to 10 enrollment
// groups (§7.2).
type BulkEnrollmentGroupOperation struct {
	Mode             string            `json:"mode"`
	EnrollmentGroups []EnrollmentGroup `json:"enrollmentGroups"`
}

// BulkEnrollmentGroupOperationResult is the answer to a bulk operation on
// groups: HTTP stays 200 and failures are listed per group.
type BulkEnrollmentGroupOperationResult struct {
	IsSuccessful bool                                `json:"isSuccessful"`
	Errors       []BulkEnrollmentGroupOperationError `json:"errors"`
}

// BulkEnrollmentGroupOperationError is one failed group of a bulk
// operation.
type BulkEnrollmentGroupOperationError struct {
	EnrollmentGroupID string `json:"enrollmentGroupId"`
	ErrorCode         int    `json:"errorCode"`
	ErrorStatus       string `json:"errorStatus"`
}

// BulkEnrollments applies mode (BulkCreate, BulkUpdate,
// BulkUpdateIfMatchETag or BulkDelete) to up to MaxBulkItems individual
// enrollments. A failed item does not fail the call: it is listed in the
// result's Errors. Kinds: Invalid (a bad mode, too many items),
// Unauthorized, Unavailable.
func (c *ServiceClient) BulkEnrollments(ctx context.Context, mode string, enrollments []IndividualEnrollment) (*BulkEnrollmentOperationResult, error) {
	const op = "bulk enrollment operation"
	if len(enrollments) > MaxBulkItems {
		return nil, station.Errorf(op, station.KindInvalid, "%d enrollments: send at most %d per operation", len(enrollments), MaxBulkItems)
	}
	var out BulkEnrollmentOperationResult
	in := BulkEnrollmentOperation{Mode: mode, Enrollments: enrollments}
	if err := c.do(ctx, op, http.MethodPost, "/enrollments", "", in, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// BulkEnrollmentGroups applies mode to up to MaxBulkItems enrollment
// groups, as BulkEnrollments does to enrollments. Kinds: Invalid,
// Unauthorized, Unavailable.
func (c *ServiceClient) BulkEnrollmentGroups(ctx context.Context, mode string, groups []EnrollmentGroup) (*BulkEnrollmentGroupOperationResult, error) {
	const op = "bulk enrollment group operation"
	if len(groups) > MaxBulkItems {
		return nil, station.Errorf(op, station.KindInvalid, "%d enrollment groups: send at most %d per operation", len(groups), MaxBulkItems)
	}
	var out BulkEnrollmentGroupOperationResult
	in := BulkEnrollmentGroupOperation{Mode: mode, EnrollmentGroups: groups}
	if err := c.do(ctx, op, http.MethodPost, "/enrollmentGroups", "", in, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
