package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServeHubs: kiln serve --hubs links several hubs served by the one
// embedded hub, prints their names (with the hub's port) and serves a TLS
// certificate that covers them; bad --hubs and --latency-map values are
// usage errors that say what to write.
func TestServeHubs(t *testing.T) {
	home := t.TempDir()
	getenv := func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}
	lat := filepath.Join(home, "latency.txt")
	if err := os.WriteFile(lat, []byte("127.0.0.0/8 hub-b.localhost 1ms\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"serve", "--json", "--hubs", "hub-a.localhost=3, hub-b.localhost", "--latency-map", lat}, &env{stdout: pw, stderr: io.Discard, getenv: getenv})
		pw.Close()
	}()
	var info serveInfo
	if err := json.NewDecoder(pr).Decode(&info); err != nil {
		t.Fatalf("kiln serve --json printed no endpoints: %v", err)
	}
	go io.Copy(io.Discard, pr)
	_, port, _ := net.SplitHostPort(info.Hub)
	if got, want := strings.Join(info.Hubs, ","), "hub-a.localhost:"+port+",hub-b.localhost:"+port; got != want {
		t.Errorf("hubs %q, want %q", got, want)
	}
	ca, err := os.ReadFile(info.TrustBundle)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	for _, host := range []string{"hub-a.localhost", "hub-b.localhost"} {
		c, err := tls.Dial("tcp", info.Hub, &tls.Config{RootCAs: pool, ServerName: host})
		if err != nil {
			t.Errorf("TLS to the hub as %s: %v", host, err)
			continue
		}
		c.Close()
	}
	cancel()
	select {
	case code := <-done:
		if code != exitPass {
			t.Errorf("kiln serve exited %d after Ctrl-C", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("kiln serve did not stop")
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--hubs", "hub-a.localhost=0"}, "not 1 to 1000"},
		{[]string{"--hubs", "hub-a.localhost", "--latency-map", filepath.Join(home, "missing.txt")}, "--latency-map"},
	} {
		var stderr bytes.Buffer
		code := run(t.Context(), append([]string{"serve"}, c.args...), &env{stdout: io.Discard, stderr: &stderr, getenv: getenv})
		if code != exitUsage || !strings.Contains(stderr.String(), c.want) {
			t.Errorf("serve %v: exit %d, %q; want %d with %q", c.args, code, stderr.String(), exitUsage, c.want)
		}
	}
}
