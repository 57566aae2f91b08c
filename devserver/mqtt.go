package devserver

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// The DPS device API over MQTT 3.1.1 (dps-protocol.md §2).
//
// A device connects with TLS (Config.MQTTAddr, or WebSockets on the HTTPS
// listener at /$iothub/websocket), client ID = registration ID, user name
// {idScope}/registrations/{regId}/api-version=…[&ClientVersion=…] and, for
// symmetric keys, the SAS token as the password (X.509: the TLS client
// certificate and no password). The device is authenticated at CONNECT by
// the same attestation as over HTTPS: refusals are CONNACK 5 (not
// authorized), 4 (malformed user name), 2 (client ID), 1 (not MQTT 3.1.1)
// or 3 (the store failed). TPM enrollments are refused at CONNECT with
// CONNACK 5, as DPS offers TPM over HTTPS and AMQP only, and a register
// carrying a tpm object gets res/400.
//
// Publishes to $dps/registrations/PUT/iotdps-register/?$rid={rid} and
// $dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}
// run the same registration core as the HTTPS handlers (startRegistration,
// operationStatus), and the answer is written to the requesting client
// alone on $dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]:
// every device subscribes to the same res/# filter, so nothing is routed
// through the broker. Any other publish ends the connection.

// Topics of DPS's MQTT surface.
const (
	dpsTopicRegister = "$dps/registrations/PUT/iotdps-register/"
	dpsTopicPoll     = "$dps/registrations/GET/iotdps-get-operationstatus/"
	dpsTopicResponse = "$dps/registrations/res/"
)

// dpsMQTTTimeout bounds the work of one CONNECT or request.
const dpsMQTTTimeout = 10 * time.Second

// dpsMQTT is the MQTT transport of a Server: one mochi broker serving the
// TLS listener and the WebSocket connections.
type dpsMQTT struct {
	s   *Server
	srv *mqtt.Server
	log *slog.Logger
	ws  *dpsWSListener

	mu       sync.Mutex
	addr     string
	sessions map[*mqtt.Client]*dpsSession
}

// dpsSession is an authenticated device connection. The credentials are
// kept to run the attestation again for every request, as HTTPS does.
type dpsSession struct {
	scope, registrationID string
	apiVersion            string
	password              string
	tls                   *tls.ConnectionState
	remote                string // the client's address, for geoLatency allocation
}

// IDs of the broker's listeners.
const (
	dpsListenerTLS = "dps-mqtts"
	dpsListenerWS  = "dps-wss"
)

// startMQTT makes the MQTT broker and, when Config.MQTTAddr is set, listens
// on it with tc. Called by Start with s.mu held.
func (s *Server) startMQTT(ctx context.Context, tc *tls.Config) error {
	const op = "start devserver MQTT listener"
	m := &dpsMQTT{s: s, log: s.log.With("transport", "mqtt"), sessions: map[*mqtt.Client]*dpsSession{},
		ws: &dpsWSListener{}}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MinimumProtocolVersion = 4 // DPS speaks MQTT 3.1.1 only
	caps.MaximumQos = 1
	caps.SharedSubAvailable = 0
	caps.SubIDAvailable = 0
	caps.TopicAliasMaximum = 0
	caps.MaximumClientWritesPending = 64
	caps.MaximumSessionExpiryInterval = 0
	caps.MaximumPacketSize = uint32(s.cfg.Quotas.messageBytes() + 16<<10) // the exact limit is checked in the hook
	m.srv = mqtt.New(&mqtt.Options{
		Capabilities:           caps,
		Logger:                 slog.New(minLevel{m.log.With("mqtt", "mochi").Handler(), slog.LevelWarn}),
		SysTopicResendInterval: math.MaxInt32,
	})
	if err := m.srv.AddHook(&dpsHook{m: m}, nil); err != nil {
		return station.E(op, station.KindInternal, err)
	}
	// The WebSocket connections are attached by the HTTPS handler; this
	// listener lets Close disconnect them.
	if err := m.srv.AddListener(m.ws); err != nil {
		return station.E(op, station.KindInternal, err)
	}
	var ln net.Listener
	if s.cfg.MQTTAddr != "" {
		mc := tc.Clone()
		if mc.ClientAuth == tls.NoClientCert {
			// X.509 devices present their certificate; the attestation
			// checks it.
			mc.ClientAuth = tls.RequestClientCert
			if mc.ClientCAs != nil {
				mc.ClientAuth = tls.VerifyClientCertIfGiven
			}
		}
		var lc net.ListenConfig
		var err error
		if ln, err = lc.Listen(ctx, "tcp", s.cfg.MQTTAddr); err != nil {
			return station.Errorf(op, station.KindUnavailable, "listen on %s: %w: choose a free address for MQTT", s.cfg.MQTTAddr, err)
		}
		l := &hubListener{id: dpsListenerTLS, ln: ln, tls: mc, log: m.log}
		if err := m.srv.AddListener(l); err != nil {
			_ = ln.Close()
			return station.E(op, station.KindInternal, err)
		}
		m.addr = ln.Addr().String()
	}
	if err := m.srv.Serve(); err != nil {
		if ln != nil {
			_ = ln.Close()
		}
		return station.E(op, station.KindInternal, err)
	}
	s.mqtt = m
	if m.addr != "" {
		m.log.Info("devserver MQTT listening", "addr", m.addr)
	}
	return nil
}

