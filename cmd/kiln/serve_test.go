package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

func TestServe(t *testing.T) {
	home := t.TempDir()
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	done := make(chan int)
	go func() {
		e := &env{stdout: pw, stderr: io.Discard, getenv: func(k string) string {
			if k == "KILN_HOME" {
				return home
			}
			return ""
		}}
		done <- run(ctx, []string{"serve", "--json"}, e)
		pw.Close()
	}()
	var info serveInfo
	if err := json.NewDecoder(pr).Decode(&info); err != nil {
		t.Fatalf("kiln serve --json printed no endpoints: %v", err)
	}
	go io.Copy(io.Discard, pr)
	if len(info.IDScope) != 11 || info.GlobalEndpoint == "" || info.Hub == "" {
		t.Errorf("endpoints: %+v", info)
	}

	// The printed connection string and trust bundle work against the printed endpoint.
	caPEM, err := os.ReadFile(info.TrustBundle)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("the trust bundle holds no certificate")
	}
	// The DPS device API over MQTT listens by default, with the same TLS identity.
	if info.MQTT == "" {
		t.Error("kiln serve --json printed no mqtt address")
	} else if mc, err := tls.Dial("tcp", info.MQTT, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}); err != nil {
		t.Errorf("TLS to the MQTT address %s: %v", info.MQTT, err)
	} else {
		mc.Close()
	}
	httpc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	svc, err := dps.NewServiceClient(info.ServiceConnection, dps.ServiceOptions{HTTP: httpc, BaseURL: "https://" + info.GlobalEndpoint})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.PutEnrollment(ctx, &dps.IndividualEnrollment{
		RegistrationID: "serve-test",
		Attestation:    dps.AttestationMechanism{Type: dps.AttestationSymmetricKey},
	}, ""); err != nil {
		t.Fatalf("create an enrollment on kiln serve: %v", err)
	}
	httpc.CloseIdleConnections()

	cancel()
	select {
	case code := <-done:
		if code != exitPass {
			t.Errorf("kiln serve exited %d after Ctrl-C", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("kiln serve did not stop after its context ended")
	}

	// A restart keeps the ID scope.
	ctx2, cancel2 := context.WithCancel(t.Context())
	defer cancel2()
	pr2, pw2 := io.Pipe()
	go func() {
		e := &env{stdout: pw2, stderr: io.Discard, getenv: func(k string) string {
			if k == "KILN_HOME" {
				return home
			}
			return ""
		}}
		run(ctx2, []string{"serve", "--json"}, e)
		pw2.Close()
	}()
	var info2 serveInfo
	if err := json.NewDecoder(pr2).Decode(&info2); err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, pr2)
	if info2.IDScope != info.IDScope {
		t.Errorf("ID scope after restart %s, want %s", info2.IDScope, info.IDScope)
	}
}

func TestServeWithGivenCertificate(t *testing.T) {
	caPEM, cert, err := devserver.NewTLSIdentity()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, "tls.pem"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certPath, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}

	home := t.TempDir()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	pr, pw := io.Pipe()
	go func() {
		e := &env{stdout: pw, stderr: io.Discard, getenv: func(k string) string {
			if k == "KILN_HOME" {
				return home
			}
			return ""
		}}
		run(ctx, []string{"serve", "--json", "--tls-cert", certPath, "--tls-key", keyPath}, e)
		pw.Close()
	}()
	var info serveInfo
	if err := json.NewDecoder(pr).Decode(&info); err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, pr)
	bundle, err := os.ReadFile(info.TrustBundle)
	if err != nil {
		t.Fatal(err)
	}
	if string(bundle) != string(caPEM) {
		t.Error("the trust bundle is not the root of the given chain")
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	conn, err := tls.Dial("tcp", info.GlobalEndpoint, &tls.Config{RootCAs: pool, ServerName: "localhost"})
	if err != nil {
		t.Fatalf("TLS to the DPS with the given certificate: %v", err)
	}
	defer conn.Close()
	if got := conn.ConnectionState().PeerCertificates[0].Raw; string(got) != string(cert.Certificate[0]) {
		t.Error("the DPS does not serve the given certificate")
	}

	code, _, stderr := kiln(t, t.TempDir(), "serve", "--tls-cert", certPath, "--tls-key", certPath)
	if code != exitUsage || !strings.Contains(stderr, "TLS certificate") {
		t.Errorf("a bad key file: exit %d %s", code, stderr)
	}
}

func TestGUINeedsADisplay(t *testing.T) {
	code, _, stderr := kiln(t, t.TempDir(), "gui")
	if code != exitFail || !strings.Contains(stderr, "no display") {
		t.Errorf("kiln gui without DISPLAY: exit %d: %s", code, stderr)
	}
}
