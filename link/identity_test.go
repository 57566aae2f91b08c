package link_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// fakeIdentity is a link.Identity that keeps what it is told in memory; its
// "CSR" is the request's common name, so tests can see it arrived.
type fakeIdentity struct {
	mu    sync.Mutex
	gens  atomic.Int32
	delay time.Duration
	key   bool
	chain [][]byte
	reg   string
	sym   []byte
}

func (f *fakeIdentity) GenerateKey(ctx context.Context, req station.KeyRequest) (station.GeneratedKey, error) {
	f.gens.Add(1)
	time.Sleep(f.delay)
	if req.Storage == station.KeyInTPM {
		return station.GeneratedKey{}, station.Errorf("generate key", station.KindNotFound, "this DUT has no TPM: ask for storage software")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.key, f.chain = true, nil
	return station.GeneratedKey{CSR: []byte("csr:" + req.CommonName + ":" + req.Type), Storage: station.KeyInSoftware}, nil
}

func (f *fakeIdentity) WriteCertChain(_ context.Context, chain [][]byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.key {
		return station.Errorf("write chain", station.KindInvalid, "no key generated yet: run GENERATE KEY first")
	}
	f.chain = chain
	return nil
}

func (f *fakeIdentity) WriteSymmetricKey(_ context.Context, regID string, key []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reg, f.sym = regID, bytes.Clone(key)
	return nil
}

func (f *fakeIdentity) ReadIdentity(context.Context) (station.DeviceIdentity, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := station.DeviceIdentity{CertChain: f.chain, SymKeyRegistrationID: f.reg}
	if f.key {
		id.KeyStorage = station.KeyInSoftware
	}
	if f.sym != nil {
		h := sha256.Sum256(f.sym)
		id.SymKeySHA256 = hex.EncodeToString(h[:])
	}
	return id, nil
}

// held returns the stored symmetric key and chain.
func (f *fakeIdentity) held() ([]byte, [][]byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sym, f.chain
}

// exerciseIdentity runs every identity command through c against f.
func exerciseIdentity(t *testing.T, c *link.Client, f *fakeIdentity) {
	t.Helper()
	ctx := t.Context()
	if err := c.WriteCertChain(ctx, [][]byte{[]byte("leaf")}); station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "GENERATE KEY") {
		t.Errorf("WriteCertChain before a key: %v, want the agent's Invalid", err)
	}
	_, err := c.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-1", Storage: station.KeyInTPM})
	if k := station.KindOf(err); k != station.KindNotFound {
		t.Errorf("GenerateKey in a TPM the DUT lacks: kind %v (%v), want not found", k, err)
	}
	g, err := c.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-1", Type: "RSA-2048"})
	if err != nil {
		t.Fatal(err)
	}
	if want := (station.GeneratedKey{CSR: []byte("csr:sn-1:RSA-2048"), Storage: station.KeyInSoftware}); !cmp.Equal(g, want) {
		t.Errorf("GenerateKey = %+v, want %+v", g, want)
	}
	// Chains carry zeros and 0xff bytes unharmed, several certificates long.
	chain := [][]byte{bytes.Repeat([]byte{0x30, 0, 0xff}, 700), {0x30, 0x82, 0, 1}, {0x30, 0}}
	if err := c.WriteCertChain(ctx, chain); err != nil {
		t.Fatal(err)
	}
	key := bytes.Repeat([]byte{0, 0xa5}, 16)
	if err := c.WriteSymmetricKey(ctx, "sn-1", key); err != nil {
		t.Fatal(err)
	}
	id, err := c.ReadIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(key)
	want := station.DeviceIdentity{CertChain: chain, KeyStorage: station.KeyInSoftware, SymKeyRegistrationID: "sn-1", SymKeySHA256: hex.EncodeToString(h[:])}
	if diff := cmp.Diff(want, id); diff != "" {
		t.Errorf("ReadIdentity (-want +got):\n%s", diff)
	}
	if sym, _ := f.held(); !bytes.Equal(sym, key) {
		t.Error("the agent did not receive the key as sent")
	}
}

