package devserver_test

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

const testCertPEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"

func TestEnrollmentGroupCRUD(t *testing.T) {
	e := start(t, devserver.Config{})

	// Symmetric key: keys generated when absent.
	r := e.service(t, http.MethodPut, "/enrollmentGroups/grp-sym", `{"attestation":{"type":"SymmetricKey"},"iotHubs":["`+hub1+`"]}`)
	var created dps.EnrollmentGroup
	r.decode(t, &created)
	if r.status != http.StatusOK || created.EnrollmentGroupID != "grp-sym" || created.ETag == "" || r.header.Get("ETag") != created.ETag ||
		created.CreatedDateTimeUTC.IsZero() || created.LastUpdatedDateTimeUTC.IsZero() || created.ProvisioningStatus != "enabled" ||
		created.Attestation.Type != dps.AttestationSymmetricKey || created.Attestation.SymmetricKey == nil ||
		created.Attestation.SymmetricKey.PrimaryKey == "" || created.Attestation.SymmetricKey.SecondaryKey == "" ||
		created.Attestation.SymmetricKey.PrimaryKey == created.Attestation.SymmetricKey.SecondaryKey {
		t.Fatalf("create: %d %s", r.status, r.body)
	}

	// GET ignores the case of the ID and of the literal segment (Node sends
	// /enrollmentgroups/...).
	r = e.service(t, http.MethodGet, "/enrollmentgroups/GRP-SYM", nil)
	var read dps.EnrollmentGroup
	r.decode(t, &read)
	if r.status != http.StatusOK || read.ETag != created.ETag || read.Attestation.SymmetricKey.PrimaryKey != created.Attestation.SymmetricKey.PrimaryKey ||
		!slices.Equal(read.IoTHubs, []string{hub1}) {
		t.Fatalf("read: %d %s", r.status, r.body)
	}
	r = e.service(t, http.MethodPost, "/enrollmentgroups/grp-sym/attestationmechanism", nil)
	var am dps.AttestationMechanism
	r.decode(t, &am)
	if r.status != http.StatusOK || am.SymmetricKey == nil || am.SymmetricKey.SecondaryKey != created.Attestation.SymmetricKey.SecondaryKey {
		t.Errorf("attestationmechanism: %d %s", r.status, r.body)
	}

	// If-Match: a stale etag in the header or the body is 412; the current one updates.
	upd := read
	upd.ProvisioningStatus = "Disabled"
	e.service(t, http.MethodPut, "/enrollmentGroups/grp-sym", upd, "If-Match", `"stale"`).errorBody(t, http.StatusPreconditionFailed)
	upd.ETag = `"stale"`
	if got := e.service(t, http.MethodPut, "/enrollmentGroups/grp-sym", upd).errorBody(t, http.StatusPreconditionFailed); got.ErrorCode != dps.CodePrecondition {
		t.Errorf("errorCode %d", got.ErrorCode)
	}
	upd.ETag = created.ETag
	r = e.service(t, http.MethodPut, "/enrollmentGroups/grp-sym", upd)
	var updated dps.EnrollmentGroup
	r.decode(t, &updated)
	if r.status != http.StatusOK || updated.ETag == created.ETag || updated.ProvisioningStatus != "disabled" ||
		!updated.CreatedDateTimeUTC.Equal(created.CreatedDateTimeUTC.Time) ||
		updated.Attestation.SymmetricKey.PrimaryKey != created.Attestation.SymmetricKey.PrimaryKey {
		t.Errorf("update: %d %s", r.status, r.body)
	}

	// X.509: signing certificates and CA references are stored as given.
	x := dps.EnrollmentGroup{Attestation: dps.AttestationMechanism{Type: "X509", X509: &dps.X509Attestation{
		SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: testCertPEM}},
	}}}
	r = e.service(t, http.MethodPut, "/enrollmentGroups/grp-x509", x)
	var gx dps.EnrollmentGroup
	r.decode(t, &gx)
	if r.status != http.StatusOK || gx.Attestation.Type != dps.AttestationX509 || gx.Attestation.X509.SigningCertificates.Primary.Certificate != testCertPEM {
		t.Errorf("x509 group: %d %s", r.status, r.body)
	}
	r = e.service(t, http.MethodPut, "/enrollmentGroups/grp-ca", `{"attestation":{"type":"x509","x509":{"caReferences":{"primary":"line-ca"}}}}`)
	if r.status != http.StatusOK || !strings.Contains(string(r.body), `"caReferences":{"primary":"line-ca"}`) {
		t.Errorf("caReferences group: %d %s", r.status, r.body)
	}

	// Bad groups.
	for name, body := range map[string]string{
		"not JSON":            `{`,
		"other ID":            `{"enrollmentGroupId":"other","attestation":{"type":"symmetricKey"}}`,
		"no attestation":      `{}`,
		"tpm":                 `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"AAAA"}}}`,
		"x509 without certs":  `{"attestation":{"type":"x509","x509":{}}}`,
		"x509 client certs":   `{"attestation":{"type":"x509","x509":{"clientCertificates":{"primary":{"certificate":"x"}}}}}`,
		"bad symmetric key":   `{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"!!"}}}`,
		"bad status":          `{"attestation":{"type":"symmetricKey"},"provisioningStatus":"maybe"}`,
		"static without hubs": `{"attestation":{"type":"symmetricKey"},"allocationPolicy":"static"}`,
	} {
		t.Run(name, func(t *testing.T) {
			e.service(t, http.MethodPut, "/enrollmentGroups/grp-bad", body).errorBody(t, http.StatusBadRequest)
		})
	}
	e.service(t, http.MethodGet, "/enrollmentGroups/grp-bad", nil).errorBody(t, http.StatusNotFound)

	// DELETE with a stale If-Match is 412, then the group goes.
	e.service(t, http.MethodDelete, "/enrollmentGroups/grp-sym", nil, "If-Match", created.ETag).errorBody(t, http.StatusPreconditionFailed)
	if r := e.service(t, http.MethodDelete, "/enrollmentGroups/grp-sym", nil, "If-Match", updated.ETag); r.status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	e.service(t, http.MethodGet, "/enrollmentGroups/grp-sym", nil).errorBody(t, http.StatusNotFound)
	e.service(t, http.MethodDelete, "/enrollmentGroups/grp-sym", nil).errorBody(t, http.StatusNotFound)

	// Groups survive a restart.
	e2 := e.restart(t)
	if r := e2.service(t, http.MethodGet, "/enrollmentGroups/grp-x509", nil); r.status != http.StatusOK || !strings.Contains(string(r.body), "BEGIN CERTIFICATE") {
		t.Errorf("after restart: %d %s", r.status, r.body)
	}
}

