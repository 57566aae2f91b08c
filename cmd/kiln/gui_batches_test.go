package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
	"github.com/kilnworks/kiln/ui"
)

// recordBatch records n TPM units (EKs with random moduli) serialled
// prefix0000… in a new open batch of s, and returns the batch.
func recordBatch(t *testing.T, s *sqlite.Store, name, prefix string, n int) *station.Batch {
	t.Helper()
	ctx := t.Context()
	b := &station.Batch{Name: name}
	if err := s.CreateBatch(ctx, b); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		m := make([]byte, 256)
		rand.Read(m)
		m[0] |= 0x80
		tmpl := tpm2.RSAEKTemplate
		tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: m})
		ek := tpm2.Marshal(tpm2.New2B(tmpl))
		u := &station.Unit{Serial: fmt.Sprintf("%s%04d", prefix, i), RegistrationID: station.RegistrationIDFromEK(ek), Method: station.MethodTPM,
			EKHash: station.EKHash(ek), EKPublic: ek, Model: "KX-1", Station: "kiln", Operator: "ana"}
		if err := s.RecordUnit(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.AddUnit(ctx, b.ID, u.Serial); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// progressLog keeps the progress reports of one operation, as the Batches
// screen receives them.
type progressLog struct {
	mu   sync.Mutex
	all  []ui.BatchProgress
	stop func(ui.BatchProgress) // called with each report when set
}

func (l *progressLog) report(p ui.BatchProgress) {
	l.mu.Lock()
	l.all = append(l.all, p)
	stop := l.stop
	l.mu.Unlock()
	if stop != nil {
		stop(p)
	}
}

// last returns the last report of phase.
func (l *progressLog) last(phase string) (ui.BatchProgress, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.all) - 1; i >= 0; i-- {
		if l.all[i].Phase == phase {
			return l.all[i], true
		}
	}
	return ui.BatchProgress{}, false
}

