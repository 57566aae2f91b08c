package devserver_test

import (
	"bytes"
	"cmp"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
)

const (
	hub1 = "hub1.kiln.test"
	hub2 = "hub2.kiln.test"
)

// testTLS returns a server TLS configuration for 127.0.0.1 issued by a
// throwaway CA, and the pool that trusts it.
func testTLS(t testing.TB) (*tls.Config, *x509.CertPool) {
	t.Helper()
	ca, err := fixtures.NewCA("devserver test CA")
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}, pool
}

// env is a started devserver and clients for it.
type env struct {
	srv    *devserver.Server
	cfg    devserver.Config
	base   string // https://127.0.0.1:port
	client *http.Client
	pool   *x509.CertPool
	// pollEvery is the pause between polls of register; zero means 5 ms.
	pollEvery time.Duration
}

// start starts a devserver on 127.0.0.1:0 with real TLS and SQLite in
// cfg.DataDir (a temporary directory when empty). Hubs default to hub1 and
// hub2 (both applying the allocation policy).
func start(t testing.TB, cfg devserver.Config) *env {
	t.Helper()
	tc, pool := testTLS(t)
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	if cfg.Hubs == nil {
		cfg.Hubs = []devserver.LinkedHub{{Name: hub1, ApplyAllocationPolicy: true}, {Name: hub2, ApplyAllocationPolicy: true}}
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = 10 * time.Millisecond
	}
	cfg.TLS = tc
	return startWith(t, cfg, pool)
}

func startWith(t testing.TB, cfg devserver.Config, pool *x509.CertPool) *env {
	t.Helper()
	srv, err := devserver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	t.Cleanup(tr.CloseIdleConnections)
	return &env{srv: srv, cfg: cfg, base: "https://" + srv.Addr(), client: &http.Client{Transport: tr}, pool: pool}
}

// restart closes the server and starts a new one on the same data
// directory.
func (e *env) restart(t testing.TB) *env {
	t.Helper()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	return startWith(t, e.cfg, e.pool)
}

// reply is an HTTP answer read in full.
type reply struct {
	status int
	header http.Header
	body   []byte
}

func (r *reply) decode(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

// errorBody checks that r is a DPS error answer with status and returns
// its body.
func (r *reply) errorBody(t testing.TB, status int) dps.ErrorDetails {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
	var e dps.ErrorDetails
	r.decode(t, &e)
	if e.ErrorCode/1000 != status || e.Message == "" || e.TrackingID == "" || e.TimestampUTC.IsZero() {
		t.Errorf("error body %s: want errorCode %dxxx, a message, a trackingId and a timestamp", r.body, status)
	}
	if got := r.header.Get("x-ms-error-code"); got != fmt.Sprint(e.ErrorCode) {
		t.Errorf("x-ms-error-code %q, want %d", got, e.ErrorCode)
	}
	return e
}

func (e *env) do(t testing.TB, method, path, auth string, body any, hdr ...string) *reply {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("Accept", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	rsp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer rsp.Body.Close()
	b, err := io.ReadAll(rsp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return &reply{status: rsp.StatusCode, header: rsp.Header, body: b}
}

// serviceToken returns a valid service API token from the server's
// connection string.
func (e *env) serviceToken(t testing.TB) string {
	t.Helper()
	cs, err := dps.ParseConnectionString(e.srv.ServiceConnectionString())
	if err != nil {
		t.Fatal(err)
	}
	return cs.SAS(time.Now().Add(time.Hour))
}

// service sends a service API request with a valid token.
func (e *env) service(t testing.TB, method, path string, body any, hdr ...string) *reply {
	t.Helper()
	return e.do(t, method, path+"?api-version=2021-10-01", e.serviceToken(t), body, hdr...)
}

// enroll creates an individual TPM enrollment for ek and returns it.
func (e *env) enroll(t testing.TB, regID string, ek []byte, edit ...func(*dps.IndividualEnrollment)) *dps.IndividualEnrollment {
	t.Helper()
	en := dps.IndividualEnrollment{
		RegistrationID: regID,
		Attestation: dps.AttestationMechanism{
			Type: dps.AttestationTPM,
			TPM:  &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)},
		},
	}
	for _, f := range edit {
		f(&en)
	}
	r := e.service(t, http.MethodPut, "/enrollments/"+url.PathEscape(regID), en)
	if r.status != http.StatusOK {
		t.Fatalf("enroll %s: %d %s", regID, r.status, r.body)
	}
	var got dps.IndividualEnrollment
	r.decode(t, &got)
	return &got
}

// device is a TPM device as the DPS SDKs drive it: its EK and SRK public
// areas, activation of a blob, and HMAC with the activated key.
type device interface {
	keys() (ek, srk []byte)
	activate(ctx context.Context, blob []byte) error
	sign(ctx context.Context, data []byte) ([]byte, error)
}

// simDevice is a device on the TPM simulator, driven through hsm.
type simDevice struct {
	tpm     *hsm.TPM
	ek, srk []byte
}

// newSimDevice opens and manufactures the simulator (one per process: do
// not run simulator tests in parallel) and closes it when t ends.
func newSimDevice(t testing.TB) *simDevice {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	if err := fixtures.Manufacture(t.Context(), sim, nil); err != nil {
		t.Fatal(err)
	}
	h := hsm.New(transport.TPM(sim))
	end, err := h.Endorsement(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return &simDevice{tpm: h, ek: end.EKPublic, srk: end.SRKPublic}
}

func (d *simDevice) keys() (ek, srk []byte) { return d.ek, d.srk }
func (d *simDevice) activate(ctx context.Context, blob []byte) error {
	return d.tpm.ActivateDPS(ctx, blob)
}
func (d *simDevice) sign(ctx context.Context, data []byte) ([]byte, error) {
	return d.tpm.HMAC(ctx, data)
}

// softDevice is a TPM device emulated in Go: RSA EK and SRK whose private
// keys it holds, so it can do ActivateCredential and Import in software.
type softDevice struct {
	ekKey, srkKey *rsa.PrivateKey
	ek, srk       []byte // TPM2B_PUBLIC
	srkName       []byte

	mu  sync.Mutex
	key []byte
}

var (
	softOnce sync.Once
	softEK   *rsa.PrivateKey
	softSRK  *rsa.PrivateKey
)

// newSoftDevice returns a software device. shared devices reuse one pair
// of RSA keys (key generation is slow), as cloned TPMs would.
func newSoftDevice(t testing.TB, shared bool) *softDevice {
	t.Helper()
	var ekKey, srkKey *rsa.PrivateKey
	if shared {
		softOnce.Do(func() {
			softEK, _ = rsa.GenerateKey(rand.Reader, 2048)
			softSRK, _ = rsa.GenerateKey(rand.Reader, 2048)
		})
		ekKey, srkKey = softEK, softSRK
	} else {
		var err error
		if ekKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			t.Fatal(err)
		}
		if srkKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			t.Fatal(err)
		}
	}
	pub := func(tmpl tpm2.TPMTPublic, k *rsa.PrivateKey) []byte {
		tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
		return tpm2.Marshal(tpm2.New2B(tmpl))
	}
	d := &softDevice{ekKey: ekKey, srkKey: srkKey, ek: pub(tpm2.RSAEKTemplate, ekKey), srk: pub(tpm2.RSASRKTemplate, srkKey)}
	d.srkName = tpmName(d.srk[2:])
	return d
}

