package devserver_test

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/gorilla/websocket"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// startMQTT starts a devserver with its MQTT listener on 127.0.0.1:0.
func startMQTT(t *testing.T) *env {
	t.Helper()
	return start(t, devserver.Config{MQTTAddr: "127.0.0.1:0"})
}

// dpsUsername is the user name the Node SDK sends.
func dpsUsername(scope, regID string) string {
	return scope + "/registrations/" + regID + "/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device-mqtt%2F1.8.1"
}

// dialDPS connects a paho client to broker (tls:// or wss://); it returns
// the client (nil when refused), the CONNACK code and the error.
func (e *env) dialDPS(t *testing.T, broker, id, username, password string) (paho.Client, byte, error) {
	t.Helper()
	opts := paho.NewClientOptions().
		AddBroker(broker).
		SetClientID(id).
		SetUsername(username).
		SetPassword(password).
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "127.0.0.1"}).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).
		SetOrderMatters(false)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		t.Fatalf("connect %s: no CONNACK in 15 s", id)
	}
	code := tok.(*paho.ConnectToken).ReturnCode()
	if err := tok.Error(); err != nil {
		return nil, code, err
	}
	t.Cleanup(func() { c.Disconnect(50) })
	return c, code, nil
}

// mustDialDPS connects over TLS and subscribes to the response topics.
func (e *env) mustDialDPS(t *testing.T, id, password string) (paho.Client, chan paho.Message) {
	t.Helper()
	c, code, err := e.dialDPS(t, "tls://"+e.srv.MQTTAddr(), id, dpsUsername(e.srv.IDScope(), id), password)
	if err != nil {
		t.Fatalf("connect %s: CONNACK %d: %v", id, code, err)
	}
	granted, ch := subscribe(t, c, "$dps/registrations/res/#", 1)
	if granted != 1 {
		t.Fatalf("SUBACK %d, want QoS 1 granted", granted)
	}
	return c, ch
}

var dpsResTopic = regexp.MustCompile(`^\$dps/registrations/res/(\d+)/\?\$rid=([^&]*)(?:&retry-after=(\d+))?$`)

type dpsAnswer struct {
	status     int
	rid        string
	retryAfter string
	raw        []byte
	op         dps.RegistrationOperationStatus
}

// dpsRequest publishes to topic and waits for the answer with rid.
func dpsRequest(t *testing.T, c paho.Client, ch chan paho.Message, topic, rid string, body []byte) dpsAnswer {
	t.Helper()
	wait(t, c.Publish(topic, 1, false, body))
	m := receive(t, ch)
	g := dpsResTopic.FindStringSubmatch(m.Topic())
	if g == nil {
		t.Fatalf("response topic %q is not $dps/registrations/res/{status}/?$rid=…[&retry-after=…]", m.Topic())
	}
	if strings.Count(m.Topic(), "$") != 2 {
		t.Errorf("response topic %q: want exactly two '$' (Python SDK)", m.Topic())
	}
	a := dpsAnswer{rid: g[2], retryAfter: g[3], raw: m.Payload()}
	a.status, _ = strconv.Atoi(g[1])
	if a.rid != rid {
		t.Fatalf("response $rid %q, want %q echoed", a.rid, rid)
	}
	if a.status < 300 {
		if err := json.Unmarshal(a.raw, &a.op); err != nil {
			t.Fatalf("answer %s: %v", a.raw, err)
		}
	}
	return a
}

