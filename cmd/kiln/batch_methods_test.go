package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

// A batch of an X.509 unit (its key in the DUT's TPM, its leaf from the
// station CA) and a symmetric-key unit, both recorded by real provisioning
// runs, pushed with --per-unit to a devserver that throttles like DPS: the
// station's two enrollment groups (the X.509 one under the station CA's
// intermediate) and each unit's own enrollment. The X.509 DUT then
// registers through its individual enrollment, and, once that is deleted,
// through the group; the symmetric-key DUT registers with its key. The
// exports name each unit's identity without a key.
func TestBatchPushX509AndSymKeyCLI(t *testing.T) {
	home := t.TempDir()
	ctx := t.Context()
	x, _ := startDUT(t, dutOpts{serial: "SN-BX-01"})
	if code, rr, stderr := provisionJSON(t, home, "--port", x.path, "--method", "x509"); code != exitPass {
		t.Fatalf("x509: exit %d: %s\n%s", code, rr.Error, stderr)
	}
	sk, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{Info: station.DeviceInfo{Serial: "SN-BS-01"}, LineRate: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer sk.Close()
	if code, rr, stderr := provisionJSON(t, home, "--port", sk.Path(), "--method", "symkey"); code != exitPass {
		t.Fatalf("symkey: exit %d: %s\n%s", code, rr.Error, stderr)
	}
	xu, su := mustUnit(t, home, "SN-BX-01"), mustUnit(t, home, "SN-BS-01")

	emb, err := devserver.StartEmbedded(ctx, devserver.EmbeddedConfig{DataDir: t.TempDir(), Quotas: devserver.DPSQuotas()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	dir := t.TempDir()
	connFile, caFile := filepath.Join(dir, "conn.txt"), filepath.Join(dir, "ca.pem")
	os.WriteFile(connFile, []byte(emb.DPS.ServiceConnectionString()), 0o600)
	os.WriteFile(caFile, emb.TrustPEM, 0o644)
	must := func(args ...string) string {
		t.Helper()
		code, out, errOut := kiln(t, home, args...)
		if code != 0 {
			t.Fatalf("kiln %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}
	must("batch", "target", "add", "dev", "--connection-string-file", connFile, "--trust", caFile)
	var b station.Batch
	if err := json.Unmarshal([]byte(must("batch", "seal", "--target", "dev", "--json")), &b); err != nil || b.Units != 2 {
		t.Fatalf("sealed batch %+v, %v; want the 2 units", b, err)
	}
	id := fmt.Sprint(b.ID)

	var rep cloudsync.Report
	if err := json.Unmarshal([]byte(must("batch", "push", id, "--per-unit", "--verify", "all", "--json")), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Total != 4 || rep.Done != 4 || rep.Failed != 0 || rep.Verified != 2 {
		t.Errorf("push report %+v; want 2 groups and 2 units done, the 2 units verified", rep)
	}

	svc, err := emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}
	_, interPEM, _ := kiln(t, home, "ca", "export", "--what", "intermediate")
	inter, err := pki.ParseCertificates([]byte(interPEM))
	if err != nil || len(inter) != 1 {
		t.Fatalf("intermediate: %v", err)
	}
	xg, err := svc.GetEnrollmentGroup(ctx, defaultX509Group)
	if err != nil {
		t.Fatal(err)
	}
	if x := xg.Attestation.X509; x == nil || x.SigningCertificates == nil || x.SigningCertificates.Primary == nil {
		t.Errorf("group %s: %+v; want a signing certificate", defaultX509Group, xg.Attestation)
	} else if got, err := pki.ParseCertificates([]byte(x.SigningCertificates.Primary.Certificate)); err != nil || len(got) != 1 || !bytes.Equal(got[0].Raw, inter[0].Raw) {
		t.Errorf("group %s signed by %q (%v); want the station CA's intermediate", defaultX509Group, x.SigningCertificates.Primary.Certificate, err)
	}
	if sg, err := svc.GetEnrollmentGroup(ctx, defaultSymKeyGroup); err != nil || sg.Attestation.SymmetricKey == nil {
		t.Errorf("group %s: %+v, %v; want a symmetric-key group", defaultSymKeyGroup, sg, err)
	}
	xe, err := svc.GetEnrollment(ctx, xu.RegistrationID)
	if err != nil {
		t.Fatal(err)
	}
	if c := xe.Attestation.X509; c == nil || c.ClientCertificates == nil || c.ClientCertificates.Primary.Certificate != cloudsync.CertificatePEM(xu.Certificate) {
		t.Errorf("the X.509 unit's enrollment: %+v; want its recorded leaf", xe.Attestation)
	}
	se, err := svc.GetEnrollment(ctx, su.RegistrationID)
	if err != nil {
		t.Fatal(err)
	}
	if k, err := dps.DecodeKey(se.Attestation.SymmetricKey.PrimaryKey); err != nil || station.KeyFingerprint(k) != su.SymKeySHA256 {
		t.Errorf("the symmetric-key unit's enrollment holds a key with fingerprint %s; the DUT's is %s", station.KeyFingerprint(k), su.SymKeySHA256)
	}

	// The DUTs register through what was pushed.
	register := func(path string, u *station.Unit) station.ProvisionReport {
		t.Helper()
		l, err := link.Open(ctx, path, link.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		cfg := station.DeviceConfig{IDScope: emb.DPS.IDScope(), GlobalEndpoint: emb.DPS.Endpoint(), RegistrationID: u.RegistrationID,
			Method: u.Method, TrustBundle: string(emb.TrustPEM)}
		if err := l.WriteConfig(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		r, err := l.ProvisionNow(ctx, nil)
		if err != nil {
			t.Fatalf("%s registers: %v", u.Serial, err)
		}
		return r
	}
	if r := register(x.path, xu); r.Status != dps.StatusAssigned || r.DeviceID != xu.RegistrationID {
		t.Errorf("the X.509 DUT through its enrollment: %+v; want assigned", r)
	}
	if err := svc.DeleteEnrollment(ctx, xu.RegistrationID, ""); err != nil {
		t.Fatal(err)
	}
	if r := register(x.path, xu); r.Status != dps.StatusAssigned {
		t.Errorf("the X.509 DUT through group %s: %+v; want assigned", defaultX509Group, r)
	}
	if r := register(sk.Path(), su); r.Status != dps.StatusAssigned || r.DeviceID != su.RegistrationID {
		t.Errorf("the symmetric-key DUT: %+v; want assigned", r)
	}

	// The exports carry each method's identity, and no key.
	csvPath, mPath, bulkPath := filepath.Join(dir, "b.csv"), filepath.Join(dir, "b.manifest.json"), filepath.Join(dir, "b.json")
	must("batch", "export", id, "--format", "csv", "--out", csvPath)
	must("batch", "export", id, "--format", "manifest", "--out", mPath)
	raw, _ := os.ReadFile(csvPath)
	rows, err := csv.NewReader(bytes.NewReader(raw)).ReadAll()
	if err != nil || len(rows) != 3 {
		t.Fatalf("csv: %d rows, %v", len(rows), err)
	}
	col := map[string]int{}
	for i, h := range rows[0] {
		col[h] = i
	}
	_, tp := station.Thumbprints(xu.Certificate)
	for _, r := range rows[1:] {
		switch r[0] {
		case xu.Serial:
			if r[col["certificate_base64"]] != base64.StdEncoding.EncodeToString(xu.Certificate) || r[col["certificate_sha256_thumbprint"]] != tp {
				t.Errorf("csv row of the X.509 unit: %v", r)
			}
		case su.Serial:
			if r[col["enrollment_group"]] != defaultSymKeyGroup || r[col["symmetric_key_sha256"]] != su.SymKeySHA256 {
				t.Errorf("csv row of the symmetric-key unit: %v", r)
			}
		}
	}
	code, out, errOut := kiln(t, home, "batch", "verify-manifest", mPath, "--json")
	var claims []cloudsync.Claims
	if err := json.Unmarshal([]byte(out), &claims); code != 0 || err != nil || len(claims) != 2 {
		t.Fatalf("verify-manifest: exit %d, %v\n%s\n%s", code, err, out, errOut)
	}
	for _, c := range claims {
		switch c.Serial {
		case xu.Serial:
			der, _ := base64.StdEncoding.DecodeString(c.Certificate)
			if cert, err := x509.ParseCertificate(der); err != nil || !bytes.Equal(cert.Raw, xu.Certificate) || c.CertThumbprint != tp {
				t.Errorf("manifest claims of the X.509 unit: %+v", c)
			}
		case su.Serial:
			if c.EnrollmentGroup != defaultSymKeyGroup || c.SymKeySHA256 != su.SymKeySHA256 {
				t.Errorf("manifest claims of the symmetric-key unit: %+v", c)
			}
		}
	}
	// A bulk file with the symmetric-key group needs its key given
	// explicitly; without it the export says so.
	if code, _, errOut := kiln(t, home, "batch", "export", id, "--format", "bulk", "--out", bulkPath); code == 0 || !strings.Contains(errOut, "--group-key-file") {
		t.Errorf("bulk export without the group key: exit %d: %s", code, errOut)
	}
	keyFile := filepath.Join(dir, "group.key")
	os.WriteFile(keyFile, []byte(se.Attestation.SymmetricKey.PrimaryKey), 0o600) // any base64 key: the per-unit check refuses a wrong one
	if code, _, errOut := kiln(t, home, "batch", "export", id, "--format", "bulk", "--out", bulkPath, "--group-id", defaultSymKeyGroup, "--group-key-file", keyFile, "--per-unit"); code == 0 || !strings.Contains(errOut, "not derived from this group key") {
		t.Errorf("bulk export per unit with a wrong group key: exit %d: %s", code, errOut)
	}
	must("batch", "export", id, "--format", "bulk", "--out", bulkPath, "--group-id", defaultSymKeyGroup, "--group-key-file", keyFile)
	raw, _ = os.ReadFile(bulkPath)
	var f cloudsync.BulkFile
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	if len(f.Groups) != 1 || len(f.Groups[0].EnrollmentGroups) != 2 || len(f.Units) != 2 || len(f.Enrollments) != 0 {
		t.Errorf("bulk file: %d group operations, %d units, %d enrollment operations; want both groups in one, 2 units, none", len(f.Groups), len(f.Units), len(f.Enrollments))
	}
	for _, u := range f.Units {
		if u.Serial == xu.Serial && (u.SHA256Thumbprint != tp || u.EnrollmentGroup != defaultX509Group) {
			t.Errorf("bulk identity of the X.509 unit: %+v", u)
		}
	}
}

// With a remote step-ca as the station CA, the station's X.509 group is
// signed by the step-ca's root (the only certificate of it the station
// holds), under the configured group ID; a unit naming another group gets
// none from the station; an export is refused the symmetric-key group's
// key unless it is given.
func TestStationGroupsRemoteCA(t *testing.T) {
	home, dir := t.TempDir(), t.TempDir()
	root := newTestCA(t)
	rootPath, pwPath := filepath.Join(dir, "root.pem"), filepath.Join(dir, "pw")
	os.WriteFile(rootPath, []byte(cloudsync.CertificatePEM(root.Raw)), 0o644)
	os.WriteFile(pwPath, []byte("pw"), 0o600)
	cfg, _ := json.Marshal(map[string]any{"x509_group": "factory-x509",
		"ca": map[string]any{"remote": map[string]any{"url": "https://127.0.0.1:9", "provisioner": "p", "root": rootPath, "password_file": pwPath}}})
	if err := os.WriteFile(filepath.Join(home, configFile), cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}}
	be, err := openBatchEnv(t.Context(), e)
	if err != nil {
		t.Fatal(err)
	}
	defer be.close()
	units := []*station.Unit{{Serial: "A", Method: station.MethodX509}, {Serial: "B", Method: station.MethodX509, EnrollmentGroup: "elsewhere"}}
	gs, err := be.stationGroups(t.Context(), e, units, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(gs) != 1 || gs[0].ID != "factory-x509" || gs[0].Attestation.X509.SigningCertificates.Primary.Certificate != cloudsync.CertificatePEM(root.Raw) {
		t.Fatalf("station groups %+v; want factory-x509 signed by the step-ca root", gs)
	}
	if _, err := cloudsync.UnitGroup(units[1], gs); err == nil || !strings.Contains(err.Error(), "elsewhere") {
		t.Errorf("a unit naming another group: %v; want it named", err)
	}
	sym := []*station.Unit{{Serial: "S", Method: station.MethodSymKey, EnrollmentGroup: defaultSymKeyGroup}}
	if _, err := be.stationGroups(t.Context(), e, sym, nil, false); err == nil || !strings.Contains(err.Error(), "--group-key-file") {
		t.Errorf("export of a symmetric-key unit without its group key: %v; want --group-key-file asked for", err)
	}
}

// newTestCA returns a self-signed CA certificate.
func newTestCA(t *testing.T) *x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "Factory Root"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}