// guiEnv is the GUI's wiring over the data directory home: the store the
// provisioner records into, the Batches screen's backend and the Settings
// screen's batch targets, built by newGUIBatches as kiln gui builds them.
func guiEnv(t *testing.T, home string) (*env, *sqlite.Store, *guiBatches, *guiTargets) {
	t.Helper()
	e := &env{stdout: io.Discard, stderr: io.Discard, getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}}
	c, err := loadConfig(e)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.openStore(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	g, tg, err := newGUIBatches(e, c, s, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return e, s, g, tg
}

// TestGUIBatchesPushToDevserver drives the GUI's batch wiring against a
// real embedded devserver: a target added as the Settings screen adds it
// (its connection string sealed), chosen for sealing; a batch sealed,
// pushed with progress to 100 % and read back; the DPS holds the
// enrollments; exports (a signed manifest that verifies, DPS bulk JSON,
// CSV); a stopped push resumed from the outbox; and a target that refuses
// the station's key, whose refusals are listed per unit and cleared once
// the target is fixed.
func TestGUIBatchesPushToDevserver(t *testing.T) {
	ctx := t.Context()
	home, dir := t.TempDir(), t.TempDir()
	_, s, g, tg := guiEnv(t, home)
	emb, err := devserver.StartEmbedded(ctx, devserver.EmbeddedConfig{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, emb.TrustPEM, 0o644)
	conn := emb.DPS.ServiceConnectionString()
	svc, err := emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}
	enrolled := func() map[string]bool {
		t.Helper()
		page, _, err := svc.QueryEnrollments(ctx, "*", dps.QueryPage{Size: 1000})
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]bool{}
		for _, e := range page {
			m[strings.ToLower(e.RegistrationID)] = true
		}
		return m
	}
	state := func(id int64) station.BatchState {
		t.Helper()
		b, err := s.Batch(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return b.State
	}

	// Settings: add the devserver as a target and seal batches with it.
	if err := tg.AddTarget(ctx, ui.NewBatchTarget{Name: "lab", ConnectionString: conn, TrustPath: caFile, OpsPerMinute: 6000}); err != nil {
		t.Fatal(err)
	}
	ts, err := tg.Targets(ctx)
	if err != nil || len(ts) != 1 {
		t.Fatalf("targets %+v, %v", ts, err)
	}
	if want := (ui.BatchTarget{Name: "lab", Host: emb.DPS.Endpoint(), OpsPerMinute: 6000, PrivateCA: true}); ts[0] != want {
		t.Errorf("target %+v, want %+v", ts[0], want)
	}
	if err := tg.SetSealTarget(ctx, "nowhere"); station.KindOf(err) != station.KindNotFound {
		t.Errorf("choosing a missing target: %v, want NotFound", err)
	}
	if err := tg.SetSealTarget(ctx, "lab"); err != nil {
		t.Fatal(err)
	}
	if raw, _ := os.ReadFile(filepath.Join(home, configFile)); !bytes.Contains(raw, []byte(`"batch_target": "lab"`)) {
		t.Errorf("station.json does not keep the choice:\n%s", raw)
	}
	// The key is sealed: not in the database, nor in station.json.
	key := conn[strings.Index(conn, "SharedAccessKey=")+len("SharedAccessKey="):]
	for _, f := range []string{"kiln.db", "kiln.db-wal", configFile} {
		if b, _ := os.ReadFile(filepath.Join(home, f)); bytes.Contains(b, []byte(key)) {
			t.Errorf("%s holds the service key in the clear", f)
		}
	}
	// A connection string that is not one is refused without echoing it.
	err = tg.AddTarget(ctx, ui.NewBatchTarget{Name: "bad", ConnectionString: "HostName=x;SharedAccessKey=" + key})
	if station.KindOf(err) != station.KindInvalid || strings.Contains(err.Error(), key) {
		t.Errorf("a device connection string as target: %v", err)
	}

	// Seal and push a batch of 25 units.
	b1 := recordBatch(t, s, "line-1", "SN-A", 25)
	if got, _ := outboxStatus(ctx, s); got != "empty" {
		t.Errorf("outbox with an open batch: %q, want empty", got)
	}
	if err := g.Seal(ctx, b1.ID); err != nil {
		t.Fatal(err)
	}
	if b, _ := s.Batch(ctx, b1.ID); b.State != station.BatchSealed || b.TargetID != "lab" {
		t.Errorf("after Seal: %s, target %q; want sealed, lab", b.State, b.TargetID)
	}
	if got, _ := outboxStatus(ctx, s); got != "25 units sealed" {
		t.Errorf("outbox %q, want 25 units sealed", got)
	}
	var pl progressLog
	if err := g.Push(ctx, b1.ID, pl.report); err != nil {
		t.Fatalf("push: %v", err)
	}
	if p, ok := pl.last("push"); !ok || p.Done != 25 || p.Total != 25 || p.Failed != 0 || p.Remaining() != 0 {
		t.Errorf("last push progress %+v (%v), want 25 of 25", p, ok)
	}
	if p, ok := pl.last("verify"); !ok || p.Done != p.Total || p.Total != 20 {
		t.Errorf("last verify progress %+v (%v), want a sample of 20 read back", p, ok)
	}
	if st := state(b1.ID); st != station.BatchPushed {
		t.Errorf("after the push the batch is %s, want pushed", st)
	}
	units, _ := s.BatchUnits(ctx, b1.ID)
	on := enrolled()
	for _, u := range units {
		if !on[strings.ToLower(u.RegistrationID)] {
			t.Errorf("the DPS does not hold %s (%s)", u.Serial, u.RegistrationID)
		}
	}
	if errs, err := g.UnitErrors(ctx, b1.ID); err != nil || len(errs) != 0 {
		t.Errorf("unit errors after a clean push: %+v, %v", errs, err)
	}
	if got, _ := outboxStatus(ctx, s); got != "empty" {
		t.Errorf("outbox after the push: %q, want empty", got)
	}
	var en progressLog
	if err := g.Enable(ctx, b1.ID, en.report); err != nil {
		t.Errorf("enable: %v", err)
	}
	if p, ok := en.last("enable"); !ok || p.Done != 25 {
		t.Errorf("last enable progress %+v (%v), want 25 done", p, ok)
	}

	// Exports: a signed manifest that verifies under the station's key;
	// DPS bulk JSON; CSV. A pushed batch stays pushed.
	manifest := filepath.Join(dir, "batch-1.manifest.json")
	var ex progressLog
	if err := g.Export(ctx, b1.ID, exportManifest, manifest, true, ex.report); err != nil {
		t.Fatal(err)
	}
	if p, _ := ex.last(""); p.Done != 25 || p.Total != 25 {
		t.Errorf("last export progress %+v, want 25 of 25", p)
	}
	raw, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	m, err := cloudsync.DecodeManifest(raw)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := g.be.signer()
	if err != nil {
		t.Fatal(err)
	}
	claims, err := cloudsync.VerifyManifest(m, signer.Public())
	if err != nil || len(claims) != 25 {
		t.Errorf("the manifest: %d claims, %v; want 25 that verify", len(claims), err)
	}
	bulk := filepath.Join(dir, "batch-1.json")
	if err := g.Export(ctx, b1.ID, exportBulk, bulk, false, func(ui.BatchProgress) {}); err != nil {
		t.Fatal(err)
	}
	var bf cloudsync.BulkFile
	if raw, _ := os.ReadFile(bulk); json.Unmarshal(raw, &bf) != nil || len(bf.Enrollments) != 3 {
		t.Errorf("bulk export: %d operations, want 3", len(bf.Enrollments))
	}
	csvPath := filepath.Join(dir, "batch-1.csv")
	if err := g.Export(ctx, b1.ID, exportCSV, csvPath, false, func(ui.BatchProgress) {}); err != nil {
		t.Fatal(err)
	}
	if raw, _ := os.ReadFile(csvPath); strings.Count(string(raw), "\n") != 26 {
		t.Errorf("CSV has %d lines, want 26", strings.Count(string(raw), "\n"))
	}
	if err := g.Export(ctx, b1.ID, exportCSV, filepath.Join(dir, "no-such-dir", "x.csv"), false, func(ui.BatchProgress) {}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("export into a missing folder: %v, want Invalid", err)
	}
	if st := state(b1.ID); st != station.BatchPushed {
		t.Errorf("after the exports the batch is %s, want pushed", st)
	}

	// Hand-over: a sealed batch exported as files becomes exported.
	b2 := recordBatch(t, s, "line-2", "SN-H", 3)
	if err := g.Seal(ctx, b2.ID); err != nil {
		t.Fatal(err)
	}
	if err := g.Export(ctx, b2.ID, exportCSV, filepath.Join(dir, "handover.csv"), true, func(ui.BatchProgress) {}); err != nil {
		t.Fatal(err)
	}
	if st := state(b2.ID); st != station.BatchExported {
		t.Errorf("after a hand-over export the batch is %s, want exported", st)
	}

	// Stop a push midway (the screen's Stop cancels its context), then
	// resume it: the outbox carries what was done.
	slow := ui.NewBatchTarget{Name: "lab-slow", ConnectionString: conn, TrustPath: caFile, OpsPerMinute: 600}
	if err := tg.AddTarget(ctx, slow); err != nil {
		t.Fatal(err)
	}
	if err := tg.SetSealTarget(ctx, "lab-slow"); err != nil {
		t.Fatal(err)
	}
	b3 := recordBatch(t, s, "line-3", "SN-C", 60)
	if err := g.Seal(ctx, b3.ID); err != nil {
		t.Fatal(err)
	}
	pctx, cancel := context.WithCancel(ctx)
	stopped := progressLog{stop: func(p ui.BatchProgress) {
		if p.Phase == "push" && p.Done >= 10 {
			cancel()
		}
	}}
	err = g.Push(pctx, b3.ID, stopped.report)
	cancel()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("a stopped push returned %v, want it cancelled", err)
	}
	if st := state(b3.ID); st != station.BatchPushing {
		t.Errorf("a stopped push left the batch %s, want pushing", st)
	}
	counts, _ := s.PushCounts(ctx, b3.ID, station.PushEnroll)
	if counts[station.PushDone] < 10 || counts[station.PushDone] >= 60 {
		t.Errorf("after the stop the outbox holds %v; want some but not all done", counts)
	}
	if got, err := outboxStatus(ctx, s); err != nil || !strings.Contains(got, fmt.Sprintf("%d items to push", 60-counts[station.PushDone])) {
		t.Errorf("outbox during a stopped push: %q, %v", got, err)
	}
	var resumed progressLog
	if err := g.Push(ctx, b3.ID, resumed.report); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if first := resumed.all[0]; first.Phase != "push" || first.Done != counts[station.PushDone] {
		t.Errorf("the resumed push started at %+v, want at %d done", first, counts[station.PushDone])
	}
	if p, _ := resumed.last("push"); p.Done != 60 {
		t.Errorf("the resumed push ended at %+v, want 60 done", p)
	}
	if st := state(b3.ID); st != station.BatchPushed {
		t.Errorf("after the resumed push the batch is %s, want pushed", st)
	}
	if n := len(enrolled()); n != 85 {
		t.Errorf("the DPS holds %d enrollments, want 85", n)
	}

	// A target that refuses the station's key: every unit is listed with
	// the refusal, the Outbox tile turns abnormal, and once the target's
	// connection string is fixed the push resumes and clears them.
	wrongKey := make([]byte, 32)
	rand.Read(wrongKey)
	wrong := conn[:strings.Index(conn, "SharedAccessKey=")] + "SharedAccessKey=" + base64.StdEncoding.EncodeToString(wrongKey)
	if err := tg.AddTarget(ctx, ui.NewBatchTarget{Name: "refusing", ConnectionString: wrong, TrustPath: caFile, OpsPerMinute: 6000}); err != nil {
		t.Fatal(err)
	}
	if err := tg.SetSealTarget(ctx, "refusing"); err != nil {
		t.Fatal(err)
	}
	b4 := recordBatch(t, s, "line-4", "SN-R", 5)
	if err := g.Seal(ctx, b4.ID); err != nil {
		t.Fatal(err)
	}
	var rl progressLog
	err = g.Push(ctx, b4.ID, rl.report)
	if station.KindOf(err) != station.KindUnauthorized {
		t.Fatalf("push to a refusing target: %v, want Unauthorized", err)
	}
	if p, _ := rl.last("push"); p.Failed != 5 || p.Done != 0 {
		t.Errorf("last progress %+v, want 5 failed", p)
	}
	errs, err := g.UnitErrors(ctx, b4.ID)
	if err != nil || len(errs) != 5 {
		t.Fatalf("unit errors %+v, %v; want 5", errs, err)
	}
	for _, ue := range errs {
		if !strings.HasPrefix(ue.Serial, "SN-R") || ue.RegistrationID == "" || ue.Kind != station.KindUnauthorized || ue.Message == "" || ue.At.IsZero() {
			t.Errorf("unit error %+v", ue)
		}
	}
	if _, err := outboxStatus(ctx, s); err == nil || !strings.Contains(err.Error(), "5 items refused by the target") {
		t.Errorf("outbox tile with refusals: %v, want abnormal", err)
	}
	if err := tg.AddTarget(ctx, ui.NewBatchTarget{Name: "refusing", ConnectionString: conn, TrustPath: caFile, OpsPerMinute: 6000}); err != nil {
		t.Fatal(err)
	}
	if err := g.Push(ctx, b4.ID, func(ui.BatchProgress) {}); err != nil {
		t.Fatalf("push after fixing the target: %v", err)
	}
	if errs, _ := g.UnitErrors(ctx, b4.ID); len(errs) != 0 {
		t.Errorf("unit errors after the fixed push: %+v", errs)
	}
	if n := len(enrolled()); n != 90 {
		t.Errorf("the DPS holds %d enrollments, want 90", n)
	}
}