// closeMQTT disconnects every MQTT device and stops the listener.
func (s *Server) closeMQTT() {
	s.mu.Lock()
	m := s.mqtt
	s.mu.Unlock()
	if m != nil {
		_ = m.srv.Close() // never fails
	}
}

// MQTTAddr returns the address of the MQTT over TLS listener (host:port),
// or "" before Start or when Config.MQTTAddr is empty.
func (s *Server) MQTTAddr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mqtt == nil {
		return ""
	}
	return s.mqtt.addr
}

// dpsWSListener stands for the WebSocket connections in mochi: it accepts
// nothing itself, but tracks the connections the HTTPS handler hands to
// mochi, so that Close can end them (even before CONNECT) and wait for
// them: mochi's Close must not race a late EstablishConnection.
type dpsWSListener struct {
	conns connSet
}

func (*dpsWSListener) ID() string                  { return dpsListenerWS }
func (*dpsWSListener) Address() string             { return dpsWebSocketPath }
func (*dpsWSListener) Protocol() string            { return "wss" }
func (*dpsWSListener) Init(*slog.Logger) error     { return nil }
func (*dpsWSListener) Serve(listeners.EstablishFn) {}

func (l *dpsWSListener) Close(closeClients listeners.CloseFn) {
	l.conns.close(nil, func() { closeClients(dpsListenerWS) })
}

// dpsHook plugs the DPS device API into mochi, as hubHook does for the
// hub: authentication in OnConnect with our own CONNACK, and every publish
// answered to its sender alone.
type dpsHook struct {
	mqtt.HookBase
	m *dpsMQTT
}

func (k *dpsHook) ID() string { return "kiln-dps" }

func (k *dpsHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnDisconnect,
		mqtt.OnPacketRead, mqtt.OnPublish, mqtt.OnPublished:
		return true
	}
	return false
}

// OnConnect authenticates the device; on refusal it writes the CONNACK
// itself and returns an error, which makes mochi close the connection.
func (k *dpsHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	m := k.m
	sess, code, err := m.authenticate(cl, pk)
	if err != nil {
		m.log.Info("device refused", "client", hubClip(pk.Connect.ClientIdentifier, 130), "remote", cl.Net.Remote,
			"connack", code.Code, "reason", err.Error())
		_ = cl.WritePacket(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Connack},
			ReasonCode:  code.Code,
		})
		return code
	}
	cl.Properties.Will = mqtt.Will{} // DPS has no wills
	m.mu.Lock()
	m.sessions[cl] = sess
	m.mu.Unlock()
	m.log.Info("device connected", "registrationId", sess.registrationID, "api_version", sess.apiVersion,
		"listener", cl.Net.Listener, "remote", cl.Net.Remote)
	return nil
}

// OnConnectAuthenticate admits the clients OnConnect accepted.
func (k *dpsHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	return k.m.session(cl) != nil
}

// OnDisconnect forgets the client's session.
func (k *dpsHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	k.m.mu.Lock()
	delete(k.m.sessions, cl)
	k.m.mu.Unlock()
}

// OnACLCheck lets a device subscribe to the response topics only, and
// publish register and poll requests only; another publish ends the
// connection.
func (k *dpsHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if k.m.session(cl) == nil {
		return false
	}
	ok := strings.HasPrefix(topic, dpsTopicResponse)
	if write {
		ok = strings.HasPrefix(topic, dpsTopicRegister) || strings.HasPrefix(topic, dpsTopicPoll)
	}
	if !ok {
		k.m.log.Info("topic refused", "client", cl.ID, "topic", hubClip(topic, 200), "publish", write)
		if write {
			cl.Stop(packets.ErrNotAuthorized)
		}
	}
	return ok
}

