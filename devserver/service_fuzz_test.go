package devserver_test

import (
	"strings"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// FuzzDecodeEnrollmentGroup feeds enrollment group bodies (seeds in
// testdata/fuzz): no panic, KindInvalid only, and an accepted group is for
// the URL's ID with symmetricKey or x509 attestation.
func FuzzDecodeEnrollmentGroup(f *testing.F) {
	f.Add([]byte(`{"enrollmentGroupId":"grp-1","attestation":{"type":"symmetricKey","symmetricKey":{}},"etag":"\"abc\""}`), "grp-1")
	f.Add([]byte(`{"attestation":{"type":"x509","x509":{"caReferences":{"primary":"ca"}}}}`), "grp-1")
	f.Add([]byte(`{"attestation":{"type":"x509","x509":{"signingCertificates":{"primary":{"certificate":"MIIB"}}}}}`), "g")
	f.Add([]byte(`{"attestation":{"type":"tpm"}}`), "g")
	f.Add([]byte(``), "g")
	f.Fuzz(func(t *testing.T, body []byte, id string) {
		g, err := devserver.DecodeEnrollmentGroup(body, id)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		if !strings.EqualFold(g.EnrollmentGroupID, id) {
			t.Fatalf("accepted group %q for URL %q", g.EnrollmentGroupID, id)
		}
		switch g.Attestation.Type {
		case dps.AttestationSymmetricKey:
			if g.Attestation.SymmetricKey == nil {
				t.Fatal("symmetricKey group without symmetricKey")
			}
		case dps.AttestationX509:
			if x := g.Attestation.X509; x == nil || x.SigningCertificates == nil && x.CAReferences == nil {
				t.Fatal("x509 group without certificates")
			}
		default:
			t.Fatalf("accepted attestation type %q", g.Attestation.Type)
		}
		if g.ProvisioningStatus != dps.ProvisioningEnabled && g.ProvisioningStatus != dps.ProvisioningDisabled {
			t.Fatalf("provisioningStatus %q", g.ProvisioningStatus)
		}
	})
}

// FuzzDecodeBulkOperation feeds bulk operation bodies: no panic,
// KindInvalid only, and an accepted one has a canonical mode and 1 to 10
// object items.
func FuzzDecodeBulkOperation(f *testing.F) {
	f.Add([]byte(`{"mode":"create","enrollments":[{"registrationId":"a","attestation":{"type":"symmetricKey"}}]}`), false)
	f.Add([]byte(`{"mode":"updateIfMatchEtag","enrollmentGroups":[{"enrollmentGroupId":"g","etag":"x"}]}`), true)
	f.Add([]byte(`{"mode":"delete","enrollments":[{},{},{},{},{},{},{},{},{},{},{}]}`), false)
	f.Add([]byte(`{"mode":"delete","enrollments":[null]}`), false)
	f.Fuzz(func(t *testing.T, body []byte, groups bool) {
		mode, items, err := devserver.DecodeBulkOperation(body, groups)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		switch mode {
		case dps.BulkCreate, dps.BulkUpdate, dps.BulkUpdateIfMatchETag, dps.BulkDelete:
		default:
			t.Fatalf("mode %q", mode)
		}
		if len(items) == 0 || len(items) > dps.MaxBulkItems {
			t.Fatalf("%d items", len(items))
		}
		for _, it := range items {
			if s := strings.TrimSpace(string(it)); s == "" || s[0] != '{' {
				t.Fatalf("item %s", it)
			}
		}
	})
}

// FuzzDecodeQuery feeds query specifications: no panic, KindInvalid only,
// and only "*" or SELECT * FROM the target is accepted.
func FuzzDecodeQuery(f *testing.F) {
	f.Add([]byte(`{"query":"*"}`), "enrollments")
	f.Add([]byte(`{"query":"SELECT * FROM enrollmentGroups"}`), "enrollmentGroups")
	f.Add([]byte(`{"query":"SELECT * FROM enrollments WHERE x = 1"}`), "enrollments")
	f.Add([]byte(``), "registrations")
	f.Fuzz(func(t *testing.T, body []byte, target string) {
		err := devserver.DecodeQuery(body, target)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		var q dps.QuerySpecification
		_ = dps.Decode(body, &q)
		f := strings.Fields(q.Query)
		ok := len(f) == 0 && target == "registrations" || len(f) == 1 && f[0] == "*" ||
			len(f) == 4 && strings.EqualFold(f[3], target) && strings.EqualFold(f[0], "select")
		if !ok {
			t.Fatalf("accepted query %q for %q", q.Query, target)
		}
	})
}
