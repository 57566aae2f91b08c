package devserver_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// handshakeRequest opens a new TLS connection to e, sends one request that
// the server answers without touching the database, and closes it.
func handshakeRequest(tb testing.TB, e *env) {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.pool}, DisableKeepAlives: true}
	rsp, err := (&http.Client{Transport: tr}).Get(e.base + "/health")
	if err != nil {
		tb.Fatal(err)
	}
	rsp.Body.Close()
	tr.CloseIdleConnections()
}

// BenchmarkTLSHandshakeRequest is the baseline: a full TLS handshake
// (ECDSA P-256 server certificate) and one trivial request.
func BenchmarkTLSHandshakeRequest(b *testing.B) {
	e := start(b, devserver.Config{})
	b.ResetTimer()
	for range b.N {
		handshakeRequest(b, e)
	}
}

// timedDevice is a software TPM device that adds up the time spent in its
// own math (RSA-OAEP decryption, unwrapping, HMAC), so that the device's
// share can be told apart from the server's.
type timedDevice struct {
	*softDevice
	spent time.Duration
}

func (d *timedDevice) activate(ctx context.Context, blob []byte) error {
	t0 := time.Now()
	defer func() { d.spent += time.Since(t0) }()
	return d.softDevice.activate(ctx, blob)
}

func (d *timedDevice) sign(ctx context.Context, data []byte) ([]byte, error) {
	t0 := time.Now()
	defer func() { d.spent += time.Since(t0) }()
	return d.softDevice.sign(ctx, data)
}

// BenchmarkTPMRegistrationHTTPS measures one complete TPM registration
// through the HTTPS device API, each device on a new TLS connection:
// challenge (activation blob built), SAS-authenticated register, polls
// every 0.2 ms until assigned (second blob built, SQLite writes). The
// devices are software TPMs (their RSA-OAEP decryptions and unwrapping run
// in Go in the same process); device-ms/op is their share and server-ms/op
// the rest. x-handshake is ms/op over the cost of a bare TLS handshake plus
// one request, measured in the same run.
func BenchmarkTPMRegistrationHTTPS(b *testing.B) {
	ctx := context.Background()
	e := start(b, devserver.Config{RetryAfter: time.Millisecond})
	e.pollEvery = 200 * time.Microsecond
	dev := &timedDevice{softDevice: newSoftDevice(b, true)}
	ids := make([]string, b.N)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%06d", i)
		e.enroll(b, ids[i], dev.ek)
	}
	polls := 0
	b.ResetTimer()
	for i := range b.N {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.pool}}
		e.client = &http.Client{Transport: tr}
		reg := e.register(ctx, b, ids[i], dev)
		if reg.final.Status != "assigned" {
			b.Fatalf("%s: %s", ids[i], reg.finalRaw)
		}
		polls += len(reg.polls)
		tr.CloseIdleConnections()
	}
	b.StopTimer()
	perOp := b.Elapsed() / time.Duration(b.N)

	const baselineN = 100
	t0 := time.Now()
	for range baselineN {
		handshakeRequest(b, e)
	}
	baseline := time.Since(t0) / baselineN

	device := dev.spent / time.Duration(b.N)
	b.ReportMetric(float64(device)/1e6, "device-ms/op")
	b.ReportMetric(float64(perOp-device)/1e6, "server-ms/op")
	b.ReportMetric(float64(polls)/float64(b.N), "polls/op")
	b.ReportMetric(float64(baseline)/1e6, "handshake-ms")
	b.ReportMetric(float64(perOp)/float64(baseline), "x-handshake")
	b.ReportMetric(float64(time.Second)/float64(perOp-device), "registrations/s")
	b.ReportMetric(float64(time.Second)/float64(baseline), "handshake+request/s")
}

// TestMain removes what the benchmarks keep between their runs (the
// stores of a million enrollments) when the test binary ends.
func TestMain(m *testing.M) {
	code := m.Run()
	benchCleanup()
	os.Exit(code)
}

// mqttConn is a bare MQTT 3.1.1 client on one TLS connection, for the
// benchmarks: packets encoded by mochi, answers read without any client
// library in the way, so that the client's share of the CPU stays small.
type mqttConn struct {
	c *tls.Conn
	r *bufio.Reader
}

