package agent_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kilnworks/kiln/agent"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// recTPM passes commands to a TPM and records their command codes and the
// public areas that TPM2_Create returned.
type recTPM struct {
	next    transport.TPM
	mu      sync.Mutex
	codes   []tpm2.TPMCC
	created [][]byte // TPM2B_PUBLIC of each successful TPM2_Create
}

func (r *recTPM) Send(cmd []byte) ([]byte, error) {
	rsp, err := r.next.Send(cmd)
	if len(cmd) < 10 {
		return rsp, err
	}
	cc := tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))
	r.mu.Lock()
	defer r.mu.Unlock()
	r.codes = append(r.codes, cc)
	// TPM2_Create response: header (10), parameterSize (4), outPrivate,
	// outPublic, ...
	if cc == tpm2.TPMCCCreate && err == nil && len(rsp) > 16 && binary.BigEndian.Uint32(rsp[6:10]) == 0 {
		p := rsp[14:]
		n := int(binary.BigEndian.Uint16(p))
		if len(p) >= 2+n+2 {
			p = p[2+n:]
			m := int(binary.BigEndian.Uint16(p))
			if len(p) >= 2+m {
				r.created = append(r.created, bytes.Clone(p[:2+m]))
			}
		}
	}
	return rsp, err
}

// count returns how many commands with code cc were sent.
func (r *recTPM) count(cc tpm2.TPMCC) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.codes {
		if c == cc {
			n++
		}
	}
	return n
}

// openSimTPM opens the TPM simulator for one test, wrapped in a recorder.
func openSimTPM(t *testing.T) *recTPM {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	return &recTPM{next: sim}
}

