package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// TestSupervisorPassword: the password is stored as a scrypt hash in a
// private file, the right one logs in, a wrong one is Unauthorized, none set
// is NotFound with the command that sets one, and nothing of the password
// reaches the log.
func TestSupervisorPassword(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "home", supervisorFile)
	var logBuf bytes.Buffer
	a := &guiAuth{path: path, log: slog.New(slog.NewTextHandler(&logBuf, nil))}

	err := a.Supervisor(ctx, "ana", "whatever1")
	if station.KindOf(err) != station.KindNotFound || !strings.Contains(err.Error(), "--set-supervisor-password") {
		t.Fatalf("no password set: %v (kind %v), want NotFound naming the flag", err, station.KindOf(err))
	}
	if err := setSupervisorPassword(path, "short", 1024); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a 5-character password: %v, want Invalid", err)
	}
	const pw = "correct horse 42"
	if err := setSupervisorPassword(path, pw, 1024); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("password file mode %v, want 0600", st.Mode().Perm())
	}
	data, _ := os.ReadFile(path)
	if bytes.Contains(data, []byte(pw)) || !bytes.Contains(data, []byte(`"kdf": "scrypt"`)) {
		t.Errorf("the file holds the password or no scrypt hash:\n%s", data)
	}

	if err := a.Supervisor(ctx, "ana", pw); err != nil {
		t.Errorf("the right password: %v", err)
	}
	for _, wrong := range []string{"", "correct horse 43", "Correct horse 42", pw + " "} {
		if err := a.Supervisor(ctx, "ana", wrong); station.KindOf(err) != station.KindUnauthorized {
			t.Errorf("password %q: %v, want Unauthorized", wrong, err)
		}
	}

	// A new password replaces the old one, with a new salt.
	if err := setSupervisorPassword(path, "another one 7", 1024); err != nil {
		t.Fatal(err)
	}
	data2, _ := os.ReadFile(path)
	if bytes.Equal(data, data2) {
		t.Error("setting a new password left the file as it was")
	}
	if err := a.Supervisor(ctx, "ana", pw); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("the old password after a change: %v, want Unauthorized", err)
	}
	if err := a.Supervisor(ctx, "ana", "another one 7"); err != nil {
		t.Errorf("the new password: %v", err)
	}

	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.Supervisor(ctx, "ana", pw); station.KindOf(err) != station.KindInternal {
		t.Errorf("a damaged file: %v, want Internal", err)
	}
	if strings.Contains(logBuf.String(), "correct horse") || strings.Contains(logBuf.String(), "another one") {
		t.Errorf("the log holds a password:\n%s", logBuf.String())
	}
	if !strings.Contains(logBuf.String(), "supervisor login refused") || !strings.Contains(logBuf.String(), "operator=ana") {
		t.Errorf("the log does not record the refused login and who tried:\n%s", logBuf.String())
	}
}

// TestReadNewPasswordPipe: from a pipe the first line is the password.
func TestReadNewPasswordPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() { io.WriteString(w, "line one pw\r\nsecond\n"); w.Close() }()
	got, err := readNewPassword(r, io.Discard)
	if err != nil || got != "line one pw" {
		t.Errorf("readNewPassword = %q, %v; want the first line", got, err)
	}
}