// registerMQTT runs a registration over MQTT to its final answer.
func registerMQTT(t *testing.T, c paho.Client, ch chan paho.Message, regID string, body []byte) dpsAnswer {
	t.Helper()
	a := dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=1", "1", body)
	if a.status != http.StatusAccepted || a.op.Status != dps.StatusAssigning || a.op.OperationID == "" || a.retryAfter == "" {
		t.Fatalf("register: %d retry-after=%q %s, want 202 assigning with an operationId and retry-after", a.status, a.retryAfter, a.raw)
	}
	opID := a.op.OperationID
	deadline := time.Now().Add(20 * time.Second)
	for i := 2; ; i++ {
		rid := "0f3c-" + strconv.Itoa(i) // opaque, echoed verbatim
		p := dpsRequest(t, c, ch, "$dps/registrations/GET/iotdps-get-operationstatus/?$rid="+rid+"&operationId="+opID, rid, []byte(" "))
		switch p.status {
		case http.StatusOK:
			if p.retryAfter != "" {
				t.Errorf("final answer has retry-after %q", p.retryAfter)
			}
			return p
		case http.StatusAccepted:
			st := p.op.RegistrationState
			if p.retryAfter == "" || st == nil || st.RegistrationID != regID || st.Status != dps.StatusAssigning {
				t.Fatalf("poll answer %d retry-after=%q %s: want assigning with registrationState and retry-after", p.status, p.retryAfter, p.raw)
			}
		default:
			t.Fatalf("poll: %d %s", p.status, p.raw)
		}
		if time.Now().After(deadline) {
			t.Fatal("still assigning after 20 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestMQTTSymmetricKeyRegistration(t *testing.T) {
	e := start(t, devserver.Config{MQTTAddr: "127.0.0.1:0", AssignmentDelay: 30 * time.Millisecond})
	scope := e.srv.IDScope()
	const regID = "mqtt-sym-1"
	_, primary, secondary := e.enrollSymmetricKey(t, regID, func(en *dps.IndividualEnrollment) { en.DeviceID = "mqtt-device" })
	tok := dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour))
	c, ch := e.mustDialDPS(t, regID, tok)

	body, _ := json.Marshal(dps.DeviceRegistration{RegistrationID: regID})
	final := registerMQTT(t, c, ch, regID, body)
	st := final.op.RegistrationState
	if final.op.Status != dps.StatusAssigned || st == nil || st.Status != dps.StatusAssigned || st.DeviceID != "mqtt-device" || st.AssignedHub == "" {
		t.Fatalf("final %s: want assigned, device mqtt-device on a hub", final.raw)
	}
	// §2.6: operationId and status come before registrationState.
	if !bytes.HasPrefix(final.raw, []byte(`{"operationId":`)) || !bytes.Contains(final.raw, []byte(`"status":"assigned","registrationState":{"symmetricKey":{},`)) {
		t.Errorf("final body %s: want operationId, status, then registrationState", final.raw)
	}

	// The same state as over HTTPS: the hub knows the device with the
	// enrollment's keys, and the HTTPS lookup agrees.
	hd, err := e.srv.HubDevice(t.Context(), st.AssignedHub, st.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if !hd.Enabled || !bytes.Equal(hd.PrimaryKey, primary) || !bytes.Equal(hd.SecondaryKey, secondary) {
		t.Errorf("hub device enabled=%v: want enabled with the enrollment's keys", hd.Enabled)
	}
	r := e.do(t, http.MethodPost, "/"+scope+"/registrations/"+regID+"?api-version=2019-03-31", tok, dps.DeviceRegistration{RegistrationID: regID})
	var looked dps.DeviceRegistrationState
	r.decode(t, &looked)
	if r.status != http.StatusOK || looked.AssignedHub != st.AssignedHub || looked.DeviceID != st.DeviceID || looked.Status != dps.StatusAssigned {
		t.Errorf("HTTPS lookup %d %s, want the MQTT assignment", r.status, r.body)
	}
	// Then over HTTPS again: the same hub (hashed allocation is stable).
	again := e.registerSAS(t, regID, tok)
	if again.final.RegistrationState == nil || again.final.RegistrationState.AssignedHub != st.AssignedHub {
		t.Errorf("HTTPS registration after MQTT: %s, want hub %s", again.finalRaw, st.AssignedHub)
	}

	// A poll of an unknown operation: 404 with an error body, same $rid.
	p := dpsRequest(t, c, ch, "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=9&operationId=4.nope", "9", nil)
	var eb dps.ErrorDetails
	if err := json.Unmarshal(p.raw, &eb); p.status != http.StatusNotFound || err != nil || eb.ErrorCode/1000 != 404 || eb.TrackingID == "" {
		t.Errorf("unknown operation: %d %s, want 404 with an error body", p.status, p.raw)
	}
}

// C# sends an empty register body; a {"payload":…} body without
// registrationId is accepted too.
func TestMQTTRegisterBodies(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	for _, tt := range []struct{ name, body string }{
		{"empty", ""},
		{"payload only", `{"payload":{"model":"x"}}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			regID := "mqtt-body-" + strings.ReplaceAll(tt.name, " ", "-")
			_, primary, _ := e.enrollSymmetricKey(t, regID)
			c, ch := e.mustDialDPS(t, regID, dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
			final := registerMQTT(t, c, ch, regID, []byte(tt.body))
			if final.op.Status != dps.StatusAssigned {
				t.Fatalf("final %s, want assigned", final.raw)
			}
		})
	}
	// A body naming another registration is refused with 400.
	const regID = "mqtt-body-other"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	c, ch := e.mustDialDPS(t, regID, dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
	a := dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=x", "x", []byte(`{"registrationId":"someone-else"}`))
	if a.status != http.StatusBadRequest || !bytes.Contains(a.raw, []byte(`"errorCode":400`)) {
		t.Errorf("mismatched registrationId: %d %s, want 400", a.status, a.raw)
	}
}

// Every device subscribes to the same $dps/registrations/res/#: answers
// must reach the requester only.
func TestMQTTRepliesGoToRequesterOnly(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	var cs [2]paho.Client
	var chs [2]chan paho.Message
	for i, id := range []string{"iso-a", "iso-b"} {
		_, primary, _ := e.enrollSymmetricKey(t, id)
		cs[i], chs[i] = e.mustDialDPS(t, id, dps.NewDeviceSAS(scope, id, primary, time.Now().Add(time.Hour)))
	}
	a := registerMQTT(t, cs[0], chs[0], "iso-a", nil)
	b := registerMQTT(t, cs[1], chs[1], "iso-b", nil)
	if a.op.RegistrationState.RegistrationID != "iso-a" || b.op.RegistrationState.RegistrationID != "iso-b" {
		t.Fatalf("answers %s / %s crossed", a.raw, b.raw)
	}
	// Device b asks about a's operation: refused, and a hears nothing.
	p := dpsRequest(t, cs[1], chs[1], "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId="+a.op.OperationID, "1", nil)
	if p.status != http.StatusNotFound {
		t.Errorf("b polling a's operation: %d %s, want 404", p.status, p.raw)
	}
	time.Sleep(100 * time.Millisecond)
	for i, ch := range chs {
		select {
		case m := <-ch:
			t.Errorf("device %d got a message meant for another: %s %s", i, m.Topic(), m.Payload())
		default:
		}
	}
}

func TestMQTTRefusesConnection(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	const regID = "mqtt-refused"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	other := bytes.Repeat([]byte{7}, 32)
	sd := newSoftDevice(t, false)
	ek, _ := sd.keys()
	e.enroll(t, "mqtt-tpm", ek)
	broker := "tls://" + e.srv.MQTTAddr()
	good := dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour))

	tests := []struct {
		name, id, username, password string
		code                         byte
	}{
		{"bad signature", regID, dpsUsername(scope, regID), dps.NewDeviceSAS(scope, regID, other, time.Now().Add(time.Hour)), 5},
		{"expired", regID, dpsUsername(scope, regID), dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(-time.Minute)), 5},
		{"wrong scope", regID, dpsUsername("0ne00FFFFFF", regID), dps.NewDeviceSAS("0ne00FFFFFF", regID, primary, time.Now().Add(time.Hour)), 5},
		{"token for another registration", regID, dpsUsername(scope, regID), dps.NewDeviceSAS(scope, "someone", primary, time.Now().Add(time.Hour)), 5},
		{"not enrolled", "nobody", dpsUsername(scope, "nobody"), dps.NewDeviceSAS(scope, "nobody", primary, time.Now().Add(time.Hour)), 5},
		{"no password", regID, dpsUsername(scope, regID), "", 5},
		{"malformed user name", regID, "hello", good, 4},
		{"client ID is not the registration ID", "other", dpsUsername(scope, regID), good, 2},
		// TPM over MQTT: refused, as DPS offers TPM over HTTPS and AMQP only.
		{"TPM enrollment", "mqtt-tpm", dpsUsername(scope, "mqtt-tpm"), dps.NewDeviceSAS(scope, "mqtt-tpm", primary, time.Now().Add(time.Hour)), 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, code, err := e.dialDPS(t, broker, tt.id, tt.username, tt.password)
			if err == nil {
				c.Disconnect(0)
				t.Fatal("connected, want a refusal")
			}
			if code != tt.code {
				t.Errorf("CONNACK %d (%v), want %d", code, err, tt.code)
			}
		})
	}
	// The good token works, with the user name variants of the SDKs.
	for _, u := range []string{
		scope + "/registrations/" + regID + "/api-version=2019-03-31",
		scope + "/registrations/" + regID + "/api-version=2021-06-01&ClientVersion=1.15.0",
		scope + "/registrations/" + regID + "/?api-version=2019-03-31",
	} {
		if _, code, err := e.dialDPS(t, broker, regID, u, good); err != nil {
			t.Errorf("user name %q: CONNACK %d: %v", u, code, err)
		}
	}
}

// A register carrying a tpm object over MQTT is refused with 400.
func TestMQTTRefusesTPMBody(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	const regID = "mqtt-tpm-body"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	c, ch := e.mustDialDPS(t, regID, dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
	a := dpsRequest(t, c, ch, "$dps/registrations/PUT/iotdps-register/?$rid=1", "1",
		[]byte(`{"registrationId":"`+regID+`","tpm":{"endorsementKey":"AAAA","storageRootKey":"AAAA"}}`))
	if a.status != http.StatusBadRequest || !bytes.Contains(a.raw, []byte("TPM attestation is not supported over MQTT")) {
		t.Errorf("TPM body over MQTT: %d %s, want 400 saying TPM is not supported over MQTT", a.status, a.raw)
	}
}

// A publish over 96 KB ends the connection (§2.5).
func TestMQTTRefusesLargeMessage(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	const regID = "mqtt-large"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	c, _ := e.mustDialDPS(t, regID, dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
	c.Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", 0, false, bytes.Repeat([]byte(" "), 97<<10))
	deadline := time.Now().Add(10 * time.Second)
	for c.IsConnectionOpen() {
		if time.Now().After(deadline) {
			t.Fatal("still connected 10 s after a 97 KB publish")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMQTTOffByDefault(t *testing.T) {
	e := start(t, devserver.Config{})
	if a := e.srv.MQTTAddr(); a != "" {
		t.Errorf("MQTTAddr %q without Config.MQTTAddr, want none", a)
	}
}

// MQTT over WebSockets on the HTTPS listener (§2.1), with paho over wss.
func TestMQTTOverWebSockets(t *testing.T) {
	e := start(t, devserver.Config{}) // no MQTT listener: WebSockets are served anyway
	scope := e.srv.IDScope()
	const regID = "mqtt-ws-1"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	broker := "wss://" + e.srv.Addr() + "/$iothub/websocket"
	c, code, err := e.dialDPS(t, broker, regID, dpsUsername(scope, regID), dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatalf("connect over wss: CONNACK %d: %v", code, err)
	}
	_, ch := subscribe(t, c, "$dps/registrations/res/#", 1)
	final := registerMQTT(t, c, ch, regID, nil)
	if final.op.Status != dps.StatusAssigned {
		t.Fatalf("final %s, want assigned", final.raw)
	}
	// A bad token is refused over WebSockets too.
	if _, code, err := e.dialDPS(t, broker, regID, dpsUsername(scope, regID), dps.NewDeviceSAS(scope, regID, []byte("nope"), time.Now().Add(time.Hour))); err == nil || code != 5 {
		t.Errorf("bad token over wss: CONNACK %d (%v), want 5", code, err)
	}

	// The subprotocol offered is echoed, in either spelling.
	for _, proto := range []string{"mqtt", "MQTT"} {
		d := websocket.Dialer{TLSClientConfig: &tls.Config{RootCAs: e.pool}, Subprotocols: []string{proto}}
		ws, resp, err := d.Dial(broker, nil)
		if err != nil {
			t.Fatalf("dial with %s: %v", proto, err)
		}
		if got := ws.Subprotocol(); got != proto {
			t.Errorf("subprotocol %q, want %q", got, proto)
		}
		resp.Body.Close()
		ws.Close()
	}
	// A plain GET is not an upgrade: 400.
	if r := e.do(t, http.MethodGet, "/$iothub/websocket", "", nil); r.status != http.StatusBadRequest {
		t.Errorf("GET without upgrade: %d %s, want 400", r.status, r.body)
	}
}

// Close disconnects MQTT devices (TLS and WebSockets) and leaves no
// goroutines behind.
func TestMQTTCloseLeaksNoGoroutines(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	const regID = "mqtt-close"
	_, primary, _ := e.enrollSymmetricKey(t, regID)
	tok := dps.NewDeviceSAS(scope, regID, primary, time.Now().Add(time.Hour))
	e.mustDialDPS(t, regID, tok)
	if _, code, err := e.dialDPS(t, "wss://"+e.srv.Addr()+"/$iothub/websocket", regID, dpsUsername(scope, regID), tok); err != nil {
		t.Fatalf("wss: CONNACK %d: %v", code, err)
	}
	// A connection that never sends CONNECT.
	raw, err := tls.Dial("tcp", e.srv.MQTTAddr(), &tls.Config{RootCAs: e.pool})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	done := make(chan error, 1)
	go func() { done <- e.srv.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close still running after 10 s")
	}
	e.client.CloseIdleConnections()
	checkNoGoroutines(t)
}

// Close ends a WebSocket that never sent CONNECT, at once.
func TestMQTTCloseEndsIdleWebSocket(t *testing.T) {
	e := start(t, devserver.Config{})
	d := websocket.Dialer{TLSClientConfig: &tls.Config{RootCAs: e.pool}, Subprotocols: []string{"mqtt"}}
	ws, resp, err := d.Dial("wss://"+e.srv.Addr()+"/$iothub/websocket", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	defer ws.Close()
	start := time.Now()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v with an idle WebSocket", d)
	}
	checkNoGoroutines(t)
}