func tpmName(public []byte) []byte {
	h := sha256.Sum256(public)
	return append([]byte{0x00, 0x0B}, h[:]...)
}

func (d *softDevice) keys() (ek, srk []byte) { return d.ek, d.srk }

// activate does in Go what TPM2_ActivateCredential and TPM2_Import do with
// a DPS blob (§4.5 in reverse), and keeps the HMAC key.
func (d *softDevice) activate(_ context.Context, raw []byte) error {
	b, err := hsm.ParseActivationBlob(raw)
	if err != nil {
		return err
	}
	// ActivateCredential: the seed to the EK, then the inner key.
	seedC, err := rsa.DecryptOAEP(sha256.New(), nil, d.ekKey, b.CredentialSeed, []byte("IDENTITY\x00"))
	if err != nil {
		return fmt.Errorf("decrypt the credential seed: %w", err)
	}
	n := int(binary.BigEndian.Uint16(b.Credential))
	integrity, encIdentity := b.Credential[2:2+n], b.Credential[2+n:]
	if !hmacEqual(tpm2.KDFa(cryptoSHA256, seedC, "INTEGRITY", nil, nil, 256), integrity, encIdentity, d.srkName) {
		return fmt.Errorf("the credential's integrity does not check")
	}
	cred := cfbDecrypt(tpm2.KDFa(cryptoSHA256, seedC, "STORAGE", d.srkName, nil, 128), encIdentity)
	inner := cred[2 : 2+int(binary.BigEndian.Uint16(cred))]

	// Import: the outer wrapper with the SRK, then the inner one.
	seedD, err := rsa.DecryptOAEP(sha256.New(), nil, d.srkKey, b.DuplicateSeed, []byte("DUPLICATE\x00"))
	if err != nil {
		return fmt.Errorf("decrypt the duplication seed: %w", err)
	}
	name := tpmName(b.Public)
	m := int(binary.BigEndian.Uint16(b.Duplicate))
	outer, dupSens := b.Duplicate[2:2+m], b.Duplicate[2+m:]
	if !hmacEqual(tpm2.KDFa(cryptoSHA256, seedD, "INTEGRITY", nil, nil, 256), outer, dupSens, name) {
		return fmt.Errorf("the duplicate's outer integrity does not check")
	}
	plain := cfbDecrypt(inner, cfbDecrypt(tpm2.KDFa(cryptoSHA256, seedD, "STORAGE", name, nil, 128), dupSens))
	// innerIntegrity (TPM2B), then TPM2B_SENSITIVE: type, authValue,
	// seedValue, the key.
	s := plain[2+int(binary.BigEndian.Uint16(plain)):]
	s = s[2+2:] // size of TPM2B_SENSITIVE, sensitiveType
	for range 2 {
		s = s[2+int(binary.BigEndian.Uint16(s)):] // authValue, seedValue
	}
	key := s[2 : 2+int(binary.BigEndian.Uint16(s))]
	d.mu.Lock()
	d.key = append([]byte(nil), key...)
	d.mu.Unlock()
	return nil
}