// TestOutboxAndCloudTiles: the Outbox tile counts the units of sealed
// batches in a real store (the outbox items of pushes are counted by
// TestGUIBatchesPushToDevserver); the Cloud target tile dials the
// production endpoint (a real listener, then a closed port).
func TestOutboxAndCloudTiles(t *testing.T) {
	ctx := t.Context()
	s, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, err := outboxStatus(ctx, s); err != nil || got != "empty" {
		t.Errorf("empty store: %q, %v", got, err)
	}
	t0 := time.Date(2025, 3, 4, 8, 0, 0, 0, time.UTC)
	addBatch := func(name string, serials []string, states ...station.BatchState) {
		b := &station.Batch{Name: name, Created: t0}
		if err := s.CreateBatch(ctx, b); err != nil {
			t.Fatal(err)
		}
		for _, serial := range serials {
			r := &station.Run{Serial: serial, Station: "l", Operator: "ana", Method: station.MethodTPM, Started: t0}
			if err := s.CreateRun(ctx, r); err != nil {
				t.Fatal(err)
			}
			r.Result, r.Finished = station.ResultPass, t0.Add(time.Second)
			if err := s.FinishRun(ctx, r); err != nil {
				t.Fatal(err)
			}
			ek := []byte("ek " + serial)
			if err := s.RecordUnit(ctx, &station.Unit{Serial: serial, RegistrationID: strings.ToLower(serial), Method: station.MethodTPM, EKHash: station.EKHash(ek), EKPublic: ek, RunID: r.ID, Created: t0}); err != nil {
				t.Fatal(err)
			}
			if err := s.AddUnit(ctx, b.ID, serial); err != nil {
				t.Fatal(err)
			}
		}
		from := station.BatchOpen
		for _, to := range states {
			if err := s.Transition(ctx, b.ID, from, to); err != nil {
				t.Fatal(err)
			}
			from = to
		}
	}
	addBatch("a", []string{"A1", "A2", "A3"}, station.BatchSealed, station.BatchPushing, station.BatchPushed) // gone
	addBatch("b", []string{"B1", "B2"}, station.BatchSealed)
	addBatch("c", []string{"C1"}, station.BatchSealed, station.BatchPushing)
	addBatch("d", []string{"D1", "D2", "D3", "D4"}) // open: still filling
	if got, err := outboxStatus(ctx, s); err != nil || got != "2 units sealed" {
		t.Errorf("outbox %q, %v; want 2 units sealed", got, err)
	}

	// The Batches screen's Seal moves the open batch into the outbox.
	home := t.TempDir()
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
	g, _, err := newGUIBatches(e, c, s, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	open, err := s.OpenBatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Seal(ctx, open.ID); err != nil {
		t.Fatal(err)
	}
	if got, _ := outboxStatus(ctx, s); got != "6 units sealed" {
		t.Errorf("after sealing: outbox %q, want 6 units sealed", got)
	}
	if err := g.Seal(ctx, open.ID); station.KindOf(err) != station.KindConflict {
		t.Errorf("sealing a sealed batch: %v, want Conflict", err)
	}
	if err := g.Push(ctx, open.ID, nil); station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "no DPS target") {
		t.Errorf("push without a target: %v, want Invalid naming the missing target", err)
	}

	var d net.Dialer
	if got, err := cloudStatus(ctx, nil, nil, d.DialContext); err != nil || got != "none configured" {
		t.Errorf("no production DPS: %q, %v", got, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	prod := &station.DeviceConfig{IDScope: "0ne0001", GlobalEndpoint: addr}
	if got, err := cloudStatus(ctx, nil, prod, d.DialContext); err != nil || got != "reachable" {
		t.Errorf("a listening target: %q, %v", got, err)
	}
	ln.Close()
	_, err = cloudStatus(ctx, nil, prod, d.DialContext)
	if station.KindOf(err) != station.KindUnavailable || !strings.Contains(err.Error(), addr) {
		t.Errorf("a closed target: %v, want Unavailable naming %s", err, addr)
	}
	// A host name without a port is dialled on 443.
	var dialled string
	fake := func(_ context.Context, _, a string) (net.Conn, error) {
		dialled = a
		return nil, net.UnknownNetworkError("test")
	}
	cloudStatus(ctx, nil, &station.DeviceConfig{GlobalEndpoint: "contoso.azure-devices-provisioning.net"}, fake)
	if dialled != "contoso.azure-devices-provisioning.net:443" {
		t.Errorf("dialled %q, want port 443", dialled)
	}
}