// dialMQTTRaw connects, authenticates with password and subscribes to the
// DPS response topics at QoS 0.
func dialMQTTRaw(addr string, tc *tls.Config, id, username, password string) (*mqttConn, error) {
	c, err := tls.Dial("tcp", addr, tc)
	if err != nil {
		return nil, err
	}
	m := &mqttConn{c: c, r: bufio.NewReader(c)}
	var buf bytes.Buffer
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id,
			UsernameFlag: true, Username: []byte(username), PasswordFlag: true, Password: []byte(password)}}
	if err := connect.ConnectEncode(&buf); err != nil {
		c.Close()
		return nil, err
	}
	sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "$dps/registrations/res/#", Qos: 0}}}
	if err := sub.SubscribeEncode(&buf); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		c.Close()
		return nil, err
	}
	for _, want := range []byte{packets.Connack, packets.Suback} {
		typ, body, err := m.read()
		if err == nil && (typ != want || want == packets.Connack && (len(body) < 2 || body[1] != 0)) {
			err = fmt.Errorf("got packet type %d %x, want %d accepted", typ, body, want)
		}
		if err != nil {
			c.Close()
			return nil, err
		}
	}
	return m, nil
}

// read reads one packet: its type and its body after the fixed header.
func (m *mqttConn) read() (byte, []byte, error) {
	h, err := m.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		b, err := m.r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(b&127) * mul
		if b&128 == 0 {
			break
		}
		if mul *= 128; i == 3 {
			return 0, nil, errors.New("bad remaining length")
		}
	}
	body := make([]byte, n)
	_, err = io.ReadFull(m.r, body)
	return h >> 4, body, err
}

// request publishes payload to topic at QoS 0 and returns the status and
// body of the answer.
func (m *mqttConn) request(topic string, payload []byte) (int, []byte, error) {
	var buf bytes.Buffer
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 4, TopicName: topic, Payload: payload}
	if err := pk.PublishEncode(&buf); err != nil {
		return 0, nil, err
	}
	if _, err := m.c.Write(buf.Bytes()); err != nil {
		return 0, nil, err
	}
	typ, body, err := m.read()
	if err != nil {
		return 0, nil, err
	}
	if typ != packets.Publish || len(body) < 2 {
		return 0, nil, fmt.Errorf("got packet type %d, want a PUBLISH", typ)
	}
	tl := int(body[0])<<8 | int(body[1])
	if len(body) < 2+tl {
		return 0, nil, errors.New("short PUBLISH")
	}
	res := strings.TrimPrefix(string(body[2:2+tl]), "$dps/registrations/res/")
	code, _, _ := strings.Cut(res, "/")
	status, err := strconv.Atoi(code)
	return status, body[2+tl:], err
}

func (m *mqttConn) close() {
	var buf bytes.Buffer
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: 4}
	if pk.DisconnectEncode(&buf) == nil {
		m.c.Write(buf.Bytes())
	}
	m.c.Close()
}

// registerMQTTRaw registers one symmetric-key device on a fresh TLS MQTT
// connection: connect with the SAS token, subscribe, register, poll every
// pollEvery until assigned, disconnect. It returns the number of polls.
func registerMQTTRaw(addr string, tc *tls.Config, scope, regID string, key []byte, pollEvery time.Duration) (int, error) {
	tok := dps.NewDeviceSAS(scope, regID, key, time.Now().Add(time.Hour))
	m, err := dialMQTTRaw(addr, tc, regID, scope+"/registrations/"+regID+"/api-version=2019-03-31", tok)
	if err != nil {
		return 0, err
	}
	defer m.close()
	status, body, err := m.request("$dps/registrations/PUT/iotdps-register/?$rid=1", []byte(`{"registrationId":"`+regID+`"}`))
	if err != nil {
		return 0, err
	}
	var op dps.RegistrationOperationStatus
	if err := json.Unmarshal(body, &op); err != nil || status != http.StatusAccepted {
		return 0, fmt.Errorf("register: %d %s", status, body)
	}
	for polls := 1; ; polls++ {
		status, body, err = m.request("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId="+op.OperationID, nil)
		if err != nil {
			return polls, err
		}
		switch status {
		case http.StatusOK:
			if !bytes.Contains(body, []byte(`"status":"assigned"`)) {
				return polls, fmt.Errorf("final %s", body)
			}
			return polls, nil
		case http.StatusAccepted:
			time.Sleep(pollEvery)
		default:
			return polls, fmt.Errorf("poll: %d %s", status, body)
		}
	}
}

// mqttBatch is how many devices one op of BenchmarkSymmetricKeyRegistrationMQTT
// registers, so that make bench's 5 ops hold enough registrations.
const mqttBatch = 40

