//go:build stepca

// The remote step-ca test builds a real step-ca from the module (about ten
// minutes cold on two cores, so it sits behind the stepca build tag and runs
// in `make e2e`: go test -tags stepca ./pki/). The binary is cached under
// os.UserCacheDir()/kiln-test/, keyed by the module version.

package pki_test

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.step.sm/crypto/jose"

	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

// stepCA returns the path of a step-ca binary built from the module version
// in go.mod, building it on first use.
func stepCA(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "github.com/smallstep/certificates").Output()
	if err != nil {
		t.Fatalf("go list -m github.com/smallstep/certificates: %v", err)
	}
	version := strings.TrimSpace(string(out))
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(cache, "kiln-test", "step-ca-"+version)
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	t.Logf("building step-ca %s into %s (slow the first time)", version, bin)
	gobin := t.TempDir()
	// go install pkg@version builds with step-ca's own go.mod, outside
	// Kiln's module graph, so Kiln's go.sum needs none of step-ca's server
	// dependencies.
	cmd := exec.Command("go", "install", "-tags", "nopkcs11,noyubikey", "github.com/smallstep/certificates/cmd/step-ca@"+version)
	cmd.Dir = gobin
	cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build step-ca: %v\n%s", err, out)
	}
	os.MkdirAll(filepath.Dir(bin), 0o755)
	if err := os.Rename(filepath.Join(gobin, "step-ca"), bin); err != nil {
		t.Fatal(err)
	}
	return bin
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestRemoteStepCA(t *testing.T) {
	bin := stepCA(t)

	// The factory CA's root and intermediate, made with pki itself, and its
	// intermediate key written in clear for step-ca (test material only).
	dir := t.TempDir()
	factory := newCA(t, pki.Config{Dir: filepath.Join(dir, "factory"), Name: "Factory"})
	interKey, err := fastKeys(filepath.Join(dir, "factory")).Signer(t.Context(), pki.IntermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalECPrivateKey(interKey.(*ecdsa.PrivateKey))
	write := func(name string, typ string, b []byte) {
		os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600)
	}
	write("root.crt", "CERTIFICATE", factory.Root().Raw)
	write("intermediate.crt", "CERTIFICATE", factory.Intermediate().Raw)
	write("intermediate.key", "EC PRIVATE KEY", der)

	// A JWK provisioner whose key the CA serves encrypted under password.
	const password = "provisioner password"
	jwk, err := jose.GenerateJWK("EC", "P-256", "ES256", "sig", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := jose.EncryptJWK(jwk, []byte(password))
	if err != nil {
		t.Fatal(err)
	}
	encKey, err := enc.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	pub := jwk.Public()
	addr := freePort(t)
	cfg := map[string]any{
		"root": filepath.Join(dir, "root.crt"), "crt": filepath.Join(dir, "intermediate.crt"), "key": filepath.Join(dir, "intermediate.key"),
		"address": addr, "dnsNames": []string{"127.0.0.1", "localhost"},
		"logger": map[string]any{"format": "text"},
		"authority": map[string]any{
			"provisioners": []any{map[string]any{
				"type": "JWK", "name": "kiln-station", "key": &pub, "encryptedKey": encKey,
				"claims":  map[string]any{"maxTLSCertDuration": "87600h", "defaultTLSCertDuration": "24h"},
				"options": map[string]any{"x509": map[string]any{"template": pki.DefaultLeafTemplate}},
			}},
		},
		"tls": map[string]any{"minVersion": 1.2, "maxVersion": 1.3},
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(filepath.Join(dir, "ca.json"), b, 0o600)

	cmd := exec.Command(bin, filepath.Join(dir, "ca.json"))
	logf, _ := os.Create(filepath.Join(dir, "step-ca.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "step-ca.log"))
			t.Logf("step-ca log:\n%s", out)
		}
	})
	url := "https://" + addr
	roots := x509.NewCertPool()
	roots.AddCert(factory.Root())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}, Timeout: time.Second}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		resp, err := hc.Get(url + "/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("step-ca did not answer on %s: %v", url, err)
		}
	}

	log, err := pki.OpenFileLog(filepath.Join(t.TempDir(), "issuance.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	remote, err := pki.NewRemote(t.Context(), pki.RemoteConfig{
		URL: url, Root: factory.Root(), Provisioner: "kiln-station", Password: []byte(password),
		Profile: pki.Profile{Validity: 30 * 24 * time.Hour, MaxPerBatch: 2}, Log: log,
	})
	if err != nil {
		t.Fatal(err)
	}

	leaf, err := remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r1"), pki.IssueRequest{RegistrationID: "unit-r1", Operator: "ana", Batch: "rb", IncludeRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	verifyChain(t, leaf, factory.Root())
	if !leaf.Chain[1].Equal(factory.Intermediate()) {
		t.Error("the remote leaf is not signed by the factory intermediate")
	}
	if life := time.Until(leaf.Certificate.NotAfter); life < 29*24*time.Hour {
		t.Errorf("remote leaf lifetime %v, want the profile's 30 days", life)
	}

	// Local checks and caps apply before the CA is asked.
	_, err = remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r2"), pki.IssueRequest{RegistrationID: "unit-r3", Batch: "rb"})
	wantKind(t, err, station.KindInvalid, `CSR subject CN "unit-r2" is not the unit's registration ID "unit-r3"`)
	_, err = remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.RSA2048), "unit-r2"), pki.IssueRequest{RegistrationID: "unit-r2", Batch: "rb"})
	wantKind(t, err, station.KindInvalid, "CSR key type RSA-2048 is not allowed")
	if _, err := remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r2"), pki.IssueRequest{RegistrationID: "unit-r2", Batch: "rb"}); err != nil {
		t.Fatal(err)
	}
	_, err = remote.Issue(t.Context(), makeCSR(t, deviceKey(t, pki.ECDSAP256), "unit-r4"), pki.IssueRequest{RegistrationID: "unit-r4", Batch: "rb"})
	wantKind(t, err, station.KindConflict, `batch "rb" has reached its cap of 2`)
	if all, _ := log.Entries(t.Context()); len(all) != 2 {
		t.Errorf("%d issuances logged, want 2", len(all))
	}

	// A wrong provisioner password is refused.
	_, err = pki.NewRemote(t.Context(), pki.RemoteConfig{URL: url, Root: factory.Root(), Provisioner: "kiln-station", Password: []byte("nope"), Log: log})
	wantKind(t, err, station.KindUnauthorized, "kiln-station")
}