func TestIdentityRoundTrip(t *testing.T) {
	f := &fakeIdentity{}
	var scfg link.ServeConfig
	link.AddIdentity(&scfg, f)
	c, _ := pair(t, newFake(), link.Config{}, scfg, nil, nil)
	exerciseIdentity(t, c, f)
}

// TestIdentityOverPTY runs the identity commands over a real pty opened
// with go.bug.st/serial, as the station opens a DUT.
func TestIdentityOverPTY(t *testing.T) {
	master, path := openPTY(t)
	f := &fakeIdentity{}
	var scfg link.ServeConfig
	link.AddIdentity(&scfg, f)
	serve(t, master, newFake(), scfg)
	c, err := link.Open(t.Context(), path, link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	exerciseIdentity(t, c, f)
}

// TestGenerateKeyTimeout: key generation may outlast the config timeout;
// it has its own, and a retransmission while the agent works does not make
// it generate twice.
func TestGenerateKeyTimeout(t *testing.T) {
	f := &fakeIdentity{delay: 300 * time.Millisecond}
	var scfg link.ServeConfig
	link.AddIdentity(&scfg, f)
	c, _ := pair(t, newFake(), link.Config{ConfigTimeout: 50 * time.Millisecond, KeyGenTimeout: time.Second}, scfg, nil, nil)
	if _, err := c.GenerateKey(t.Context(), station.KeyRequest{CommonName: "sn-2"}); err != nil {
		t.Fatalf("GenerateKey taking 300ms with a 1s key timeout: %v", err)
	}
	if n := f.gens.Load(); n != 1 {
		t.Errorf("the agent generated %d keys, want 1", n)
	}

	f2 := &fakeIdentity{delay: 150 * time.Millisecond}
	var scfg2 link.ServeConfig
	link.AddIdentity(&scfg2, f2)
	c2, _ := pair(t, newFake(), link.Config{KeyGenTimeout: 100 * time.Millisecond, Attempts: 3}, scfg2, nil, nil)
	if _, err := c2.GenerateKey(t.Context(), station.KeyRequest{CommonName: "sn-3"}); err != nil {
		t.Fatalf("GenerateKey answered after one retransmission: %v", err)
	}
	if n := f2.gens.Load(); n != 1 {
		t.Errorf("a retransmitted GENERATE KEY ran %d times, want 1 (answered from the cache)", n)
	}
}

func TestIdentityClientChecks(t *testing.T) {
	f := &fakeIdentity{}
	var scfg link.ServeConfig
	link.AddIdentity(&scfg, f)
	c, _ := pair(t, newFake(), link.Config{}, scfg, nil, nil)
	ctx := t.Context()
	for name, err := range map[string]error{
		"no CN":         func() error { _, err := c.GenerateKey(ctx, station.KeyRequest{}); return err }(),
		"empty chain":   c.WriteCertChain(ctx, nil),
		"long chain":    c.WriteCertChain(ctx, make([][]byte, link.MaxChain+1)),
		"empty cert":    c.WriteCertChain(ctx, [][]byte{{}}),
		"short key":     c.WriteSymmetricKey(ctx, "sn-1", make([]byte, 8)),
		"no reg ID":     c.WriteSymmetricKey(ctx, "", make([]byte, 32)),
		"chain too big": c.WriteCertChain(ctx, [][]byte{make([]byte, 20000)}),
	} {
		if k := station.KindOf(err); k != station.KindInvalid {
			t.Errorf("%s: kind %v (%v), want invalid", name, k, err)
		}
	}
	if sym, _ := f.held(); f.gens.Load() != 0 || sym != nil {
		t.Error("a request the client refuses reached the agent")
	}
}

// TestIdentityAgentRefusesBadPayload: a payload the agent cannot decode is
// Invalid and never reaches the handler.
func TestIdentityAgentRefusesBadPayload(t *testing.T) {
	f := &fakeIdentity{}
	var scfg link.ServeConfig
	link.AddIdentity(&scfg, f)
	a, b := duplex()
	serve(t, b, newFake(), scfg)
	defer a.Close()
	dec := link.NewDecoder(a, 0)
	ask := func(fr link.Frame) link.Frame {
		t.Helper()
		go a.Write(link.AppendFrame(nil, fr))
		got, err := dec.Next()
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if r := ask(helloExample); r.Type != link.TypeResponse {
		t.Fatalf("HELLO answered with %v", r.Type)
	}
	for i, fr := range []link.Frame{
		{Cmd: link.CmdKeyCSR, Payload: []byte{0x02, 0, 9, 'x'}},
		{Cmd: link.CmdKeyCSR, Payload: []byte{0x01, 0, 1, 'x'}},
		{Cmd: link.CmdWriteSymKey, Payload: link.EncodeSymmetricKey("sn-1", []byte("short"))},
		{Cmd: link.CmdWriteCertChain, Payload: nil},
	} {
		fr.Type, fr.Seq = link.TypeRequest, uint16(10+i)
		got := ask(fr)
		if got.Type != link.TypeError || station.Kind(got.Payload[0]) != station.KindInvalid || !strings.Contains(string(got.Payload), "disagree") {
			t.Errorf("request %d: %v %q, want an Invalid error", i, got.Type, got.Payload)
		}
		if strings.Contains(string(got.Payload), "short") {
			t.Errorf("request %d: the error quotes the key bytes: %q", i, got.Payload)
		}
	}
	if sym, chain := f.held(); f.gens.Load() != 0 || sym != nil || chain != nil {
		t.Error("a malformed request reached the handler")
	}
}

func TestIdentityDecoders(t *testing.T) {
	h := sha256.Sum256([]byte("k"))
	fp := hex.EncodeToString(h[:])
	idOK := station.DeviceIdentity{CertChain: [][]byte{{1}, {2}}, KeyStorage: "tpm", SymKeyRegistrationID: "r", SymKeySHA256: fp}
	got, err := link.DecodeIdentity(link.EncodeIdentity(idOK))
	if err != nil || !cmp.Equal(got, idOK) {
		t.Errorf("identity round trip = %+v, %v", got, err)
	}
	if got, err := link.DecodeIdentity(nil); err != nil || !cmp.Equal(got, station.DeviceIdentity{}, cmpopts.EquateEmpty()) {
		t.Errorf("empty identity = %+v, %v", got, err)
	}
	bad := []struct {
		name string
		err  error
	}{
		{"identity: hash without reg ID", func() error {
			_, err := link.DecodeIdentity(link.EncodeIdentity(station.DeviceIdentity{SymKeySHA256: fp}))
			return err
		}()},
		{"identity: short hash", func() error { _, err := link.DecodeIdentity([]byte{0x04, 0, 1, 7}); return err }()},
		{"key request: twice a CN", func() error {
			_, err := link.DecodeKeyRequest(append(link.EncodeKeyRequest(station.KeyRequest{CommonName: "a"}), 0x02, 0, 1, 'b'))
			return err
		}()},
		{"key request: CN not UTF-8", func() error { _, err := link.DecodeKeyRequest([]byte{0x02, 0, 1, 0xff}); return err }()},
		{"key request: CN too long", func() error {
			_, err := link.DecodeKeyRequest(link.EncodeKeyRequest(station.KeyRequest{CommonName: strings.Repeat("a", 129)}))
			return err
		}()},
		{"generated key: no CSR", func() error { _, err := link.DecodeGeneratedKey([]byte{0x01, 0, 3, 't', 'p', 'm'}); return err }()},
		{"generated key: truncated", func() error { _, err := link.DecodeGeneratedKey([]byte{0x01, 0}); return err }()},
		{"chain: empty certificate", func() error { _, err := link.DecodeCertChain(link.EncodeCertChain([][]byte{{}})); return err }()},
		{"chain: too long", func() error {
			_, err := link.DecodeCertChain(link.EncodeCertChain(slices.Repeat([][]byte{{0x30, 0}}, 9)))
			return err
		}()},
		{"symkey: too long", func() error {
			_, _, err := link.DecodeSymmetricKey(link.EncodeSymmetricKey("r", make([]byte, 65)))
			return err
		}()},
	}
	for _, b := range bad {
		if b.err == nil {
			t.Errorf("%s: decoded", b.name)
		}
	}
}