// BenchmarkSymmetricKeyRegistrationMQTT measures symmetric-key
// registrations over MQTT, each device on a fresh TLS connection: TLS
// handshake, CONNECT with the SAS token (checked against the enrollment),
// SUBSCRIBE, register (the operation written to SQLite), polls every
// 0.2 ms until assigned (the assignment written), DISCONNECT. One op is
// mqttBatch devices, one after the other. The baseline is a bare TLS
// handshake and one HTTPS round trip to the same server, one after each
// registration so that both see the same load of the machine;
// x-baseline-rate is registrations/s over handshake+request/s (goal
// ≥ 0.5). ns/op counts both.
func BenchmarkSymmetricKeyRegistrationMQTT(b *testing.B) {
	e := start(b, devserver.Config{MQTTAddr: "127.0.0.1:0", RetryAfter: time.Millisecond})
	scope := e.srv.IDScope()
	key := bytes.Repeat([]byte{7}, 32)
	n := b.N * mqttBatch
	if err := devserver.LoadEnrollments(b.Context(), e.srv, "mqtt-bench", n, 5000, key); err != nil {
		b.Fatal(err)
	}
	tc := &tls.Config{RootCAs: e.pool, ServerName: "127.0.0.1"}
	addr := e.srv.MQTTAddr()
	polls := 0
	var reg, base time.Duration
	b.ResetTimer()
	for i := range n {
		t0 := time.Now()
		p, err := registerMQTTRaw(addr, tc, scope, fmt.Sprintf("mqtt-bench-%07d", i), key, 200*time.Microsecond)
		if err != nil {
			b.Fatalf("device %d: %v", i, err)
		}
		t1 := time.Now()
		polls += p
		// The baseline, interleaved so that both see the same machine.
		handshakeRequest(b, e)
		reg, base = reg+t1.Sub(t0), base+time.Since(t1)
	}
	b.StopTimer()
	b.ReportMetric(float64(n)/reg.Seconds(), "registrations/s")
	b.ReportMetric(float64(n)/base.Seconds(), "handshake+request/s")
	b.ReportMetric(base.Seconds()/reg.Seconds(), "x-baseline-rate")
	b.ReportMetric(float64(polls)/float64(n), "polls/reg")
	b.ReportMetric(reg.Seconds()*1e3/float64(n), "ms/reg")
}

// benchEnrollmentCount is the size of the large store of
// BenchmarkRegisterLatencyEnrollments: $KILN_BENCH_ENROLLMENTS, else
// 100,000 (make bench sets 1,000,000, DPS's limit).
func benchEnrollmentCount(tb testing.TB) int {
	v := os.Getenv("KILN_BENCH_ENROLLMENTS")
	if v == "" {
		return 100_000
	}
	n, err := strconv.Atoi(strings.ReplaceAll(v, "_", ""))
	if err != nil || n < 1000 {
		tb.Fatalf("KILN_BENCH_ENROLLMENTS=%q: give a number of enrollments, at least 1000", v)
	}
	return n
}

// loadedServer is a started devserver holding n enrollments named
// prefix-%07d with one key.
type loadedServer struct {
	e      *env
	dir    string
	prefix string
	n      int
	next   int // the next enrollment not yet registered, in perm order
	perm   []int32
	// Figures of the load.
	loadTime time.Duration
	dbBytes  int64
	rssAfter int64
}

var benchStores struct {
	mu     sync.Mutex
	byName map[string]*loadedServer
}

// loaded returns the server holding n enrollments, loading it the first
// time (the benchmark runs more than once per process: the load is kept).
func loaded(b *testing.B, name string, n int, key []byte) *loadedServer {
	benchStores.mu.Lock()
	defer benchStores.mu.Unlock()
	if ls := benchStores.byName[name]; ls != nil {
		return ls
	}
	dir, err := os.MkdirTemp("", "kiln-bench-"+name+"-")
	if err != nil {
		b.Fatal(err)
	}
	tc, pool := testTLS(b)
	cfg := devserver.Config{DataDir: dir, TLS: tc, RetryAfter: time.Millisecond,
		Hubs: []devserver.LinkedHub{{Name: hub1, ApplyAllocationPolicy: true}, {Name: hub2, ApplyAllocationPolicy: true}}}
	srv, err := devserver.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	ls := &loadedServer{dir: dir, prefix: "load-" + name, n: n}
	if benchStores.byName == nil {
		benchStores.byName = map[string]*loadedServer{}
	}
	benchStores.byName[name] = ls // closed by benchCleanup, whatever happens next
	ls.e = &env{srv: srv, cfg: cfg, pool: pool}
	runtime.GC()
	t0 := time.Now()
	if err := devserver.LoadEnrollments(b.Context(), srv, ls.prefix, n, 20_000, key); err != nil {
		b.Fatal(err)
	}
	ls.loadTime = time.Since(t0)
	ls.rssAfter = rssBytes()
	for _, f := range []string{"devserver.db", "devserver.db-wal"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err == nil {
			ls.dbBytes += st.Size()
		}
	}
	if err := srv.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	ls.e.base, ls.e.client = "https://"+srv.Addr(), &http.Client{Transport: tr}
	ls.perm = make([]int32, n)
	for i, v := range rand.New(rand.NewPCG(1, 2)).Perm(n) {
		ls.perm[i] = int32(v)
	}
	return ls
}