func (d *softDevice) sign(ctx context.Context, data []byte) ([]byte, error) {
	d.mu.Lock()
	key := d.key
	d.mu.Unlock()
	if key == nil {
		return nil, fmt.Errorf("no key: activate first")
	}
	return dps.KeySigner(key)(ctx, data)
}

func cfbDecrypt(key, data []byte) []byte {
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	out := make([]byte, len(data))
	//lint:ignore SA1019 the TPM specifies CFB.
	cipher.NewCFBDecrypter(block, make([]byte, aes.BlockSize)).XORKeyStream(out, data)
	return out
}

// registration is the outcome of a device's registration run.
type registration struct {
	challenge *reply // the 401
	accepted  *reply // the 202 of the authenticated register
	polls     []*reply
	final     dps.RegistrationOperationStatus
	finalRaw  []byte
}

// registerPath returns the register URL path of a device.
func registerPath(scope, regID string) string {
	return "/" + scope + "/registrations/" + url.PathEscape(regID) + "/register?api-version=2019-03-31"
}

// deviceToken signs a DPS token for the device valid until expiry.
func deviceToken(ctx context.Context, t testing.TB, scope, regID string, d device, expiry time.Time) string {
	t.Helper()
	tok, err := dps.BuildSAS(ctx, dps.DeviceResource(scope, regID), expiry, dps.RegistrationKeyName, d.sign)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// challengeBody is the register body of a TPM device.
func challengeBody(regID string, d device) dps.DeviceRegistration {
	ek, srk := d.keys()
	return dps.DeviceRegistration{RegistrationID: regID, TPM: &dps.TPMAttestation{
		EndorsementKey: base64.StdEncoding.EncodeToString(ek), StorageRootKey: base64.StdEncoding.EncodeToString(srk),
	}}
}

// register runs a TPM device's registration as the SDKs do: the challenge,
// activation, the authenticated register, polls until the status is no
// longer assigning, then activation of the final blob when assigned.
func (e *env) register(ctx context.Context, t testing.TB, regID string, d device) *registration {
	t.Helper()
	scope := e.srv.IDScope()
	var reg registration
	reg.challenge = e.do(t, http.MethodPut, registerPath(scope, regID), "", challengeBody(regID, d))
	if reg.challenge.status != http.StatusUnauthorized {
		t.Fatalf("challenge: %d %s", reg.challenge.status, reg.challenge.body)
	}
	var ch dps.TPMChallenge
	reg.challenge.decode(t, &ch)
	blob, err := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	if err != nil {
		t.Fatalf("challenge blob: %v (%s)", err, reg.challenge.body)
	}
	if err := d.activate(ctx, blob); err != nil {
		t.Fatal(err)
	}
	tok := deviceToken(ctx, t, scope, regID, d, time.Now().Add(time.Hour))
	reg.accepted = e.do(t, http.MethodPut, registerPath(scope, regID), tok, challengeBody(regID, d))
	if reg.accepted.status != http.StatusAccepted {
		t.Fatalf("register: %d %s", reg.accepted.status, reg.accepted.body)
	}
	var op dps.RegistrationOperationStatus
	reg.accepted.decode(t, &op)
	pollPath := "/" + scope + "/registrations/" + url.PathEscape(regID) + "/operations/" + url.PathEscape(op.OperationID) + "?api-version=2019-03-31"
	deadline := time.Now().Add(20 * time.Second)
	for {
		p := e.do(t, http.MethodGet, pollPath, tok, "{}")
		reg.polls = append(reg.polls, p)
		if p.status == http.StatusOK {
			p.decode(t, &reg.final)
			reg.finalRaw = p.body
			break
		}
		if p.status != http.StatusAccepted {
			t.Fatalf("poll: %d %s", p.status, p.body)
		}
		if time.Now().After(deadline) {
			t.Fatal("the operation is still assigning after 20 s")
		}
		time.Sleep(cmp.Or(e.pollEvery, 5*time.Millisecond))
	}
	if reg.final.Status == dps.StatusAssigned {
		blob, err := base64.StdEncoding.DecodeString(reg.final.RegistrationState.TPM.AuthenticationKey)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.activate(ctx, blob); err != nil {
			t.Fatalf("activate the final blob: %v", err)
		}
	}
	return &reg
}

// checkNoGoroutines fails t if goroutines of package devserver remain.
func checkNoGoroutines(t testing.TB) {
	t.Helper()
	var stacks string
	for range 100 {
		buf := make([]byte, 1<<20)
		stacks = string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, "kiln/devserver.") {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("devserver goroutines left after Close:\n%s", stacks)
}

const cryptoSHA256 = crypto.SHA256

// hmacEqual reports whether mac is HMAC-SHA256 with key over parts.
func hmacEqual(key, mac []byte, parts ...[]byte) bool {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return hmac.Equal(m.Sum(nil), mac)
}