// issue signs a leaf for the public key of a CSR with ca, as the station CA
// would: client authentication, the CSR's subject.
func issue(t *testing.T, ca *fixtures.CA, csrDER []byte) *x509.Certificate {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("CSR signature: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: csr.Subject.CommonName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, csr.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newCA(t *testing.T, name string) *fixtures.CA {
	t.Helper()
	ca, err := fixtures.NewCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// TestGenerateKeyInTPM proves the key is TPM-resident: the CSR's public key
// is the public area TPM2_Create returned, its attributes bind the private
// part to the TPM, and the CSR was signed by TPM2_Sign.
func TestGenerateKeyInTPM(t *testing.T) {
	for _, typ := range []string{"", hsm.KeyRSA2048} {
		t.Run("type="+typ, func(t *testing.T) {
			tpm := openSimTPM(t)
			dir := t.TempDir()
			a, err := agent.New(agent.Config{TPM: tpm, DataDir: dir})
			if err != nil {
				t.Fatal(err)
			}
			c := connect(t, a)
			g, err := c.GenerateKey(t.Context(), station.KeyRequest{CommonName: "sn-tpm-1", Type: typ})
			if err != nil {
				t.Fatal(err)
			}
			if g.Storage != station.KeyInTPM {
				t.Errorf("storage %q, want tpm (the DUT has a TPM)", g.Storage)
			}
			csr, err := x509.ParseCertificateRequest(g.CSR)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Errorf("CSR signature: %v", err)
			}
			if csr.Subject.CommonName != "sn-tpm-1" {
				t.Errorf("CSR CN %q", csr.Subject.CommonName)
			}
			// Two objects were created: the signing key and the sealed
			// data-encryption key (which has no public key).
			var keys [][]byte
			for _, c := range tpm.created {
				if _, _, err := hsm.ParsePublic(c); err == nil {
					keys = append(keys, c)
				}
			}
			if len(keys) != 1 || len(tpm.created) != 2 {
				t.Fatalf("TPM2_Create made %d objects, %d of them keys; want 2 and 1", len(tpm.created), len(keys))
			}
			pub, area, err := hsm.ParsePublic(keys[0])
			if err != nil {
				t.Fatal(err)
			}
			if k, ok := csr.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
				t.Error("the CSR's public key is not the TPM object's public area")
			}
			if at := area.ObjectAttributes; !at.FixedTPM || !at.FixedParent || !at.SensitiveDataOrigin {
				t.Errorf("TPM key attributes %+v: the private part could leave the TPM", at)
			}
			if n := tpm.count(tpm2.TPMCCSign); n != 1 {
				t.Errorf("%d TPM2_Sign commands, want 1 (the CSR)", n)
			}
			// At rest: owner-only files, secrets encrypted.
			for _, name := range []string{"key.json", "dek.tpm"} {
				fi, err := os.Stat(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				if fi.Mode().Perm() != 0o600 {
					t.Errorf("%s has mode %v, want 0600", name, fi.Mode().Perm())
				}
			}
			kb, _ := os.ReadFile(filepath.Join(dir, "key.json"))
			if !strings.Contains(string(kb), `"enc":"tpm-sealed-aes-256-gcm"`) || strings.Contains(string(kb), "tpm_public") {
				t.Errorf("key.json is not encrypted: %.80s", kb)
			}
			id, err := c.ReadIdentity(t.Context())
			if err != nil || id.KeyStorage != station.KeyInTPM || len(id.CertChain) != 0 {
				t.Errorf("ReadIdentity = %+v, %v; want a TPM key and no chain", id, err)
			}
		})
	}
}

// TestCertChainAndRestart writes a chain for a TPM key, restarts the agent
// on the same data directory and TPM, and finds the identity again.
func TestCertChainAndRestart(t *testing.T) {
	tpm := openSimTPM(t)
	dir := t.TempDir()
	a, err := agent.New(agent.Config{TPM: tpm, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	ca := newCA(t, "agent test root")
	inter, err := ca.NewIntermediate("agent test intermediate")
	if err != nil {
		t.Fatal(err)
	}
	// No key yet: Invalid, naming GENERATE KEY.
	other := issue(t, inter, csrFor(t, "sn-x"))
	if err := a.WriteCertChain(ctx, [][]byte{other.Raw}); station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "GENERATE KEY") {
		t.Errorf("chain before any key: %v, want Invalid naming GENERATE KEY", err)
	}
	g, err := a.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-chain-1"})
	if err != nil {
		t.Fatal(err)
	}
	leaf := issue(t, inter, g.CSR)
	// A leaf for another key is refused.
	err = a.WriteCertChain(ctx, [][]byte{other.Raw, inter.Cert.Raw})
	if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "not for this DUT's key") {
		t.Errorf("a leaf of another key: %v, want Invalid", err)
	}
	// A chain out of order is refused.
	if err := a.WriteCertChain(ctx, [][]byte{leaf.Raw, ca.Cert.Raw, inter.Cert.Raw}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a chain out of order: %v, want Invalid", err)
	}
	if err := a.WriteCertChain(ctx, [][]byte{[]byte("not DER")}); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a chain that does not parse: %v, want Invalid", err)
	}
	if id, _ := a.ReadIdentity(ctx); len(id.CertChain) != 0 {
		t.Fatal("a refused chain was stored")
	}
	want := [][]byte{leaf.Raw, inter.Cert.Raw}
	if err := a.WriteCertChain(ctx, want); err != nil {
		t.Fatal(err)
	}

	// Restart: a new agent on the same directory and TPM.
	b, err := agent.New(agent.Config{TPM: tpm, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	id, err := b.ReadIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if id.KeyStorage != station.KeyInTPM || len(id.CertChain) != 2 || !bytes.Equal(id.CertChain[0], want[0]) || !bytes.Equal(id.CertChain[1], want[1]) {
		t.Errorf("after restart: %+v", id)
	}
	// A new key forgets the chain of the old one.
	if _, err := b.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-chain-1"}); err != nil {
		t.Fatal(err)
	}
	if id, _ := b.ReadIdentity(ctx); len(id.CertChain) != 0 {
		t.Error("the chain of the replaced key is still stored")
	}
	// An agent without the TPM cannot read the sealed files.
	c, err := agent.New(agent.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadIdentity(ctx); station.KindOf(err) != station.KindNotFound || !strings.Contains(err.Error(), "--tpm") {
		t.Errorf("reading TPM-sealed files without the TPM: %v, want NotFound naming --tpm", err)
	}
}

// csrFor makes a CSR with a throwaway software key.
func csrFor(t *testing.T, cn string) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestGenerateKeyInSoftware(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kiln-agent") // the agent creates it
	a, err := agent.New(agent.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	c := connect(t, a)
	ctx := t.Context()
	_, err = c.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-sw-1", Storage: station.KeyInTPM})
	if station.KindOf(err) != station.KindNotFound || !strings.Contains(err.Error(), "--tpm") {
		t.Errorf("storage tpm without a TPM: %v, want NotFound", err)
	}
	for _, bad := range []station.KeyRequest{
		{CommonName: "sn-1", Type: "EC-P384"},
		{CommonName: "sn-1", Storage: "hsm"},
		{CommonName: "not a registration id!"},
	} {
		if _, err := c.GenerateKey(ctx, bad); station.KindOf(err) != station.KindInvalid {
			t.Errorf("GenerateKey(%+v): %v, want Invalid", bad, err)
		}
	}
	for _, typ := range []string{hsm.KeyECP256, hsm.KeyRSA2048} {
		g, err := c.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-sw-1", Type: typ})
		if err != nil {
			t.Fatal(err)
		}
		if g.Storage != station.KeyInSoftware {
			t.Errorf("storage %q, want software", g.Storage)
		}
		csr, err := x509.ParseCertificateRequest(g.CSR)
		if err != nil {
			t.Fatal(err)
		}
		if err := csr.CheckSignature(); err != nil {
			t.Errorf("%s CSR: %v", typ, err)
		}
		switch csr.PublicKey.(type) {
		case *ecdsa.PublicKey:
			if typ != hsm.KeyECP256 {
				t.Errorf("%s made an ECDSA key", typ)
			}
		case *rsa.PublicKey:
			if typ != hsm.KeyRSA2048 {
				t.Errorf("%s made an RSA key", typ)
			}
		}
		ca := newCA(t, "sw root")
		leaf := issue(t, ca, g.CSR)
		if err := c.WriteCertChain(ctx, [][]byte{leaf.Raw, ca.Cert.Raw}); err != nil {
			t.Fatalf("chain for the software key: %v", err)
		}
	}
	fi, err := os.Stat(filepath.Join(dir, "key.json"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key.json mode %v, want 0600", fi.Mode().Perm())
	}
	if di, err := os.Stat(dir); err != nil || di.Mode().Perm() != 0o700 {
		t.Errorf("data dir: %v, %v; want mode 0700", di, err)
	}
}

// TestSymmetricKeyNeverReturned: the key is stored, read back only as a
// fingerprint, and appears neither in the agent's log nor, with a TPM, in
// the file that holds it.
func TestSymmetricKeyNeverReturned(t *testing.T) {
	tpm := openSimTPM(t)
	dir := t.TempDir()
	var logBuf bytes.Buffer
	var logMu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&logMu, &logBuf}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, err := agent.New(agent.Config{TPM: tpm, DataDir: dir, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	c := connect(t, a)
	ctx := t.Context()
	key := make([]byte, 32)
	rand.Read(key)
	if err := c.WriteSymmetricKey(ctx, "sn-sym-1", key[:8]); station.KindOf(err) != station.KindInvalid {
		t.Errorf("an 8-byte key: %v, want Invalid", err)
	}
	if err := c.WriteSymmetricKey(ctx, "sn-sym-1", key); err != nil {
		t.Fatal(err)
	}
	id, err := c.ReadIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(key)
	if id.SymKeyRegistrationID != "sn-sym-1" || id.SymKeySHA256 != hex.EncodeToString(h[:]) {
		t.Errorf("ReadIdentity = %+v, want the registration ID and the key's SHA-256", id)
	}
	forms := []string{string(key), hex.EncodeToString(key), base64.StdEncoding.EncodeToString(key)}
	file, err := os.ReadFile(filepath.Join(dir, "symkey.json"))
	if err != nil {
		t.Fatal(err)
	}
	logMu.Lock()
	logged := logBuf.String()
	logMu.Unlock()
	for _, f := range forms {
		if strings.Contains(logged, f) {
			t.Error("the agent logged the symmetric key")
		}
		if bytes.Contains(file, []byte(f)) {
			t.Error("symkey.json holds the key in the clear although the DUT has a TPM")
		}
	}
	if !strings.Contains(logged, "sn-sym-1") {
		t.Error("the agent did not log the write (registration ID)")
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestTPMPassthroughNeverInterleaves runs TPM passthrough commands while
// the agent makes keys and signs with them: no passthrough command may land
// between a TPM2_Load of the agent and its TPM2_FlushContext.
func TestTPMPassthroughNeverInterleaves(t *testing.T) {
	tpm := openSimTPM(t)
	a, err := agent.New(agent.Config{TPM: tpm})
	if err != nil {
		t.Fatal(err)
	}
	// TPM2_GetRandom of 8 bytes: tag TPM_ST_NO_SESSIONS, size 12.
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	ctx := t.Context()
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			rsp, err := a.TPM(ctx, getRandom)
			if err != nil || len(rsp) < 10 || binary.BigEndian.Uint32(rsp[6:10]) != 0 {
				t.Errorf("passthrough GetRandom = % x, %v", rsp, err)
				return
			}
		}
	})
	for i := range 3 {
		if _, err := a.GenerateKey(ctx, station.KeyRequest{CommonName: "sn-il-1"}); err != nil {
			t.Fatal(err)
		}
		if err := a.WriteSymmetricKey(ctx, "sn-il-1", bytes.Repeat([]byte{byte(i)}, 32)); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	wg.Wait()

	tpm.mu.Lock()
	defer tpm.mu.Unlock()
	inside, loads, randoms := false, 0, 0
	for _, cc := range tpm.codes {
		switch cc {
		case tpm2.TPMCCLoad:
			inside = true
			loads++
		case tpm2.TPMCCFlushContext:
			inside = false
		case tpm2.TPMCCGetRandom:
			randoms++
			if inside {
				t.Fatal("a passthrough command landed between the agent's TPM2_Load and TPM2_FlushContext")
			}
		}
	}
	if loads < 3 || randoms == 0 {
		t.Errorf("%d loads and %d passthrough commands: the test did not exercise both", loads, randoms)
	}
	t.Logf("%d loads, %d passthrough commands interleaved safely", loads, randoms)
}