// OnPacketRead disconnects a device that publishes more than the message
// limit (DPS's 96 KB, §2.5; Config.Quotas) or with QoS 2.
func (k *dpsHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	reason := ""
	switch {
	case len(pk.Payload) > k.m.s.cfg.Quotas.messageBytes():
		reason = "message too large"
	case pk.FixedHeader.Qos > 1:
		reason = "QoS 2 is not supported"
	default:
		return pk, nil
	}
	k.m.log.Info("device disconnected", "reason", reason, "client", cl.ID, "bytes", len(pk.Payload), "max", k.m.s.cfg.Quotas.messageBytes())
	return pk, packets.ErrRejectPacket
}

// OnPublish keeps every publish out of the broker; OnPublished answers it.
func (k *dpsHook) OnPublish(_ *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	return pk, packets.CodeSuccessIgnore
}

// OnPublished answers a register or poll after mochi acknowledged it.
func (k *dpsHook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if sess := k.m.session(cl); sess != nil {
		k.m.serve(cl, sess, pk.TopicName, pk.Payload)
	}
}

func (m *dpsMQTT) session(cl *mqtt.Client) *dpsSession {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sessions[cl]
}

// parseDPSUsername parses {idScope}/registrations/{regId}/api-version=…&ClientVersion=…
// (§2.1): split at the first /registrations/, then at the next '/', and
// read the rest as a query string (a leading '?' is accepted; the
// parameters are optional). Kinds: Invalid.
func parseDPSUsername(u string) (scope, regID string, params map[string]string, err error) {
	scope, rest, ok := strings.Cut(u, "/registrations/")
	regID, q, _ := strings.Cut(rest, "/")
	if !ok || scope == "" || regID == "" {
		return "", "", nil, station.Errorf("parse MQTT user name", station.KindInvalid,
			"the user name %.200q is not {idScope}/registrations/{registrationId}/api-version=…", u)
	}
	return scope, regID, parseBag(strings.TrimPrefix(q, "?")), nil
}

// authenticate checks a CONNECT and returns the device's session, or the
// CONNACK code to refuse it with and why.
func (m *dpsMQTT) authenticate(cl *mqtt.Client, pk packets.Packet) (*dpsSession, connackCode, error) {
	const op = "authenticate device"
	if pk.ProtocolVersion != 4 {
		return nil, connackBadProtocol, station.Errorf(op, station.KindInvalid,
			"MQTT protocol level %d: DPS speaks MQTT 3.1.1 (level 4) only", pk.ProtocolVersion)
	}
	id := pk.Connect.ClientIdentifier
	if id == "" {
		return nil, connackBadClientID, station.Errorf(op, station.KindInvalid, "no client ID: set it to the registration ID")
	}
	if !pk.Connect.UsernameFlag {
		return nil, connackBadCredentials, station.Errorf(op, station.KindInvalid,
			"registration %.130q sent no user name: send {idScope}/registrations/{registrationId}/api-version=…", id)
	}
	scope, regID, params, err := parseDPSUsername(string(pk.Connect.Username))
	if err != nil {
		return nil, connackBadCredentials, err
	}
	if !strings.EqualFold(regID, id) {
		return nil, connackBadClientID, station.Errorf(op, station.KindInvalid,
			"the user name names registration %.130q but the client ID is %.130q: use the registration ID for both", regID, id)
	}
	sess := &dpsSession{scope: scope, registrationID: regID, apiVersion: params["api-version"], tls: connState(cl.Net.Conn), remote: cl.Net.Remote}
	if pk.Connect.PasswordFlag {
		sess.password = string(pk.Connect.Password)
	}
	ctx, cancel := context.WithTimeout(m.s.ctx, dpsMQTTTimeout)
	defer cancel()
	d := m.request(sess, newTrackingID())
	if err := m.s.openDeviceRequest(ctx, d, scope, regID, nil); err != nil {
		return nil, connackFor(err), err
	}
	if strings.EqualFold(d.enrollment.Attestation.Type, dps.AttestationTPM) {
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"registration %q uses TPM attestation, which DPS offers over HTTPS and AMQP only, not MQTT: register it over HTTPS", regID)
	}
	if sess.password == "" && len(d.clientChain()) == 0 {
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"registration %q sent neither a SAS token nor a client certificate: send the SAS token as the password, or a certificate", regID)
	}
	// Symmetric key: the SAS token. X.509: the certificate chain in d.tls,
	// which openDeviceRequest attested already and authenticate checks, as
	// over HTTPS.
	if _, _, err := m.s.authenticate(ctx, d); err != nil {
		return nil, connackFor(err), err
	}
	return sess, packets.CodeSuccess, nil
}