func TestEnrollmentGroupLimit(t *testing.T) {
	e := start(t, devserver.Config{})
	// Fill the symmetric-key quota ten groups at a time.
	for b := range devserver.MaxSymmetricKeyGroups / 10 {
		var groups []dps.EnrollmentGroup
		for i := range 10 {
			groups = append(groups, dps.EnrollmentGroup{EnrollmentGroupID: fmt.Sprintf("sym-%03d", b*10+i),
				Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey}})
		}
		r := e.service(t, http.MethodPost, "/enrollmentGroups", dps.BulkEnrollmentGroupOperation{Mode: "create", EnrollmentGroups: groups})
		if r.status != http.StatusOK || !strings.Contains(string(r.body), `"isSuccessful":true`) {
			t.Fatalf("bulk %d: %d %s", b, r.status, r.body)
		}
	}
	over := e.service(t, http.MethodPut, "/enrollmentGroups/sym-over", `{"attestation":{"type":"symmetricKey"}}`).errorBody(t, http.StatusConflict)
	if over.ErrorCode != 409001 || !strings.Contains(over.Message, "limit") {
		t.Errorf("over the limit: %+v", over)
	}
	// An existing group can still be updated, and X.509 groups count apart.
	if r := e.service(t, http.MethodPut, "/enrollmentGroups/sym-000", `{"attestation":{"type":"symmetricKey"}}`); r.status != http.StatusOK {
		t.Errorf("update at the limit: %d %s", r.status, r.body)
	}
	if r := e.service(t, http.MethodPut, "/enrollmentGroups/x-1", `{"attestation":{"type":"x509","x509":{"caReferences":{"primary":"ca"}}}}`); r.status != http.StatusOK {
		t.Errorf("x509 group with the symmetric quota full: %d %s", r.status, r.body)
	}
	// After a delete there is room again.
	if r := e.service(t, http.MethodDelete, "/enrollmentGroups/sym-001", nil); r.status != http.StatusNoContent {
		t.Fatalf("delete: %d", r.status)
	}
	if r := e.service(t, http.MethodPut, "/enrollmentGroups/sym-over", `{"attestation":{"type":"symmetricKey"}}`); r.status != http.StatusOK {
		t.Errorf("after a delete: %d %s", r.status, r.body)
	}
}
