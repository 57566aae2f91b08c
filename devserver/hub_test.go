package devserver_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

const (
	hubA = "hub-a.kiln.test"
	hubB = "hub-b.kiln.test"
)

// hubNow is the hub's clock in these tests; TLS uses the real one.
var hubNow = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

// memDirectory is a DeviceDirectory held in memory.
type memDirectory struct {
	mu      sync.Mutex
	devices map[string]devserver.HubDevice // by hub/deviceID
}

func (d *memDirectory) add(dev devserver.HubDevice) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.devices == nil {
		d.devices = map[string]devserver.HubDevice{}
	}
	d.devices[strings.ToLower(dev.Hub)+"/"+dev.DeviceID] = dev
}

func (d *memDirectory) HubDevice(_ context.Context, hub, deviceID string) (*devserver.HubDevice, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	dev, ok := d.devices[strings.ToLower(hub)+"/"+deviceID]
	if !ok {
		return nil, station.Errorf("look up hub device", station.KindNotFound, "no device %q on %s", deviceID, hub)
	}
	return &dev, nil
}

// testCA is a throwaway certificate authority.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue makes a leaf: a server certificate for dnsNames, or a client
// certificate for cn when dnsNames is empty.
func (ca *testCA) issue(t *testing.T, cn string, dnsNames ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if len(dnsNames) > 0 {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.DNSNames = dnsNames
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func sha256Thumbprint(c tls.Certificate) string {
	s := sha256.Sum256(c.Certificate[0])
	return strings.ToUpper(hex.EncodeToString(s[:]))
}

// hubEnv is a running hub with its CA and directory.
type hubEnv struct {
	hub *devserver.Hub
	dir *memDirectory
	ca  *testCA
}

func startHub(t *testing.T, edit func(*devserver.HubConfig)) *hubEnv {
	t.Helper()
	ca := newTestCA(t, "kiln test CA")
	dir := &memDirectory{}
	cfg := devserver.HubConfig{
		TLS: &tls.Config{
			Certificates: []tls.Certificate{ca.issue(t, "hub", hubA, hubB)},
			ClientAuth:   tls.VerifyClientCertIfGiven,
			ClientCAs:    ca.pool,
		},
		Hosts:     []string{hubA, hubB},
		Directory: dir,
		Now:       func() time.Time { return hubNow },
		Logger:    testLogger(t),
	}
	if edit != nil {
		edit(&cfg)
	}
	h, err := devserver.NewHub(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &hubEnv{hub: h, dir: dir, ca: ca}
}

// testLogger logs through t.Log (go test -v shows it).
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// sasDevice registers a SAS device on hubA and returns its primary key.
func (e *hubEnv) sasDevice(id string, enabled bool) []byte {
	key := []byte("primary key of " + id + " ........")
	e.dir.add(devserver.HubDevice{
		Hub: hubA, DeviceID: id, Enabled: enabled,
		PrimaryKey: key, SecondaryKey: []byte("secondary key of " + id + " ....."),
		Twin: json.RawMessage(`{"interval":30,"mode":"` + id + `"}`),
	})
	return key
}

func hubUsername(hub, id string) string {
	return hub + "/" + id + "/?api-version=2021-04-12&DeviceClientType=" + url.QueryEscape("kiln-test/1.0")
}

func hubSAS(hub, id string, key []byte, expiry time.Time) string {
	return dps.NewSAS(dps.HubDeviceResource(hub, id), key, expiry, "")
}

// dialer describes one device connection.
type dialer struct {
	id, username, password string
	cert                   *tls.Certificate
	lost                   chan error // receives the error when the connection drops
}

// dial connects a paho client to the hub and returns it (nil when refused),
// the CONNACK return code and the connect error.
func (e *hubEnv) dial(t *testing.T, d dialer) (paho.Client, byte, error) {
	t.Helper()
	tc := &tls.Config{RootCAs: e.ca.pool, ServerName: hubA}
	if d.cert != nil {
		tc.Certificates = []tls.Certificate{*d.cert}
	}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + e.hub.Addr()).
		SetClientID(d.id).
		SetUsername(d.username).
		SetPassword(d.password).
		SetTLSConfig(tc).
		SetProtocolVersion(4).
		SetCleanSession(false). // as the Node and C SDKs
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).
		SetOrderMatters(false)
	if d.lost != nil {
		opts.SetConnectionLostHandler(func(_ paho.Client, err error) { d.lost <- err })
	}
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		t.Fatalf("connect %s: no CONNACK in 15 s", d.id)
	}
	code := tok.(*paho.ConnectToken).ReturnCode()
	if err := tok.Error(); err != nil {
		return nil, code, err
	}
	t.Cleanup(func() { c.Disconnect(50) })
	return c, code, nil
}

