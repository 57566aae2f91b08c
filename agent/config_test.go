package agent_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/agent"
	"github.com/kilnworks/kiln/station"
)

// testCertPEM returns a self-signed certificate, PEM.
func testCertPEM(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

var goodConfig = station.DeviceConfig{IDScope: "0ne00AB12CD", GlobalEndpoint: "127.0.0.1:8443", RegistrationID: "sn-0001"}

func TestValidateConfig(t *testing.T) {
	cert := testCertPEM(t)
	tests := []struct {
		name string
		edit func(*station.DeviceConfig)
		ok   bool
	}{
		{"good", func(*station.DeviceConfig) {}, true},
		{"host only", func(c *station.DeviceConfig) { c.GlobalEndpoint = "global.azure-devices-provisioning.net" }, true},
		{"https prefix", func(c *station.DeviceConfig) { c.GlobalEndpoint = "https://dps.example:443" }, true},
		{"trust bundle of two certs", func(c *station.DeviceConfig) { c.TrustBundle = cert + "\n" + cert }, true},
		{"no ID scope", func(c *station.DeviceConfig) { c.IDScope = "" }, false},
		{"ID scope with a slash", func(c *station.DeviceConfig) { c.IDScope = "0ne/x" }, false},
		{"no endpoint", func(c *station.DeviceConfig) { c.GlobalEndpoint = "" }, false},
		{"endpoint with a path", func(c *station.DeviceConfig) { c.GlobalEndpoint = "dps.example/x" }, false},
		{"no registration ID", func(c *station.DeviceConfig) { c.RegistrationID = "" }, false},
		{"upper-case registration ID", func(c *station.DeviceConfig) { c.RegistrationID = "SN-0001" }, false},
		{"registration ID ending in a separator", func(c *station.DeviceConfig) { c.RegistrationID = "sn-" }, false},
		{"trust bundle not PEM", func(c *station.DeviceConfig) { c.TrustBundle = "hello" }, false},
		{"trust bundle with a key", func(c *station.DeviceConfig) {
			c.TrustBundle = cert + string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}))
		}, false},
		{"trust bundle with a broken cert", func(c *station.DeviceConfig) {
			c.TrustBundle = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}}))
		}, false},
		{"trust bundle with trailing text", func(c *station.DeviceConfig) { c.TrustBundle = cert + "junk" }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := goodConfig
			tt.edit(&cfg)
			err := agent.ValidateConfig(cfg)
			if tt.ok && err != nil {
				t.Errorf("ValidateConfig = %v, want nil", err)
			}
			if !tt.ok && station.KindOf(err) != station.KindInvalid {
				t.Errorf("ValidateConfig = %v, want an Invalid error", err)
			}
		})
	}
}

func TestFileStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state") // created by Save
	path := filepath.Join(dir, "config.json")
	s := agent.NewFileStore(path)

	_, err := s.Load(t.Context())
	if k := station.KindOf(err); k != station.KindNotFound {
		t.Fatalf("Load before Save: kind %v (%v), want not found", k, err)
	}
	want := goodConfig
	want.TrustBundle = testCertPEM(t)
	if err := s.Save(t.Context(), want); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Errorf("config file mode %v, want 0600", m)
	}
	got, err := agent.NewFileStore(path).Load(t.Context()) // as after a restart
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Load after Save (-want +got):\n%s", diff)
	}

	// A second Save replaces the file by rename: a reader holding the old
	// file still sees the old config, and no temporary file is left.
	old, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	next := goodConfig
	next.RegistrationID = "sn-0002"
	if err := s.Save(t.Context(), next); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := old.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	if !strings.Contains(b.String(), `"sn-0001"`) {
		t.Errorf("the file open before the second Save changed under its reader: %s", b.String())
	}
	got, err = s.Load(t.Context())
	if err != nil || got.RegistrationID != "sn-0002" {
		t.Errorf("Load after the second Save = %+v, %v", got, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("directory holds %v, want only config.json", names)
	}

	// A corrupt file is Invalid.
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(t.Context()); station.KindOf(err) != station.KindInvalid {
		t.Errorf("Load of a corrupt file = %v, want Invalid", err)
	}
}

func TestMemoryStore(t *testing.T) {
	var s agent.MemoryStore
	if _, err := s.Load(t.Context()); station.KindOf(err) != station.KindNotFound {
		t.Fatalf("Load of an empty store = %v, want NotFound", err)
	}
	if err := s.Save(t.Context(), goodConfig); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load(t.Context())
	if err != nil || got != goodConfig {
		t.Errorf("Load = %+v, %v", got, err)
	}
}