// TestCloudTileBatchTarget: with a batch target the Cloud target tile
// dials the target's service address, not the production endpoint.
func TestCloudTileBatchTarget(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var d net.Dialer
	prod := &station.DeviceConfig{GlobalEndpoint: "127.0.0.1:1"}
	tgt := &station.Target{Name: "lab", HostName: ln.Addr().String()}
	if got, err := cloudStatus(t.Context(), tgt, prod, d.DialContext); err != nil || got != "lab reachable" {
		t.Errorf("a listening target: %q, %v", got, err)
	}
	for _, tt := range []struct {
		t    station.Target
		want string
	}{
		{station.Target{HostName: "contoso.azure-devices-provisioning.net"}, "contoso.azure-devices-provisioning.net:443"},
		{station.Target{HostName: "contoso", BaseURL: "https://127.0.0.1:8443/"}, "127.0.0.1:8443"},
		{station.Target{HostName: "127.0.0.1:9000"}, "127.0.0.1:9000"},
	} {
		if got := targetAddr(&tt.t); got != tt.want {
			t.Errorf("targetAddr(%+v) = %q, want %q", tt.t, got, tt.want)
		}
	}
	ln.Close()
	_, err = cloudStatus(t.Context(), tgt, nil, d.DialContext)
	if station.KindOf(err) != station.KindUnavailable || !strings.Contains(err.Error(), "batch target lab") {
		t.Errorf("a closed target: %v, want Unavailable naming the target", err)
	}
}