func (e *hubEnv) mustDial(t *testing.T, d dialer) paho.Client {
	t.Helper()
	c, code, err := e.dial(t, d)
	if err != nil {
		t.Fatalf("connect %s: CONNACK %d: %v", d.id, code, err)
	}
	return c
}

func wait(t *testing.T, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatal("no answer from the hub in 10 s")
	}
	if err := tok.Error(); err != nil {
		t.Fatal(err)
	}
}

// subscribe subscribes to filter and returns the granted code and a channel
// of the messages received on it.
func subscribe(t *testing.T, c paho.Client, filter string, qos byte) (byte, chan paho.Message) {
	t.Helper()
	ch := make(chan paho.Message, 16)
	tok := c.Subscribe(filter, qos, func(_ paho.Client, m paho.Message) { ch <- m })
	wait(t, tok)
	return tok.(*paho.SubscribeToken).Result()[filter], ch
}

func receive(t *testing.T, ch chan paho.Message) paho.Message {
	t.Helper()
	select {
	case m := <-ch:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message in 10 s")
		return nil
	}
}

func TestHubTelemetrySAS(t *testing.T) {
	var seen []devserver.Telemetry
	var mu sync.Mutex
	e := startHub(t, func(c *devserver.HubConfig) {
		c.OnTelemetry = func(m devserver.Telemetry) { mu.Lock(); seen = append(seen, m); mu.Unlock() }
	})
	key := e.sasDevice("unit-0001", true)
	c := e.mustDial(t, dialer{id: "unit-0001", username: hubUsername(hubA, "unit-0001"),
		password: hubSAS(hubA, "unit-0001", key, hubNow.Add(time.Hour))})

	// As the Node SDK builds it: system properties first, then the
	// application properties, each encodeURIComponent-ed.
	topic := "devices/unit-0001/messages/events/%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&serial=KL-0001&note=a%20b%2Bc"
	body := []byte(`{"temperature":21.5}`)
	wait(t, c.Publish(topic, 1, false, body))

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got, err := e.hub.WaitTelemetry(ctx, hubA, "unit-0001")
	if err != nil {
		t.Fatal(err)
	}
	want := devserver.Telemetry{
		Hub: hubA, DeviceID: "unit-0001", Received: hubNow, Topic: topic,
		Properties: map[string]string{"$.mid": "m1", "$.ct": "application/json", "$.ce": "utf-8", "serial": "KL-0001", "note": "a b+c"},
		Body:       body,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("WaitTelemetry (-want +got):\n%s", diff)
	}

	// QoS 0, no bag, with and without the trailing slash.
	for _, tp := range []string{"devices/unit-0001/messages/events/", "devices/unit-0001/messages/events", "devices/unit-0001/messages/events/a=1/"} {
		wait(t, c.Publish(tp, 0, false, "x"))
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(e.hub.Telemetry("unit-0001")) < 4 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	all := e.hub.Telemetry("unit-0001")
	if len(all) != 4 {
		t.Fatalf("Telemetry: %d messages, want 4", len(all))
	}
	if diff := cmp.Diff(map[string]string{"a": "1"}, all[3].Properties); diff != "" {
		t.Errorf("bag with trailing slash (-want +got):\n%s", diff)
	}
	if len(all[1].Properties) != 0 || len(all[2].Properties) != 0 {
		t.Errorf("empty bags parsed as %v, %v", all[1].Properties, all[2].Properties)
	}
	mu.Lock()
	n := len(seen)
	mu.Unlock()
	if n != 4 {
		t.Errorf("OnTelemetry called %d times, want 4", n)
	}

	// WaitTelemetry returns a message recorded before it was called, at once.
	got2, err := e.hub.WaitTelemetry(t.Context(), "", "unit-0001")
	if err != nil || got2.Topic != topic {
		t.Errorf("WaitTelemetry again = %q, %v; want the first message", got2.Topic, err)
	}
}

func TestHubWaitTelemetryGivesUp(t *testing.T) {
	e := startHub(t, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := e.hub.WaitTelemetry(ctx, hubA, "nobody")
	if station.KindOf(err) != station.KindUnavailable {
		t.Errorf("WaitTelemetry = %v (kind %v), want kind unavailable", err, station.KindOf(err))
	}

	done := make(chan error, 1)
	go func() {
		_, err := e.hub.WaitTelemetry(t.Context(), hubA, "nobody")
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	e.hub.Close()
	select {
	case err := <-done:
		if station.KindOf(err) != station.KindUnavailable {
			t.Errorf("WaitTelemetry after Close = %v, want kind unavailable", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WaitTelemetry did not return after Close")
	}
}

// signLower makes a hub SAS token whose resource is percent-encoded in lower
// case, as the Embedded C SDK writes it.
func signLower(hub, id string, key []byte, expiry time.Time) string {
	sr := strings.ToLower(url.QueryEscape(dps.HubDeviceResource(hub, id)))
	se := strconv.FormatInt(expiry.Unix(), 10)
	m := hmac.New(sha256.New, key)
	m.Write([]byte(sr + "\n" + se))
	sig := url.QueryEscape(base64.StdEncoding.EncodeToString(m.Sum(nil)))
	return "SharedAccessSignature sig=" + sig + "&se=" + se + "&sr=" + sr
}

func TestHubAcceptsSDKCredentials(t *testing.T) {
	e := startHub(t, nil)
	key := e.sasDevice("d1", true)
	exp := hubNow.Add(time.Hour)
	secondary := []byte("secondary key of d1 .....")
	for _, tc := range []struct{ name, username, password string }{
		{"node", hubA + "/d1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4", hubSAS(hubA, "d1", key, exp)},
		{"no parameters", hubA + "/d1/?api-version=2021-04-12", hubSAS(hubA, "d1", key, exp)},
		{"old C SDK, no question mark", hubA + "/d1/api-version=2016-11-14&DeviceClientType=iothubclient%2f1.1.27%20(Linux%3b%20armv7l)", hubSAS(hubA, "d1", key, exp)},
		{"raw semicolon, model id, host case", strings.ToUpper(hubA) + "/d1/?api-version=2020-09-30&DeviceClientType=c%2F1.3.1(ard;portentaH7)&model-id=dtmi%3Aazureiot%3Adevkit%3B1", hubSAS(hubA, "d1", key, exp)},
		{"lower-case encoding, fields reordered", hubUsername(hubA, "d1"), signLower(hubA, "d1", key, exp)},
		{"secondary key", hubUsername(hubA, "d1"), hubSAS(hubA, "d1", secondary, exp)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := e.mustDial(t, dialer{id: "d1", username: tc.username, password: tc.password})
			c.Disconnect(50)
		})
	}
}

func TestHubRefusesConnection(t *testing.T) {
	e := startHub(t, nil)
	key := e.sasDevice("d1", true)
	key2 := e.sasDevice("d2", true)
	e.sasDevice("off", false)
	exp := hubNow.Add(time.Hour)
	registered := e.ca.issue(t, "x1")
	e.dir.add(devserver.HubDevice{Hub: hubA, DeviceID: "x1", Enabled: true, Thumbprints: []string{sha256Thumbprint(registered)}})
	other := e.ca.issue(t, "x1")
	stranger := newTestCA(t, "unknown CA").issue(t, "x1")

	for _, tc := range []struct {
		name               string
		id, user, password string
		cert               *tls.Certificate
		want               byte
	}{
		{"wrong key", "d1", hubUsername(hubA, "d1"), hubSAS(hubA, "d1", []byte("not the key"), exp), nil, 5},
		{"expired token", "d1", hubUsername(hubA, "d1"), hubSAS(hubA, "d1", key, hubNow.Add(-time.Second)), nil, 5},
		{"token of another device", "d1", hubUsername(hubA, "d1"), hubSAS(hubA, "d2", key2, exp), nil, 5},
		{"token for another hub", "d1", hubUsername(hubA, "d1"), hubSAS(hubB, "d1", key, exp), nil, 5},
		{"unknown device", "ghost", hubUsername(hubA, "ghost"), hubSAS(hubA, "ghost", key, exp), nil, 5},
		{"device on another hub", "d1", hubUsername(hubB, "d1"), hubSAS(hubB, "d1", key, exp), nil, 5},
		{"disabled device", "off", hubUsername(hubA, "off"), hubSAS(hubA, "off", []byte("primary key of off ........"), exp), nil, 5},
		{"no credentials", "d1", hubUsername(hubA, "d1"), "", nil, 5},
		{"password not a SAS token", "d1", hubUsername(hubA, "d1"), "hunter2", nil, 4},
		{"hub not served", "d1", hubUsername("elsewhere.azure-devices.net", "d1"), hubSAS("elsewhere.azure-devices.net", "d1", key, exp), nil, 4},
		{"client ID is not the user name's device", "d2", hubUsername(hubA, "d1"), hubSAS(hubA, "d1", key, exp), nil, 4},
		{"module identity", "d1", hubA + "/d1/m1/?api-version=2021-04-12", hubSAS(hubA, "d1", key, exp), nil, 4},
		{"user name without device", "d1", hubA, hubSAS(hubA, "d1", key, exp), nil, 4},
		{"certificate not registered", "x1", hubUsername(hubA, "x1"), "", &other, 5},
		{"certificate from a CA the hub does not list (client omits it)", "x1", hubUsername(hubA, "x1"), "", &stranger, 5},
		{"SAS token for an X.509 device", "x1", hubUsername(hubA, "x1"), hubSAS(hubA, "x1", key, exp), nil, 5},
		{"certificate for a SAS device", "d1", hubUsername(hubA, "d1"), "", &registered, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, code, err := e.dial(t, dialer{id: tc.id, username: tc.user, password: tc.password, cert: tc.cert})
			if err == nil {
				c.Disconnect(50)
				t.Fatal("connected; want refused")
			}
			if code != tc.want {
				t.Errorf("CONNACK %d (%v), want %d", code, err, tc.want)
			}
		})
	}
}

func TestHubX509(t *testing.T) {
	t.Run("CA-issued certificate, VerifyClientCertIfGiven", func(t *testing.T) {
		e := startHub(t, nil)
		cert := e.ca.issue(t, "x1")
		e.dir.add(devserver.HubDevice{Hub: hubA, DeviceID: "x1", Enabled: true, Thumbprints: []string{"0000", sha256Thumbprint(cert)}})
		c := e.mustDial(t, dialer{id: "x1", username: hubUsername(hubA, "x1"), cert: &cert})
		wait(t, c.Publish("devices/x1/messages/events/", 1, false, "hello"))
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		got, err := e.hub.WaitTelemetry(ctx, hubA, "x1")
		if err != nil || string(got.Body) != "hello" {
			t.Errorf("WaitTelemetry = %q, %v", got.Body, err)
		}
	})
	t.Run("self-signed certificate, no client CAs", func(t *testing.T) {
		e := startHub(t, func(c *devserver.HubConfig) {
			c.TLS = &tls.Config{Certificates: c.TLS.Certificates} // NoClientCert: the hub requests one
		})
		self := newTestCA(t, "x2")
		cert := tls.Certificate{Certificate: [][]byte{self.cert.Raw}, PrivateKey: self.key}
		e.dir.add(devserver.HubDevice{Hub: hubA, DeviceID: "x2", Enabled: true, Thumbprints: []string{strings.ToLower(sha256Thumbprint(cert))}})
		c := e.mustDial(t, dialer{id: "x2", username: hubUsername(hubA, "x2"), cert: &cert})
		wait(t, c.Publish("devices/x2/messages/events/", 1, false, "hello"))
	})
}

func getTwin(t *testing.T, c paho.Client, res chan paho.Message, rid string) (string, map[string]any) {
	t.Helper()
	wait(t, c.Publish("$iothub/twin/GET/?$rid="+rid, 0, false, " "))
	m := receive(t, res)
	var doc map[string]any
	if err := json.Unmarshal(m.Payload(), &doc); err != nil {
		t.Fatalf("twin document %q: %v", m.Payload(), err)
	}
	return m.Topic(), doc
}

func TestHubTwin(t *testing.T) {
	e := startHub(t, nil)
	key := e.sasDevice("d1", true)
	c := e.mustDial(t, dialer{id: "d1", username: hubUsername(hubA, "d1"), password: hubSAS(hubA, "d1", key, hubNow.Add(time.Hour))})
	_, res := subscribe(t, c, "$iothub/twin/res/#", 0)

	topic, doc := getTwin(t, c, res, "1")
	if want := "$iothub/twin/res/200/?$rid=1"; topic != want {
		t.Errorf("GET answered on %q, want %q", topic, want)
	}
	want := map[string]any{
		"desired":  map[string]any{"interval": 30.0, "mode": "d1", "$version": 1.0},
		"reported": map[string]any{"$version": 1.0},
	}
	if diff := cmp.Diff(want, doc); diff != "" {
		t.Errorf("twin (-want +got):\n%s", diff)
	}

	wait(t, c.Publish("$iothub/twin/PATCH/properties/reported/?$rid=2", 1, false, `{"fw":"1.2.3","net":{"ip":"10.0.0.2","mac":"aa"}}`))
	if m := receive(t, res); m.Topic() != "$iothub/twin/res/204/?$rid=2&$version=2" {
		t.Errorf("PATCH answered on %q", m.Topic())
	}
	wait(t, c.Publish("$iothub/twin/PATCH/properties/reported/?$rid=3", 0, false, `{"net":{"mac":null}}`))
	if m := receive(t, res); m.Topic() != "$iothub/twin/res/204/?$rid=3&$version=3" {
		t.Errorf("second PATCH answered on %q", m.Topic())
	}
	wait(t, c.Publish("$iothub/twin/PATCH/properties/reported/?$rid=4", 0, false, `[1]`))
	if m := receive(t, res); m.Topic() != "$iothub/twin/res/400/?$rid=4" {
		t.Errorf("bad PATCH answered on %q", m.Topic())
	}

	_, doc = getTwin(t, c, res, "5")
	wantReported := map[string]any{"fw": "1.2.3", "net": map[string]any{"ip": "10.0.0.2"}, "$version": 3.0}
	if diff := cmp.Diff(wantReported, doc["reported"]); diff != "" {
		t.Errorf("reported after PATCH (-want +got):\n%s", diff)
	}
}

func TestHubIsolatesDevices(t *testing.T) {
	e := startHub(t, nil)
	keyA := e.sasDevice("a", true)
	keyB := e.sasDevice("b", true)
	exp := hubNow.Add(time.Hour)
	lost := make(chan error, 1)
	a := e.mustDial(t, dialer{id: "a", username: hubUsername(hubA, "a"), password: hubSAS(hubA, "a", keyA, exp), lost: lost})
	b := e.mustDial(t, dialer{id: "b", username: hubUsername(hubA, "b"), password: hubSAS(hubA, "b", keyB, exp)})
	_, resA := subscribe(t, a, "$iothub/twin/res/#", 0)
	_, resB := subscribe(t, b, "$iothub/twin/res/#", 0)

	t.Run("twin replies reach only the requester", func(t *testing.T) {
		_, doc := getTwin(t, a, resA, "r1")
		if mode := doc["desired"].(map[string]any)["mode"]; mode != "a" {
			t.Errorf("A got the twin of %v", mode)
		}
		select {
		case m := <-resB:
			t.Errorf("B received A's reply on %s", m.Topic())
		case <-time.After(300 * time.Millisecond):
		}
		_, doc = getTwin(t, b, resB, "r1")
		if mode := doc["desired"].(map[string]any)["mode"]; mode != "b" {
			t.Errorf("B got the twin of %v", mode)
		}
		select {
		case m := <-resA:
			t.Errorf("A received B's reply on %s", m.Topic())
		case <-time.After(300 * time.Millisecond):
		}
	})

	t.Run("subscriptions", func(t *testing.T) {
		for _, tc := range []struct {
			filter string
			qos    byte
			want   byte
		}{
			{"devices/a/messages/devicebound/#", 1, 1},
			{"$iothub/twin/PATCH/properties/desired/#", 0, 0},
			{"$iothub/methods/POST/#", 2, 1}, // no QoS 2 at IoT Hub
			{"devices/b/messages/devicebound/#", 1, 0x80},
			{"devices/+/messages/devicebound/#", 1, 0x80},
			{"devices/b/messages/events/#", 1, 0x80},
			{"#", 0, 0x80},
			{"$SYS/#", 0, 0x80},
			{"$iothub/#", 0, 0x80},
		} {
			if got, _ := subscribe(t, a, tc.filter, tc.qos); got != tc.want {
				t.Errorf("subscribe %s: SUBACK %#x, want %#x", tc.filter, got, tc.want)
			}
		}
	})

	t.Run("publishing as another device disconnects", func(t *testing.T) {
		a.Publish("devices/b/messages/events/", 1, false, "spoof").WaitTimeout(200 * time.Millisecond)
		select {
		case <-lost:
		case <-time.After(10 * time.Second):
			t.Fatal("A still connected after publishing to B's topic")
		}
		if n := len(e.hub.Telemetry("b")); n != 0 {
			t.Errorf("B has %d messages, want none", n)
		}
	})
}

func TestHubRefusesLargeMessage(t *testing.T) {
	e := startHub(t, func(c *devserver.HubConfig) { c.MaxMessage = 1024 })
	key := e.sasDevice("d1", true)
	lost := make(chan error, 1)
	c := e.mustDial(t, dialer{id: "d1", username: hubUsername(hubA, "d1"), password: hubSAS(hubA, "d1", key, hubNow.Add(time.Hour)), lost: lost})
	wait(t, c.Publish("devices/d1/messages/events/k=v", 1, false, strings.Repeat("x", 1020)))
	c.Publish("devices/d1/messages/events/k=v", 1, false, strings.Repeat("x", 1022)).WaitTimeout(200 * time.Millisecond)
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("still connected after a message over the limit")
	}
	if n := len(e.hub.Telemetry("d1")); n != 1 {
		t.Errorf("%d messages recorded, want 1", n)
	}
}

func TestHubDefaultMaxMessage(t *testing.T) {
	e := startHub(t, nil)
	key := e.sasDevice("d1", true)
	lost := make(chan error, 1)
	c := e.mustDial(t, dialer{id: "d1", username: hubUsername(hubA, "d1"), password: hubSAS(hubA, "d1", key, hubNow.Add(time.Hour)), lost: lost})
	wait(t, c.Publish("devices/d1/messages/events/", 1, false, make([]byte, devserver.DefaultHubMaxMessage)))
	c.Publish("devices/d1/messages/events/", 1, false, make([]byte, devserver.DefaultHubMaxMessage+1)).WaitTimeout(200 * time.Millisecond)
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("still connected after a message over 256 KiB")
	}
}

func TestHubCloseLeaksNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		e := startHub(t, nil)
		key := e.sasDevice("d1", true)
		c := e.mustDial(t, dialer{id: "d1", username: hubUsername(hubA, "d1"), password: hubSAS(hubA, "d1", key, hubNow.Add(time.Hour))})
		wait(t, c.Publish("devices/d1/messages/events/", 1, false, "x"))
		// A refused device and a connection that never finishes its
		// handshake must not hold Close or leak.
		e.dial(t, dialer{id: "d1", username: hubUsername(hubA, "d1"), password: "nope"})
		raw, err := net.Dial("tcp", e.hub.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		time.Sleep(50 * time.Millisecond)

		done := make(chan struct{})
		go func() { e.hub.Close(); e.hub.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return in 10 s")
		}
		c.Disconnect(50)
		raw.Close()
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= before {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines before the hub, %d after Close:\n%s", before, n, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestNewHubChecksConfig(t *testing.T) {
	ca := newTestCA(t, "ca")
	good := devserver.HubConfig{
		TLS:       &tls.Config{Certificates: []tls.Certificate{ca.issue(t, "hub", hubA)}},
		Hosts:     []string{hubA},
		Directory: &memDirectory{},
	}
	for name, edit := range map[string]func(*devserver.HubConfig){
		"no TLS":       func(c *devserver.HubConfig) { c.TLS = nil },
		"no directory": func(c *devserver.HubConfig) { c.Directory = nil },
		"no hosts":     func(c *devserver.HubConfig) { c.Hosts = nil },
		"bad host":     func(c *devserver.HubConfig) { c.Hosts = []string{"a/b"} },
	} {
		cfg := good
		edit(&cfg)
		if _, err := devserver.NewHub(cfg); station.KindOf(err) != station.KindInvalid {
			t.Errorf("%s: NewHub = %v, want kind invalid", name, err)
		}
	}
	h, err := devserver.NewHub(good)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := h.Start(t.Context()); station.KindOf(err) != station.KindConflict {
		t.Errorf("second Start = %v, want kind conflict", err)
	}
	h.Close()
	if err := h.Start(t.Context()); station.KindOf(err) != station.KindConflict {
		t.Errorf("Start after Close = %v, want kind conflict", err)
	}
}
