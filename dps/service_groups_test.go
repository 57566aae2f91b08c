package dps_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

func TestServiceClientEnrollmentGroups(t *testing.T) {
	c, _, _ := serviceEnv(t)
	ctx := t.Context()
	in := &dps.EnrollmentGroup{EnrollmentGroupID: "line-1", Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}}
	g, err := c.PutEnrollmentGroup(ctx, in, "")
	if err != nil {
		t.Fatal(err)
	}
	if g.ETag == "" || g.Attestation.SymmetricKey == nil || g.Attestation.SymmetricKey.PrimaryKey == "" || g.CreatedDateTimeUTC.IsZero() {
		t.Fatalf("put: %+v", g)
	}
	got, err := c.GetEnrollmentGroup(ctx, "LINE-1")
	if err != nil || got.ETag != g.ETag || got.EnrollmentGroupID != "line-1" {
		t.Fatalf("get: %+v %v", got, err)
	}
	am, err := c.EnrollmentGroupAttestation(ctx, "line-1")
	if err != nil || am.SymmetricKey == nil || am.SymmetricKey.PrimaryKey != g.Attestation.SymmetricKey.PrimaryKey {
		t.Errorf("attestation: %+v %v", am, err)
	}
	got.ProvisioningStatus = dps.ProvisioningDisabled
	got.ETag = ""
	if _, err := c.PutEnrollmentGroup(ctx, got, `"stale"`); station.KindOf(err) != station.KindConflict {
		t.Errorf("stale If-Match: %v", err)
	}
	upd, err := c.PutEnrollmentGroup(ctx, got, g.ETag)
	if err != nil || upd.ProvisioningStatus != dps.ProvisioningDisabled || upd.ETag == g.ETag {
		t.Fatalf("update: %+v %v", upd, err)
	}
	if err := c.DeleteEnrollmentGroup(ctx, "line-1", g.ETag); station.KindOf(err) != station.KindConflict {
		t.Errorf("delete with a stale etag: %v", err)
	}
	if err := c.DeleteEnrollmentGroup(ctx, "line-1", upd.ETag); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetEnrollmentGroup(ctx, "line-1"); station.KindOf(err) != station.KindNotFound {
		t.Errorf("get after delete: %v", err)
	}
}

func TestServiceClientBulkAndQuery(t *testing.T) {
	c, _, _ := serviceEnv(t)
	ctx := t.Context()
	var want []string
	for b := range 3 {
		var batch []dps.IndividualEnrollment
		for i := range 8 {
			id := fmt.Sprintf("unit-%02d", b*8+i)
			want = append(want, id)
			batch = append(batch, dps.IndividualEnrollment{RegistrationID: id, Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}})
		}
		res, err := c.BulkEnrollments(ctx, dps.BulkCreate, batch)
		if err != nil || !res.IsSuccessful || len(res.Errors) != 0 {
			t.Fatalf("bulk: %+v %v", res, err)
		}
	}
	// Creating one again fails for that item only.
	res, err := c.BulkEnrollments(ctx, dps.BulkCreate, []dps.IndividualEnrollment{
		{RegistrationID: "unit-00", Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}},
	})
	if err != nil || res.IsSuccessful || len(res.Errors) != 1 || res.Errors[0].RegistrationID != "unit-00" || res.Errors[0].ErrorCode != dps.CodeConflict {
		t.Errorf("create again: %+v %v", res, err)
	}
	if _, err := c.BulkEnrollments(ctx, dps.BulkDelete, make([]dps.IndividualEnrollment, 11)); station.KindOf(err) != station.KindInvalid {
		t.Errorf("11 items: %v", err)
	}

	var ids []string
	pages := 0
	for p := (dps.QueryPage{Size: 10}); ; {
		es, next, err := c.QueryEnrollments(ctx, "*", p)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, e := range es {
			ids = append(ids, e.RegistrationID)
		}
		if next == "" {
			break
		}
		p.Continuation = next
	}
	if pages != 3 || !slices.Equal(ids, want) {
		t.Errorf("%d pages, ids %v", pages, ids)
	}
	if _, _, err := c.QueryEnrollments(ctx, "SELECT deviceId FROM enrollments", dps.QueryPage{}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("unsupported query: %v", err)
	}

	// Groups: bulk, query, registrations of a group.
	gres, err := c.BulkEnrollmentGroups(ctx, dps.BulkCreate, []dps.EnrollmentGroup{
		{EnrollmentGroupID: "g-a", Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}},
		{EnrollmentGroupID: "g-b", Attestation: dps.AttestationMechanism{Type: dps.AttestationX509}},
	})
	if err != nil || gres.IsSuccessful || len(gres.Errors) != 1 || gres.Errors[0].EnrollmentGroupID != "g-b" {
		t.Fatalf("bulk groups: %+v %v", gres, err)
	}
	gs, next, err := c.QueryEnrollmentGroups(ctx, "*", dps.QueryPage{})
	if err != nil || next != "" || len(gs) != 1 || gs[0].EnrollmentGroupID != "g-a" {
		t.Errorf("query groups: %+v %q %v", gs, next, err)
	}
	regs, next, err := c.QueryGroupRegistrations(ctx, "g-a", dps.QueryPage{Size: 5})
	if err != nil || next != "" || len(regs) != 0 {
		t.Errorf("group registrations: %+v %q %v", regs, next, err)
	}
	if _, _, err := c.QueryGroupRegistrations(ctx, "g-missing", dps.QueryPage{}); station.KindOf(err) != station.KindNotFound {
		t.Errorf("registrations of a missing group: %v", err)
	}
}
