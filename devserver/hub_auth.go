package devserver

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net"
	"net/url"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// hubSession is an authenticated device connection.
type hubSession struct {
	hub      string // the hub host as configured
	deviceID string
	device   *HubDevice
	auth     string // "sas" or "x509"
}

// hubUsername is a parsed IoT Hub MQTT user name:
// {hubHost}/{deviceId}/?api-version=…[&DeviceClientType=…][&model-id=…].
type hubUsername struct {
	host, deviceID string
	params         map[string]string
}

// parseHubUsername parses the user name a device sends IoT Hub. Accepted:
// the '?' before the parameters may be missing (older C SDKs), parameters
// are optional and unknown ones ignored, values are percent-decoded when
// they can be (C SDK product strings may hold a raw ';'). A module identity
// ({host}/{device}/{module}/…) is refused. Kinds: Invalid.
func parseHubUsername(u string) (*hubUsername, error) {
	const op = "parse MQTT user name"
	host, rest, ok := strings.Cut(u, "/")
	if !ok || host == "" {
		return nil, station.Errorf(op, station.KindInvalid,
			"the user name %.200q is not {hubHostName}/{deviceId}/?api-version=…: use the assigned hub's host name and the device ID", u)
	}
	id, rest, _ := strings.Cut(rest, "/")
	if id == "" {
		return nil, station.Errorf(op, station.KindInvalid,
			"the user name %.200q has no device ID: write {hubHostName}/{deviceId}/?api-version=…", u)
	}
	rest = strings.TrimPrefix(rest, "?")
	first := rest
	if i := strings.IndexAny(rest, "=&"); i >= 0 {
		first = rest[:i]
	}
	if strings.Contains(first, "/") {
		return nil, station.Errorf(op, station.KindInvalid,
			"the user name %.200q names a module or has extra path segments: only device identities can connect", u)
	}
	return &hubUsername{host: host, deviceID: id, params: parseBag(rest)}, nil
}

// parseBag parses key=value pairs separated by '&' (a topic's property
// bag, a user name's parameters). Keys and values are percent-decoded ('+'
// stays '+'); a pair that does not decode is kept as sent; a key without
// '=' has an empty value; empty pairs are skipped; a repeated key keeps its
// last value.
func parseBag(s string) map[string]string {
	m := map[string]string{}
	for pair := range strings.SplitSeq(s, "&") {
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		m[hubUnescape(k)] = hubUnescape(v)
	}
	return m
}

func hubUnescape(s string) string {
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}

// connackCode is a CONNACK return code of MQTT 3.1.1, as IoT Hub uses them.
type connackCode = packets.Code

var (
	connackBadProtocol    = packets.Err3UnsupportedProtocolVersion // 1
	connackBadClientID    = packets.Err3ClientIdentifierNotValid   // 2
	connackUnavailable    = packets.Err3ServerUnavailable          // 3
	connackBadCredentials = packets.ErrMalformedUsernameOrPassword // 4
	connackNotAuthorized  = packets.Err3NotAuthorized              // 5
)

