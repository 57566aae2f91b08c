package cloudsync_test

import (
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

func x509Group(id string, ca *testCert) *cloudsync.Group {
	return &cloudsync.Group{ID: id, Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: cloudsync.CertificatePEM(ca.cert.Raw)}}}}}
}

// A batch of every method, pushed with --per-unit: each group-method unit
// goes through the group its record names, or the first of its method;
// X.509 units are enrolled with their recorded leaf, symmetric-key units
// with the key derived from their group's, checked against the key the
// unit holds; the units that cannot be enrolled fail on their own.
func TestPushGroupsPerUnit(t *testing.T) {
	d := startQuotaTarget(t, 6000)
	s := openStation(t, t.TempDir())
	tg := s.addTarget(t, d, d.conn)
	ctx := t.Context()
	lineCA, otherCA := newCert(t, "Line CA", nil, true), newCert(t, "Other CA", nil, true)
	gk := make([]byte, 32)
	rand.Read(gk)
	skGroup := &cloudsync.Group{ID: "line-sk", Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
		SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(gk)}}}
	x1, x2 := newCert(t, "x-1", lineCA, false), newCert(t, "x-2", otherCA, false)
	units := []*station.Unit{
		{Serial: "X1", RegistrationID: "x-1", Method: station.MethodX509, Certificate: x1.cert.Raw},
		{Serial: "X2", RegistrationID: "x-2", Method: station.MethodX509, Certificate: x2.cert.Raw, EnrollmentGroup: "other-x509"},
		{Serial: "X3", RegistrationID: "x-3", Method: station.MethodX509}, // imported: no certificate of its own
		{Serial: "S1", RegistrationID: "s-1", Method: station.MethodSymKey, EnrollmentGroup: "line-sk",
			SymKeySHA256: station.KeyFingerprint(dps.DeriveDeviceKey(gk, "s-1"))},
		{Serial: "S2", RegistrationID: "s-2", Method: station.MethodSymKey, EnrollmentGroup: "line-sk",
			SymKeySHA256: station.KeyFingerprint([]byte("a key from another group"))},
	}
	ek := fakeEK(t)
	units = append(units, &station.Unit{Serial: "T1", RegistrationID: station.RegistrationIDFromEK(ek), Method: station.MethodTPM, EKHash: station.EKHash(ek), EKPublic: ek})
	b := &station.Batch{Name: "mixed"}
	if err := s.store.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	for _, u := range units {
		if err := s.store.RecordUnit(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.store.AddUnit(ctx, b.ID, u.Serial); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.store.SetBatchTarget(ctx, b.ID, tg.Name, station.EnrollmentTemplate{}); err != nil {
		t.Fatal(err)
	}
	if err := s.store.Transition(ctx, b.ID, station.BatchOpen, station.BatchSealed); err != nil {
		t.Fatal(err)
	}

	p := s.pusher(t, tg, cloudsync.Quota{Operations: 6000, Window: time.Minute})
	p.PerUnit, p.Verify = true, cloudsync.VerifyAll
	p.Group = x509Group("line-x509", lineCA)
	// A unit names a group that is not given: the push is not planned.
	if _, err := p.Push(ctx, b.ID); station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "other-x509") {
		t.Fatalf("push without group other-x509 = %v; want Invalid naming it", err)
	}
	p.Groups = []*cloudsync.Group{x509Group("other-x509", otherCA), skGroup}
	rep, err := p.Push(ctx, b.ID)
	if station.KindOf(err) != station.KindInvalid {
		t.Errorf("push = %v; want Invalid: two units cannot be enrolled", err)
	}
	if rep.Total != 9 || rep.Done != 7 || rep.Failed != 2 || rep.Verified != 4 {
		t.Errorf("report total %d, done %d, failed %d, verified %d; want 9 (3 groups, 6 units), 7, 2, 4", rep.Total, rep.Done, rep.Failed, rep.Verified)
	}
	for _, f := range rep.Failures {
		switch f.Serial {
		case "X3":
			if !strings.Contains(f.Error, "no certificate of its own") {
				t.Errorf("X3: %s", f.Error)
			}
		case "S2":
			if !strings.Contains(f.Error, "not derived from this group key") {
				t.Errorf("S2: %s", f.Error)
			}
		default:
			t.Errorf("%s failed: %s", f.Serial, f.Error)
		}
	}
	held := d.enrollments(t)
	if len(held) != 4 {
		t.Errorf("the DPS holds %d individual enrollments; want 4 (X1, X2, S1, T1)", len(held))
	}
	for id, ca := range map[string]*testCert{"x-1": x1, "x-2": x2} {
		x := held[id].Attestation.X509
		if x == nil || x.ClientCertificates == nil || x.ClientCertificates.Primary.Certificate != cloudsync.CertificatePEM(ca.cert.Raw) {
			t.Errorf("%s: the DPS holds %+v; want the unit's leaf", id, held[id].Attestation)
		}
	}
	if k := held["s-1"].Attestation.SymmetricKey; k == nil || k.PrimaryKey != dps.EncodeKey(dps.DeriveDeviceKey(gk, "s-1")) {
		t.Errorf("s-1: the DPS holds %+v; want the key derived from the group's", held["s-1"].Attestation)
	}
	svc, err := cloudsync.NewServiceClient(tg, s.sealer)
	if err != nil {
		t.Fatal(err)
	}
	for id, typ := range map[string]string{"line-x509": dps.AttestationX509, "other-x509": dps.AttestationX509, "line-sk": dps.AttestationSymmetricKey} {
		if g, err := svc.GetEnrollmentGroup(ctx, id); err != nil || g.Attestation.Type != typ {
			t.Errorf("group %s: %+v, %v; want %s", id, g, err, typ)
		}
	}

	// The answer for X1's bulk operation is lost (a crash): the next push
	// reads it back, finds the same certificate, and writes nothing.
	sent, err := s.store.PushItems(ctx, b.ID, station.PushEnroll, station.PushDone)
	if err != nil {
		t.Fatal(err)
	}
	for _, it := range sent {
		if it.Key == "x-1" {
			it.State = station.PushSent
			if err := s.store.UpdatePushItems(ctx, []station.PushItem{it}); err != nil {
				t.Fatal(err)
			}
		}
	}
	rep, _ = p.Push(ctx, b.ID)
	if rep.ReadBack < 1 || rep.Done != 7 {
		t.Errorf("resumed push: read back %d, done %d; want x-1 read back and found done", rep.ReadBack, rep.Done)
	}
	if dups, _ := d.th.duplicated(); dups != 0 {
		t.Errorf("%d registration IDs written twice; want 0", dups)
	}
}