// benchCleanup closes the servers of loaded and removes their stores.
func benchCleanup() {
	benchStores.mu.Lock()
	defer benchStores.mu.Unlock()
	for name, ls := range benchStores.byName {
		ls.e.srv.Close()
		os.RemoveAll(ls.dir)
		delete(benchStores.byName, name)
	}
}

// rssBytes is the resident memory of this process (Linux), 0 if unknown.
func rssBytes() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// registerOne registers the next unregistered enrollment of ls over HTTPS
// (a kept-alive connection) and returns how long register and polls took
// until assigned.
func (ls *loadedServer) registerOne(b *testing.B, key []byte) time.Duration {
	if ls.next >= ls.n {
		b.Fatalf("all %d enrollments of %s are registered: raise the size", ls.n, ls.prefix)
	}
	regID := fmt.Sprintf("%s-%07d", ls.prefix, ls.perm[ls.next])
	ls.next++
	scope := ls.e.srv.IDScope()
	tok := dps.NewDeviceSAS(scope, regID, key, time.Now().Add(time.Hour))
	t0 := time.Now()
	r := ls.e.do(b, http.MethodPut, registerPath(scope, regID), tok, dps.DeviceRegistration{RegistrationID: regID})
	if r.status != http.StatusAccepted {
		b.Fatalf("register %s: %d %s", regID, r.status, r.body)
	}
	var op dps.RegistrationOperationStatus
	r.decode(b, &op)
	for {
		p := ls.e.do(b, http.MethodGet, pollPath(scope, regID, op.OperationID), tok, nil)
		if p.status == http.StatusOK {
			if !bytes.Contains(p.body, []byte(`"status":"assigned"`)) {
				b.Fatalf("%s: %s", regID, p.body)
			}
			return time.Since(t0)
		}
		if p.status != http.StatusAccepted {
			b.Fatalf("poll %s: %d %s", regID, p.status, p.body)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// latencyBatch is how many registrations of each size one op of
// BenchmarkRegisterLatencyEnrollments makes.
const latencyBatch = 200

// BenchmarkRegisterLatencyEnrollments compares the latency of a complete
// symmetric-key registration over HTTPS (register, polls every 0.2 ms
// until assigned; one kept-alive connection) between a service holding
// 1,000 individual enrollments and one holding benchEnrollmentCount
// (1,000,000 under make bench), devices picked at random, the two sizes
// alternating. The large store is loaded straight into SQLite once per
// process; that load is the bulk-load figure: load-enrollments/s (goal
// ≥ 50,000/s), db-bytes/enrollment and the process's resident memory
// after it. p99-ratio is the large store's p99 over the small one's (goal
// ≤ 1.5).
func BenchmarkRegisterLatencyEnrollments(b *testing.B) {
	key := bytes.Repeat([]byte{9}, 32)
	big := benchEnrollmentCount(b)
	small := loaded(b, "1k", 1000, key)
	large := loaded(b, "large", big, key)
	var ls, ll []time.Duration
	rng := rand.New(rand.NewPCG(3, uint64(b.N)))
	runtime.GC()
	b.ResetTimer()
	for range b.N {
		for range latencyBatch {
			if small.next >= small.n {
				small.next = 0 // past 1,000: devices register again
			}
			if rng.IntN(2) == 0 { // neither size always goes first
				ls = append(ls, small.registerOne(b, key))
				ll = append(ll, large.registerOne(b, key))
			} else {
				ll = append(ll, large.registerOne(b, key))
				ls = append(ls, small.registerOne(b, key))
			}
		}
	}
	b.StopTimer()
	slices.Sort(ls)
	slices.Sort(ll)
	pct := func(d []time.Duration, p int) time.Duration { return d[(len(d)*p+99)/100-1] }
	ps, pl := pct(ls, 99), pct(ll, 99)
	b.ReportMetric(float64(pct(ls, 50))/1e6, "p50-1k-ms")
	b.ReportMetric(float64(pct(ll, 50))/1e6, "p50-large-ms")
	b.ReportMetric(float64(ps)/1e6, "p99-1k-ms")
	b.ReportMetric(float64(pl)/1e6, "p99-large-ms")
	b.ReportMetric(float64(pl)/float64(ps), "p99-ratio")
	b.ReportMetric(float64(big), "enrollments")
	b.ReportMetric(float64(big)/large.loadTime.Seconds(), "load-enrollments/s")
	b.ReportMetric(float64(large.dbBytes)/float64(big), "db-bytes/enrollment")
	b.ReportMetric(float64(large.rssAfter)/(1<<20), "rss-MB-after-load")
}