// authenticate checks a CONNECT as IoT Hub does and returns the device's
// session, or the CONNACK code to refuse it with and why. Codes: 1 for a
// protocol other than MQTT 3.1.1; 2 for a client ID that cannot be a device
// ID; 4 for a malformed user name or password, or a hub not served; 5 when
// the credentials are well formed but do not admit the device (unknown,
// disabled, bad or expired signature, wrong resource, no credentials,
// unknown certificate); 3 when the directory cannot answer.
func (h *Hub) authenticate(cl *mqtt.Client, pk packets.Packet) (*hubSession, connackCode, error) {
	const op = "authenticate device"
	if pk.ProtocolVersion != 4 {
		return nil, connackBadProtocol, station.Errorf(op, station.KindInvalid,
			"MQTT protocol level %d: IoT Hub speaks MQTT 3.1.1 (level 4) only", pk.ProtocolVersion)
	}
	id := pk.Connect.ClientIdentifier
	if id == "" || strings.ContainsAny(id, "/+#\x00") {
		return nil, connackBadClientID, station.Errorf(op, station.KindInvalid,
			"client ID %.130q is not a device ID: set the MQTT client ID to the device ID", id)
	}
	if !pk.Connect.UsernameFlag {
		return nil, connackBadCredentials, station.Errorf(op, station.KindInvalid,
			"device %q sent no user name: send {hubHostName}/{deviceId}/?api-version=…", id)
	}
	u, err := parseHubUsername(string(pk.Connect.Username))
	if err != nil {
		return nil, connackBadCredentials, err
	}
	if u.deviceID != id {
		return nil, connackBadCredentials, station.Errorf(op, station.KindInvalid,
			"the user name names device %q but the client ID is %q: use the device ID for both", u.deviceID, id)
	}
	hub, ok := h.hosts[strings.ToLower(u.host)]
	if !ok {
		return nil, connackBadCredentials, station.Errorf(op, station.KindInvalid,
			"hub %q is not served here (serving %s): connect with the hub host name DPS assigned", u.host, strings.Join(h.cfg.Hosts, ", "))
	}

	ctx, cancel := context.WithTimeout(h.ctx, hubLookupTimeout)
	defer cancel()
	dev, err := h.cfg.Directory.HubDevice(ctx, hub, id)
	switch {
	case station.KindOf(err) == station.KindNotFound:
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"device %q is not registered on hub %s: provision it through DPS first", id, hub)
	case err != nil:
		return nil, connackUnavailable, station.E(op, station.KindUnavailable, err)
	case dev == nil || dev.Hub != "" && !strings.EqualFold(dev.Hub, hub):
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"device %q is not assigned to hub %s: connect to the hub DPS assigned", id, hub)
	case !dev.Enabled:
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"device %q is disabled on hub %s: enable its registration to let it connect", id, hub)
	}
	s := &hubSession{hub: hub, deviceID: id, device: dev}

	if pk.Connect.PasswordFlag && len(pk.Connect.Password) > 0 {
		s.auth = "sas"
		tok, err := dps.ParseSAS(string(pk.Connect.Password))
		if err != nil {
			return nil, connackBadCredentials, station.E(op, station.KindInvalid, err)
		}
		if err := tok.MatchResource(dps.HubDeviceResource(hub, id)); err != nil {
			return nil, connackNotAuthorized, station.E(op, station.KindUnauthorized, err)
		}
		if len(dev.PrimaryKey) == 0 && len(dev.SecondaryKey) == 0 {
			return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
				"device %q authenticates with an X.509 certificate, not a SAS token: connect with its certificate and no password", id)
		}
		now := h.cfg.Now()
		var verr error
		for _, key := range [][]byte{dev.PrimaryKey, dev.SecondaryKey} {
			if len(key) == 0 {
				continue
			}
			if verr = tok.Verify(key, now); verr == nil {
				return s, packets.CodeSuccess, nil
			}
		}
		return nil, connackNotAuthorized, station.E(op, station.KindUnauthorized, verr)
	}

	s.auth = "x509"
	cert := peerCertificate(cl.Net.Conn)
	if cert == nil {
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"device %q sent neither a SAS token nor a client certificate (a TLS client may drop a certificate whose issuer the server does not list): send a SAS token as the password, or a certificate", id)
	}
	if len(dev.Thumbprints) == 0 {
		return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
			"device %q authenticates with a SAS token, not a certificate: send a SAS token as the password", id)
	}
	sha1Hex, sha256Hex := thumbprints(cert)
	for _, t := range dev.Thumbprints {
		if strings.EqualFold(t, sha1Hex) || strings.EqualFold(t, sha256Hex) {
			return s, packets.CodeSuccess, nil
		}
	}
	return nil, connackNotAuthorized, station.Errorf(op, station.KindUnauthorized,
		"device %q presented a certificate (SHA-256 %s) that is not the one it registered with: use the registered certificate or provision again", id, sha256Hex)
}

// thumbprints returns the upper-case hex SHA-1 and SHA-256 of a certificate.
func thumbprints(c *x509.Certificate) (sha1Hex, sha256Hex string) {
	s1 := sha1.Sum(c.Raw)
	s256 := sha256.Sum256(c.Raw)
	return strings.ToUpper(hex.EncodeToString(s1[:])), strings.ToUpper(hex.EncodeToString(s256[:]))
}

// peerCertificate returns the leaf client certificate of a TLS connection,
// or nil. It looks through wrappers: a connection that has a
// ConnectionState method (*tls.Conn) is asked directly; one with NetConn
// (wrappers, such as a WebSocket connection adapter) is unwrapped.
func peerCertificate(c net.Conn) *x509.Certificate {
	for range 8 {
		switch v := c.(type) {
		case interface{ ConnectionState() tls.ConnectionState }:
			if cs := v.ConnectionState(); len(cs.PeerCertificates) > 0 {
				return cs.PeerCertificates[0]
			}
			return nil
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}
