package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

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
