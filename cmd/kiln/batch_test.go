package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// batchUnits records n TPM units (EKs with random moduli) in the open
// batch of the station in home.
func batchUnits(t *testing.T, home string, n int) {
	t.Helper()
	s := openStore(t, home)
	ctx := t.Context()
	b := &station.Batch{Name: "line-1"}
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
		u := &station.Unit{Serial: fmt.Sprintf("SN%04d", i), RegistrationID: station.RegistrationIDFromEK(ek), Method: station.MethodTPM,
			EKHash: station.EKHash(ek), EKPublic: ek, Model: "KX-1", Station: "kiln", Operator: "tester"}
		if err := s.RecordUnit(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.AddUnit(ctx, b.ID, u.Serial); err != nil {
			t.Fatal(err)
		}
	}
}

func TestBatchPushEnableExportCLI(t *testing.T) {
	home := t.TempDir()
	batchUnits(t, home, 25)
	emb, err := devserver.StartEmbedded(t.Context(), devserver.EmbeddedConfig{DataDir: t.TempDir(), Quotas: devserver.DPSQuotas()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	conn := emb.DPS.ServiceConnectionString()
	dir := t.TempDir()
	connFile, caFile := filepath.Join(dir, "conn.txt"), filepath.Join(dir, "ca.pem")
	os.WriteFile(connFile, []byte(conn+"\n"), 0o600)
	os.WriteFile(caFile, emb.TrustPEM, 0o644)

	must := func(args ...string) string {
		t.Helper()
		code, out, errOut := kiln(t, home, args...)
		if code != 0 {
			t.Fatalf("kiln %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}
	must("batch", "target", "add", "dev", "--connection-string-file", connFile, "--trust", caFile, "--ops-per-minute", "6000")
	if out := must("batch", "target", "list"); !strings.Contains(out, "dev") || !strings.Contains(out, "6000") {
		t.Errorf("target list:\n%s", out)
	}
	if out := must("batch", "seal", "--target", "dev", "--disabled", "--allocation", "hashed"); !strings.Contains(out, "batch 1 (line-1) sealed: 25 units, target dev") {
		t.Errorf("seal printed %q", out)
	}

	code, out, errOut := kiln(t, home, "batch", "push", "1", "--json", "--verify", "all")
	var rep cloudsync.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 0 {
		t.Fatalf("push: exit %d, %v\nstdout: %s\nstderr: %s", code, err, out, errOut)
	}
	if rep.Done != 25 || rep.Failed != 0 || rep.Verified != 25 || rep.Requests < 3 {
		t.Errorf("push report %+v", rep)
	}
	if !strings.Contains(errOut, "push batch 1 to dev: verify 25/25 (100%)") {
		t.Errorf("no progress line on stderr:\n%s", errOut)
	}
	svc, err := emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}
	status := func() map[string]int {
		page, _, err := svc.QueryEnrollments(t.Context(), "*", dps.QueryPage{Size: 100})
		if err != nil {
			t.Fatal(err)
		}
		c := map[string]int{}
		for _, e := range page {
			c[e.ProvisioningStatus]++
		}
		return c
	}
	if c := status(); c["disabled"] != 25 {
		t.Errorf("after the push the DPS holds %v; want 25 disabled", c)
	}
	if out := must("batch", "enable", "1"); !strings.Contains(out, "enable: 25 of 25 done, 0 failed") {
		t.Errorf("enable printed:\n%s", out)
	}
	if c := status(); c["enabled"] != 25 {
		t.Errorf("after enable the DPS holds %v; want 25 enabled", c)
	}
	if out := must("batch", "show", "1"); !strings.Contains(out, "push       25 done, 0 failed") || !strings.Contains(out, "batch 1  line-1  pushed") {
		t.Errorf("show printed:\n%s", out)
	}

	// The connection string's key is sealed: not in the database.
	key := conn[strings.Index(conn, "SharedAccessKey=")+len("SharedAccessKey="):]
	for _, f := range []string{"kiln.db", "kiln.db-wal"} {
		if b, _ := os.ReadFile(filepath.Join(home, f)); bytes.Contains(b, []byte(key)) {
			t.Errorf("%s holds the service key in the clear", f)
		}
	}

	manifest := filepath.Join(dir, "m.json")
	must("batch", "export", "1", "--format", "manifest", "--out", manifest)
	if out := must("batch", "verify-manifest", manifest); !strings.Contains(out, "verifies: 25 units of batch 1") {
		t.Errorf("verify-manifest printed %q", out)
	}
	pubFile := filepath.Join(dir, "signer.pem")
	os.WriteFile(pubFile, []byte(must("batch", "signing-key")), 0o644)
	must("batch", "verify-manifest", manifest, "--signer", pubFile)

	raw, _ := os.ReadFile(manifest)
	var m cloudsync.Manifest
	json.Unmarshal(raw, &m)
	m.Entries[7] = m.Entries[8]
	tampered, _ := json.Marshal(m)
	os.WriteFile(manifest, tampered, 0o644)
	code, _, errOut = kiln(t, home, "batch", "verify-manifest", manifest)
	if code != exitFail || !strings.Contains(errOut, "does NOT verify") || !strings.Contains(errOut, "repeats serial") {
		t.Errorf("tampered manifest: exit %d, stderr %q; want 1 and the reason", code, errOut)
	}

	csvOut := must("batch", "export", "1", "--format", "csv", "--out", "-")
	if n := strings.Count(csvOut, "\n"); n != 26 {
		t.Errorf("CSV has %d lines; want 26", n)
	}
	bulk := must("batch", "export", "1", "--format", "bulk", "--out", "-")
	var bf cloudsync.BulkFile
	if err := json.Unmarshal([]byte(bulk), &bf); err != nil || len(bf.Enrollments) != 3 {
		t.Errorf("bulk export: %d operations, %v; want 3", len(bf.Enrollments), err)
	}

	var list []station.Batch
	json.Unmarshal([]byte(must("batch", "list", "--json")), &list)
	if len(list) != 1 || list[0].State != station.BatchPushed || list[0].Units != 25 {
		t.Errorf("batch list: %+v", list)
	}
}

func TestBatchUsage(t *testing.T) {
	home := t.TempDir()
	for _, args := range [][]string{
		{"batch"},
		{"batch", "frob"},
		{"batch", "push"},
		{"batch", "push", "x"},
		{"batch", "export", "1"},
		{"batch", "target", "add", "t"},
		{"batch", "push", "1", "--verify", "maybe"},
	} {
		if code, _, _ := kiln(t, home, args...); code != exitUsage {
			t.Errorf("kiln %s: exit %d; want %d", strings.Join(args, " "), code, exitUsage)
		}
	}
	code, _, errOut := kiln(t, home, "batch", "push", "7")
	if code != exitFail || !strings.Contains(errOut, "no batch 7") {
		t.Errorf("push of a missing batch: exit %d, %q", code, errOut)
	}
}

func TestFormatProgress(t *testing.T) {
	for _, tt := range []struct {
		pr   cloudsync.Progress
		el   time.Duration
		want string
	}{
		{cloudsync.Progress{Phase: "push", Done: 0, Total: 100}, 0, "push batch 1: push 0/100 (0%)"},
		{cloudsync.Progress{Phase: "push", Done: 40, Total: 100, Failed: 2}, 4 * time.Second, "push batch 1: push 40/100 (40%), 10.0/s, ETA 6s, 2 failed"},
		{cloudsync.Progress{Phase: "verify", Done: 100, Total: 100}, 10 * time.Second, "push batch 1: verify 100/100 (100%), 10.0/s"},
	} {
		if got := formatProgress("push batch 1", tt.pr, tt.el); got != tt.want {
			t.Errorf("formatProgress(%+v, %v) = %q; want %q", tt.pr, tt.el, got, tt.want)
		}
	}
	// Not a terminal: plain lines, the last one always.
	var buf bytes.Buffer
	p := &progressLine{w: &buf, label: "export", start: time.Now()}
	for i := 1; i <= 1000; i++ {
		p.update(cloudsync.Progress{Phase: "export", Done: i, Total: 1000})
	}
	p.end()
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) > 3 || !strings.HasPrefix(lines[len(lines)-1], "export: export 1000/1000 (100%)") || strings.Contains(buf.String(), "\r") {
		t.Errorf("non-terminal progress:\n%q", buf.String())
	}
}

// vendorManifest writes a Microchip-style manifest of n parts signed by a
// throwaway signer, and that signer's certificate (PEM); it returns both
// paths.
func vendorManifest(t *testing.T, dir string, n int) (manifest, signerPEM string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Vendor Manifest Signer"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true, IsCA: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.RawURLEncoding
	var entries []map[string]any
	for i := range n {
		uid := fmt.Sprintf("01230000000000%04x", i)
		payload, _ := json.Marshal(map[string]any{"version": 1, "model": "ATECC608B", "partNumber": "ATECC608B-TFLXTLS", "uniqueId": uid})
		hdr, _ := json.Marshal(map[string]any{"alg": "ES256", "typ": "JWT", "x5c": []string{base64.StdEncoding.EncodeToString(der)}})
		input := b64.EncodeToString(hdr) + "." + b64.EncodeToString(payload)
		sum := sha256.Sum256([]byte(input))
		r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
		if err != nil {
			t.Fatal(err)
		}
		sig := make([]byte, 64)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
		entries = append(entries, map[string]any{"protected": b64.EncodeToString(hdr), "payload": b64.EncodeToString(payload),
			"signature": b64.EncodeToString(sig), "header": map[string]string{"uniqueId": uid}})
	}
	raw, _ := json.Marshal(entries)
	manifest, signerPEM = filepath.Join(dir, "parts.json"), filepath.Join(dir, "signer.pem")
	os.WriteFile(manifest, raw, 0o644)
	os.WriteFile(signerPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	return manifest, signerPEM
}

func TestBatchImportCLI(t *testing.T) {
	home, dir := t.TempDir(), t.TempDir()
	manifest, signer := vendorManifest(t, dir, 7)
	code, out, errOut := kiln(t, home, "batch", "import", manifest, "--signer", signer, "--json")
	if code != 0 {
		t.Fatalf("import: exit %d\n%s\n%s", code, out, errOut)
	}
	var parts []struct {
		UniqueID, RegistrationID string
		BatchID                  int64
	}
	if err := json.Unmarshal([]byte(out), &parts); err != nil || len(parts) != 7 || parts[2].RegistrationID != "sn012300000000000002" {
		t.Fatalf("import printed %s (%v)", out, err)
	}
	if !strings.Contains(errOut, "import parts.json: import 7/7 (100%)") {
		t.Errorf("no progress line: %q", errOut)
	}
	s := openStore(t, home)
	u, err := s.UnitBySerial(t.Context(), "012300000000000002")
	if err != nil || u.Method != station.MethodX509 || u.Operator != "tester" {
		t.Errorf("imported unit %+v, %v", u, err)
	}
	// A part changed after signing: nothing more is imported.
	raw, _ := os.ReadFile(manifest)
	os.WriteFile(manifest, bytes.Replace(raw, []byte(`"signature":"`), []byte(`"signature":"AA`), 1), 0o644)
	code, _, errOut = kiln(t, home, "batch", "import", manifest, "--signer", signer)
	if code != exitFail || !strings.Contains(errOut, "entry 1") || !strings.Contains(errOut, "nothing was imported") {
		t.Errorf("tampered import: exit %d, %q", code, errOut)
	}
}