// TestGUIBatchesGroups: batches of symmetric-key and X.509 units are pushed
// through the station's own enrollment groups (its group key; its CA's
// signing certificate); units the station's groups do not cover (an
// imported part without a leaf from the station CA) are refused with the
// kiln batch command that pushes them.
func TestGUIBatchesGroups(t *testing.T) {
	ctx := t.Context()
	home, dir := t.TempDir(), t.TempDir()
	_, s, g, tg := guiEnv(t, home)
	emb, err := devserver.StartEmbedded(ctx, devserver.EmbeddedConfig{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, emb.TrustPEM, 0o644)
	if err := tg.AddTarget(ctx, ui.NewBatchTarget{Name: "lab", ConnectionString: emb.DPS.ServiceConnectionString(), TrustPath: caFile, OpsPerMinute: 6000}); err != nil {
		t.Fatal(err)
	}
	svc, err := emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}

	// A throwaway station CA and the group key.
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Kiln Test Intermediate"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true, IsCA: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	sym := &station.SymKeyGroup{ID: "kiln-symkey", Key: bytes.Repeat([]byte{7}, 32)}
	g.groups = func() (*station.SymKeyGroup, []byte) { return sym, caDER }

	record := func(name string, units ...*station.Unit) *station.Batch {
		t.Helper()
		b := &station.Batch{Name: name}
		if err := s.CreateBatch(ctx, b); err != nil {
			t.Fatal(err)
		}
		for _, u := range units {
			u.Station, u.Operator = "kiln", "ana"
			if err := s.RecordUnit(ctx, u); err != nil {
				t.Fatal(err)
			}
			if err := s.AddUnit(ctx, b.ID, u.Serial); err != nil {
				t.Fatal(err)
			}
		}
		if err := g.Seal(ctx, b.ID); err != nil {
			t.Fatal(err)
		}
		return b
	}
	leaf := func(cn string) []byte {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, k.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}

	symBatch := record("sym", &station.Unit{Serial: "SK-1", RegistrationID: "sk-1", Method: station.MethodSymKey, EnrollmentGroup: "kiln-symkey"},
		&station.Unit{Serial: "SK-2", RegistrationID: "sk-2", Method: station.MethodSymKey, EnrollmentGroup: "kiln-symkey"})
	if err := g.Push(ctx, symBatch.ID, func(ui.BatchProgress) {}); err != nil {
		t.Fatalf("push of symmetric-key units: %v", err)
	}
	eg, err := svc.GetEnrollmentGroup(ctx, "kiln-symkey")
	if err != nil || eg.Attestation.SymmetricKey == nil || eg.Attestation.SymmetricKey.PrimaryKey != dps.EncodeKey(sym.Key) {
		t.Errorf("the DPS's symmetric-key group: %+v, %v", eg, err)
	}

	x509Batch := record("x509", &station.Unit{Serial: "X-1", RegistrationID: "x-1", Method: station.MethodX509, Certificate: leaf("x-1")})
	if err := g.Push(ctx, x509Batch.ID, func(ui.BatchProgress) {}); err != nil {
		t.Fatalf("push of X.509 units: %v", err)
	}
	eg, err = svc.GetEnrollmentGroup(ctx, defaultX509Group)
	if err != nil || eg.Attestation.X509 == nil || !strings.Contains(eg.Attestation.X509.SigningCertificates.Primary.Certificate, "BEGIN CERTIFICATE") {
		t.Errorf("the DPS's X.509 group: %+v, %v", eg, err)
	}

	vendor := record("vendor", &station.Unit{Serial: "0123AB", RegistrationID: "sn0123ab", Method: station.MethodX509})
	err = g.Push(ctx, vendor.ID, func(ui.BatchProgress) {})
	if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "kiln batch push") {
		t.Errorf("push of an imported part: %v, want Invalid naming kiln batch push", err)
	}
	b, _ := s.Batch(ctx, vendor.ID)
	if b.State != station.BatchSealed {
		t.Errorf("a refused push left the batch %s, want sealed", b.State)
	}
}
