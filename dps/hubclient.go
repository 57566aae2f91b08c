package dps

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/kilnworks/kiln/station"
)

// DefaultHubAPIVersion is the api-version a HubClient sends in its MQTT
// user name (§9).
const DefaultHubAPIVersion = "2021-04-12"

// hubPort is IoT Hub's MQTT-over-TLS port.
const hubPort = "8883"

// HubConfig says where and as whom a device connects to its IoT Hub.
type HubConfig struct {
	// Addr is the hub to dial: the assignedHub of the registration, host or
	// host:port (8883 when it has no port).
	Addr string
	// Hub is the hub's name in the user name and the token's resource;
	// empty means Addr verbatim, as DPS assigned it.
	Hub      string
	DeviceID string
	// Signer signs the device's SAS token (a TPM's HMAC); when nil, Key is
	// the device key in memory.
	Signer Signer
	Key    []byte
	// Certificate, when set with no Signer and no Key, is the device's
	// X.509 certificate (leaf first, with its intermediates): it is
	// presented in the TLS handshake and no password is sent (§9).
	Certificate *tls.Certificate
	// TLS is the TLS client configuration (its roots decide which hubs are
	// trusted); nil means the system roots. ServerName defaults to Addr's
	// host.
	TLS *tls.Config
	// APIVersion is sent in the user name; empty means
	// DefaultHubAPIVersion.
	APIVersion string
	// TokenLife is how long the SAS password is valid; 0 means one hour.
	TokenLife time.Duration
	// Now is the clock of the token's expiry; nil means time.Now.
	Now func() time.Time
}

// HubClient is a device's MQTT 3.1.1 connection to its IoT Hub (§9): it
// sends telemetry. It is safe for concurrent use.
type HubClient struct {
	c        mqtt.Client
	deviceID string
	hub      string
}

// ConnectHub connects to the hub over MQTT 3.1.1 with TLS: client ID the
// device ID, user name {hub}/{deviceId}/?api-version=…, password a SAS
// token for {hub}/devices/{deviceId} signed by cfg.Signer (or cfg.Key). It
// returns once the hub has accepted the connection. Kinds: Invalid (bad
// config), Unauthorized (the hub refused the token, or its certificate did
// not check out), Unavailable (no answer), and those of the signer.
func ConnectHub(ctx context.Context, cfg HubConfig) (*HubClient, error) {
	const op = "connect to IoT Hub"
	if cfg.Addr == "" || cfg.DeviceID == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the hub address and device ID must be set: take them from the DPS registration")
	}
	sign := cfg.Signer
	if sign == nil && len(cfg.Key) > 0 {
		sign = KeySigner(cfg.Key)
	}
	if sign == nil && cfg.Certificate == nil {
		return nil, station.Errorf(op, station.KindInvalid, "no signer, no device key and no certificate to authenticate to the hub with")
	}
	hub := cfg.Hub
	if hub == "" {
		hub = cfg.Addr
	}
	addr := cfg.Addr
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, hubPort)
	}
	host, _, _ := net.SplitHostPort(addr)
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.TLS != nil {
		tc = cfg.TLS.Clone()
	}
	if tc.ServerName == "" {
		tc.ServerName = host
	}
	if sign == nil {
		cert := cfg.Certificate
		tc.Certificates = nil
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	v := cfg.APIVersion
	if v == "" {
		v = DefaultHubAPIVersion
	}
	life := cfg.TokenLife
	if life <= 0 {
		life = time.Hour
	}
	now := time.Now
	if cfg.Now != nil {
		now = cfg.Now
	}
	var token string
	if sign != nil {
		var err error
		if token, err = BuildSAS(ctx, HubDeviceResource(hub, cfg.DeviceID), now().Add(life), "", sign); err != nil {
			return nil, err
		}
	}

	opts := mqtt.NewClientOptions().
		AddBroker("tls://" + addr).
		SetClientID(cfg.DeviceID).
		SetUsername(hub + "/" + cfg.DeviceID + "/?api-version=" + url.QueryEscape(v)).
		SetPassword(token).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(60 * time.Second).
		SetConnectTimeout(30 * time.Second).
		SetOrderMatters(false).
		SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
			d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 30 * time.Second}, Config: tc}
			return d.DialContext(ctx, "tcp", u.Host)
		})
	c := mqtt.NewClient(opts)
	t := c.Connect()
	if err := wait(ctx, t); err != nil {
		c.Disconnect(0)
		return nil, connectError(op, addr, err)
	}
	return &HubClient{c: c, deviceID: cfg.DeviceID, hub: hub}, nil
}

// connectError classifies a failed MQTT connection.
func connectError(op, addr string, err error) error {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var tv *tls.CertificateVerificationError
	switch {
	case errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword), errors.Is(err, packets.ErrorRefusedNotAuthorised),
		errors.Is(err, packets.ErrorRefusedIDRejected):
		return station.Errorf(op, station.KindUnauthorized,
			"the hub at %s refused the device (%v): check that DPS assigned this device to this hub and the device key", addr, err)
	case errors.As(err, &ua), errors.As(err, &hn), errors.As(err, &tv):
		return station.Errorf(op, station.KindUnauthorized,
			"the certificate of the hub at %s did not check out (%v): put the hub's CA in the device's trust bundle", addr, err)
	}
	return station.Errorf(op, station.KindUnavailable, "no MQTT connection to the hub at %s (%v): check the network and that the hub runs", addr, err)
}

// wait waits for t or ctx.
func wait(ctx context.Context, t mqtt.Token) error {
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// SendTelemetry publishes body as a device-to-cloud message with QoS 1 to
// devices/{deviceId}/messages/events/{properties} and waits for the hub's
// PUBACK. props become the URL-encoded property bag; its $.mid (message ID)
// is set to a fresh UUID unless props has one, and returned.
// Kinds: Unavailable (no acknowledgement), Invalid.
func (h *HubClient) SendTelemetry(ctx context.Context, body []byte, props map[string]string) (string, error) {
	const op = "send telemetry"
	mid := props["$.mid"]
	if mid == "" {
		var err error
		if mid, err = newUUID(); err != nil {
			return "", station.E(op, station.KindInternal, err)
		}
	}
	t := h.c.Publish(TelemetryTopic(h.deviceID, mid, props), 1, false, body)
	if err := wait(ctx, t); err != nil {
		return "", station.Errorf(op, station.KindUnavailable,
			"the hub %s did not acknowledge the message (%v): check the connection and try again", h.hub, err)
	}
	return mid, nil
}

// TelemetryTopic returns the topic of a device-to-cloud message:
// devices/{deviceId}/messages/events/ followed by the URL-encoded property
// bag, $.mid=messageID first and the other properties sorted by name.
// Names and values are percent-encoded like encodeURIComponent (a space is
// %20): a '+' would be an MQTT wildcard, which brokers refuse in a
// published topic.
func TelemetryTopic(deviceID, messageID string, props map[string]string) string {
	var b strings.Builder
	b.WriteString("devices/" + deviceID + "/messages/events/")
	b.WriteString(escape("$.mid") + "=" + escape(messageID))
	keys := make([]string, 0, len(props))
	for k := range props {
		if k != "$.mid" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		b.WriteString("&" + escape(k) + "=" + escape(props[k]))
	}
	return b.String()
}

// Close disconnects from the hub, waiting up to 250 ms for work in flight.
// It is idempotent.
func (h *HubClient) Close() error {
	if h.c.IsConnectionOpen() {
		h.c.Disconnect(250)
	}
	return nil
}

// newUUID returns a random UUID v4.
func newUUID() (string, error) {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		return "", err
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}