// connackFor maps an error of the registration core to a CONNACK code.
func connackFor(err error) connackCode {
	switch station.KindOf(err) {
	case station.KindUnauthorized, station.KindNotFound:
		return connackNotAuthorized
	case station.KindInvalid:
		return connackBadClientID
	}
	return connackUnavailable
}

// connState returns the TLS state of a connection, looking through
// wrappers as peerCertificate does; nil when it is not TLS.
func connState(c net.Conn) *tls.ConnectionState {
	for range 8 {
		switch v := c.(type) {
		case interface{ ConnectionState() tls.ConnectionState }:
			cs := v.ConnectionState()
			return &cs
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

func (m *dpsMQTT) request(sess *dpsSession, trackingID string) *deviceRequest {
	return &deviceRequest{transport: "mqtt", authorization: sess.password, tls: sess.tls, trackingID: trackingID, remote: sess.remote}
}

// serve answers one register or poll publish.
func (m *dpsMQTT) serve(cl *mqtt.Client, sess *dpsSession, topic string, payload []byte) {
	trackingID := newTrackingID()
	log := m.log.With("trackingId", trackingID, "registrationId", sess.registrationID)
	_, query, _ := strings.Cut(topic, "?")
	rid := rawParam(query, "$rid")
	ctx, cancel := context.WithTimeout(m.s.ctx, dpsMQTTTimeout)
	defer cancel()

	d := m.request(sess, trackingID)
	var (
		status int
		st     *dps.RegistrationOperationStatus
		err    error
	)
	switch {
	case strings.HasPrefix(topic, dpsTopicRegister):
		log.Debug("register", "apiVersion", sess.apiVersion)
		if err = m.s.throttleRegistration(); err != nil {
			break
		}
		if err = m.s.openDeviceRequest(ctx, d, sess.scope, sess.registrationID, payload); err == nil && d.body.TPM != nil {
			err = station.Errorf("register device", station.KindInvalid,
				"TPM attestation is not supported over MQTT: register TPM devices over HTTPS")
		}
		if err != nil {
			m.s.countRegistrationRefused(d, err) // startRegistration counts its own refusals
		} else {
			status = http.StatusAccepted
			st, err = m.s.startRegistration(ctx, d, log)
		}
	case strings.HasPrefix(topic, dpsTopicPoll):
		// The body is ignored (Node sends " ", the C SDK the register JSON).
		if err = m.s.openDeviceRequest(ctx, d, sess.scope, sess.registrationID, nil); err == nil {
			status, st, err = m.s.operationStatus(ctx, d, parseBag(query)["operationId"])
		}
	default:
		return // OnACLCheck refused it already
	}

	var body any = st
	if err != nil {
		var code int
		status, code = errorStatus(err)
		level := log.Info
		if status >= 500 {
			level = log.Error
		}
		level("request refused", "topic", hubClip(topic, 200), "status", status, "errorCode", code, "err", err)
		body = dps.ErrorDetails{ErrorCode: code, TrackingID: trackingID, Message: publicMessage(err, status), TimestampUTC: dps.Time{Time: m.s.now()}}
	}
	b, merr := json.Marshal(body)
	if merr != nil {
		log.Error("response not encoded", "err", merr)
		return
	}
	res := dpsTopicResponse + strconv.Itoa(status) + "/?$rid=" + rid
	if t := throttleOf(err); t != nil {
		res += "&retry-after=" + retryAfter(t.wait)
	} else if status == http.StatusAccepted || status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable {
		res += "&retry-after=" + retryAfter(m.s.cfg.RetryAfter)
	}
	m.reply(cl, res, b)
}

// rawParam returns the value of key in a query string exactly as sent
// (the $rid is echoed byte for byte, §2.2); "" when it is missing.
func rawParam(query, key string) string {
	for pair := range strings.SplitSeq(query, "&") {
		if k, v, _ := strings.Cut(pair, "="); k == key {
			return v
		}
	}
	return ""
}

// reply writes a PUBLISH to one client, at the QoS it was granted (at most
// 1), and only if it subscribed to a matching filter.
func (m *dpsMQTT) reply(cl *mqtt.Client, topic string, body []byte) {
	qos, subscribed := byte(0), false
	for f, sub := range cl.State.Subscriptions.GetAll() {
		if matchFilter(f, topic) {
			subscribed = true
			qos = max(qos, min(sub.Qos, 1))
		}
	}
	if !subscribed {
		m.log.Info("response dropped: the device did not subscribe to $dps/registrations/res/#", "client", cl.ID)
		return
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic,
		Payload:     body,
	}
	if qos > 0 {
		id, err := cl.NextPacketID()
		if err != nil {
			m.log.Info("response dropped: no packet ID free", "client", cl.ID)
			return
		}
		pk.PacketID = uint16(id)
		if cl.State.Inflight.Set(pk) { // PUBACK releases it, as for a routed message
			cl.State.Inflight.DecreaseSendQuota()
			atomic.AddInt64(&m.srv.Info.Inflight, 1)
		}
	}
	if err := cl.WritePacket(pk); err != nil {
		m.log.Debug("response not sent", "client", cl.ID, "error", err)
	}
}

// dpsWebSocketPath is where MQTT over WebSockets is served (§2.1).
const dpsWebSocketPath = "/$iothub/websocket"

var dpsUpgrader = websocket.Upgrader{
	// The C SDK offers "MQTT", the others "mqtt": echo the one offered.
	Subprotocols:    []string{"mqtt", "MQTT"},
	CheckOrigin:     func(*http.Request) bool { return true }, // devices, not browsers
	ReadBufferSize:  4 << 10,
	WriteBufferSize: 4 << 10,
}

// serveWebSocket answers GET /$iothub/websocket: it upgrades to a
// WebSocket with subprotocol mqtt (or MQTT) and serves MQTT on it as on
// the TLS listener.
func (s *Server) serveWebSocket(w http.ResponseWriter, r *http.Request, trackingID string) {
	s.mu.Lock()
	m := s.mqtt
	ok := m != nil && s.ctx.Err() == nil
	if ok {
		s.wg.Add(1)
	}
	s.mu.Unlock()
	if !ok {
		s.writeError(w, r, trackingID, station.Errorf("serve MQTT over WebSockets", station.KindNotFound,
			"MQTT over WebSockets needs the listener of Server.Start"))
		return
	}
	defer s.wg.Done()
	if !websocket.IsWebSocketUpgrade(r) || !containsFold(websocket.Subprotocols(r), "mqtt") {
		s.writeError(w, r, trackingID, station.Errorf("serve MQTT over WebSockets", station.KindInvalid,
			"%s is MQTT over WebSockets: upgrade with the subprotocol mqtt", dpsWebSocketPath))
		return
	}
	ws, err := dpsUpgrader.Upgrade(w, r, nil) // answers the client itself on failure
	if err != nil {
		m.log.Debug("WebSocket upgrade failed", "remote", r.RemoteAddr, "error", err)
		return
	}
	ws.SetReadLimit(int64(s.cfg.Quotas.messageBytes() + 16<<10))
	c := &wsConn{ws: ws}
	defer c.Close()
	if !m.ws.conns.track(c) {
		return // closing
	}
	defer m.ws.conns.untrack(c)
	_ = c.SetDeadline(time.Now().Add(hubConnectTimeout)) // mochi resets it after CONNECT
	if err := m.srv.EstablishConnection(dpsListenerWS, c); err != nil {
		m.log.Debug("connection ended", "remote", r.RemoteAddr, "error", err)
	}
}

func containsFold(list []string, s string) bool {
	for _, v := range list {
		if strings.EqualFold(v, s) {
			return true
		}
	}
	return false
}

// wsConn is a WebSocket seen as a byte stream for mochi: MQTT packets
// travel in binary messages, and a packet may span messages. NetConn
// exposes the TLS connection, for client certificates.
type wsConn struct {
	ws *websocket.Conn
	r  io.Reader
	wm sync.Mutex
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			_, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.wm.Lock()
	defer c.wm.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error                       { return c.ws.Close() }
func (c *wsConn) LocalAddr() net.Addr                { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr               { return c.ws.RemoteAddr() }
func (c *wsConn) SetDeadline(t time.Time) error      { return c.ws.NetConn().SetDeadline(t) }
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }
func (c *wsConn) NetConn() net.Conn                  { return c.ws.NetConn() }
