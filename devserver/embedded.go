package devserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// EmbeddedConfig configures a DPS together with the IoT hub it assigns
// devices to, both on this machine: the station's end-to-end check and
// `kiln serve`.
type EmbeddedConfig struct {
	DataDir string // the DPS's data (Config.DataDir); required
	Addr    string // DPS device and service API; empty: 127.0.0.1:0
	HubAddr string // the hub; empty: 127.0.0.1:0. The hub is named by this address.
	// MQTTAddr is the DPS device API over MQTT with TLS (Config.MQTTAddr);
	// empty: none.
	MQTTAddr string
	IDScope  string
	// RetryAfter is the poll interval asked of devices; zero means the
	// DPS default.
	RetryAfter time.Duration
	// Certificate is what both serve; nil: a TLS identity made now with
	// NewTLSIdentity, so that no TLS key needs to be stored.
	Certificate *tls.Certificate
	// TrustPEM is the root devices must trust for Certificate (PEM);
	// ignored when Certificate is nil.
	TrustPEM []byte
	Logger   *slog.Logger
	// Issuer, when set, issues certificates for the CSRs devices send with
	// their registration (Config.Issuer).
	Issuer CertificateIssuer
	// Quotas are the DPS's limits and throttles (Config.Quotas); the zero
	// value throttles nothing, as the station's line needs.
	Quotas Quotas
	// Hubs are the linked hubs the one embedded hub endpoint serves, by
	// host name: Name is a host name without a port (hub1.localhost), with
	// the hub's Weight and ApplyAllocationPolicy. Devices connect to the
	// hub they are assigned by its name, so each hub is named
	// Name:port after the hub's listening port, or Name alone when that
	// port is IoT Hub's 8883; the TLS identity made at start covers every
	// Name, and a Certificate given must. Empty: one hub named by the hub's
	// address (127.0.0.1:port).
	Hubs []LinkedHub
	// Latencies is the geoLatency allocation's map (Config.Latencies); its
	// entries name the Hubs as given, without the port.
	Latencies Latencies
	// WebhookClient calls custom allocation webhooks
	// (Config.WebhookClient); nil: the system's roots.
	WebhookClient *http.Client
}

// Embedded is a running DPS and its hub.
type Embedded struct {
	DPS      *Server
	Hub      *Hub
	TrustPEM []byte // the TLS root devices must trust (PEM)
	// HubNames are the linked hubs' names as devices are assigned them
	// (EmbeddedConfig.Hubs with the port), all served at Hub.Addr().
	HubNames []string
}

// StartEmbedded starts a DPS and the linked hubs it allocates devices to,
// all served by one embedded hub endpoint. Kinds: Invalid (configuration),
// Unavailable (cannot listen).
func StartEmbedded(ctx context.Context, cfg EmbeddedConfig) (*Embedded, error) {
	const op = "start embedded DPS"
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.HubAddr == "" {
		cfg.HubAddr = "127.0.0.1:0"
	}
	hubAddr, err := concreteAddr(cfg.HubAddr)
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	hubs, lat, err := embeddedHubs(cfg.Hubs, cfg.Latencies, hubAddr)
	if err != nil {
		return nil, err
	}
	var hosts []string // the hubs' host names, without the port
	for _, h := range cfg.Hubs {
		hosts = append(hosts, h.Name)
	}
	trust, cert := cfg.TrustPEM, cfg.Certificate
	if cert == nil {
		caPEM, c, err := NewTLSIdentityFor(hosts...)
		if err != nil {
			return nil, station.E(op, station.KindInternal, err)
		}
		trust, cert = caPEM, &c
	} else if err := covers(cert, hosts); err != nil {
		return nil, err
	}
	names := make([]string, len(hubs))
	for i, h := range hubs {
		names[i] = h.Name
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12}
	srv, err := New(Config{
		IDScope:       cfg.IDScope,
		Addr:          cfg.Addr,
		MQTTAddr:      cfg.MQTTAddr,
		TLS:           tlsConf,
		DataDir:       cfg.DataDir,
		Hubs:          hubs,
		Latencies:     lat,
		WebhookClient: cfg.WebhookClient,
		Logger:        cfg.Logger,
		RetryAfter:    cfg.RetryAfter,
		Issuer:        cfg.Issuer,
		Quotas:        cfg.Quotas,
	})
	if err != nil {
		return nil, err
	}
	hub, err := NewHub(HubConfig{Addr: hubAddr, TLS: tlsConf.Clone(), Hosts: names, Directory: srv, Logger: cfg.Logger})
	if err != nil {
		srv.Close()
		return nil, err
	}
	if err := srv.Start(ctx); err != nil {
		srv.Close()
		return nil, err
	}
	if err := hub.Start(ctx); err != nil {
		srv.Close()
		return nil, err
	}
	return &Embedded{DPS: srv, Hub: hub, TrustPEM: trust, HubNames: names}, nil
}

// embeddedHubs names the linked hubs of an Embedded after the hub's
// address hubAddr (host:port): each given host name gets the port unless
// it is 8883, and the latency map's entries follow. No hubs given: one hub
// named hubAddr. Kinds: Invalid.
func embeddedHubs(given []LinkedHub, lat Latencies, hubAddr string) ([]LinkedHub, Latencies, error) {
	const op = "link embedded hubs"
	if len(given) == 0 {
		return []LinkedHub{{Name: hubAddr, Weight: 1, ApplyAllocationPolicy: true}}, lat, nil
	}
	_, port, err := net.SplitHostPort(hubAddr)
	if err != nil {
		return nil, nil, station.E(op, station.KindInvalid, err)
	}
	full := map[string]string{} // lower-case host name → the hub's name
	hubs := make([]LinkedHub, len(given))
	for i, h := range given {
		if h.Name == "" || strings.ContainsAny(h.Name, ":/ ") {
			return nil, nil, station.Errorf(op, station.KindInvalid,
				"hub %q: give a host name without a port, like hub1.localhost: the hub's port is added", h.Name)
		}
		hubs[i] = h
		if port != "8883" {
			hubs[i].Name = net.JoinHostPort(h.Name, port)
		}
		full[strings.ToLower(h.Name)] = hubs[i].Name
	}
	out := make(Latencies, len(lat))
	for i, e := range lat {
		out[i] = e
		if n, ok := full[strings.ToLower(e.Hub)]; ok {
			out[i].Hub = n
		}
	}
	return hubs, out, nil
}

// covers checks that cert's leaf is valid for every host name. Kinds:
// Invalid.
func covers(cert *tls.Certificate, hosts []string) error {
	const op = "check TLS certificate"
	if len(hosts) == 0 {
		return nil
	}
	if len(cert.Certificate) == 0 {
		return station.Errorf(op, station.KindInvalid, "the TLS certificate is empty: give a PEM certificate with its chain")
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return station.Errorf(op, station.KindInvalid, "parse the TLS certificate: %w", err)
	}
	for _, h := range hosts {
		if err := leaf.VerifyHostname(h); err != nil {
			return station.Errorf(op, station.KindInvalid,
				"the TLS certificate does not cover hub %s (%v): devices check the hub's name, so add it to the certificate's subject alternative names", h, err)
		}
	}
	return nil
}

// Close stops the hub and the DPS; it is idempotent.
func (e *Embedded) Close() error {
	herr := e.Hub.Close()
	if err := e.DPS.Close(); err != nil {
		return err
	}
	return herr
}

// concreteAddr turns a :0 address into one with a free port, because a hub
// is named by its address before it listens. Another program could take
// the port in between; Start then fails and says so.
func concreteAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if port != "0" {
		return addr, nil
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// NewTLSIdentity makes a throwaway CA and a server certificate for the
// loopback names (localhost, 127.0.0.1, ::1), and returns the CA
// certificate (PEM) and the server's certificate chain with its key. The
// CA key is dropped: nothing else is ever signed with it.
func NewTLSIdentity() (caPEM []byte, cert tls.Certificate, err error) {
	return NewTLSIdentityFor()
}

// NewTLSIdentityFor is NewTLSIdentity with a server certificate that also
// covers names (host names or IP addresses), such as the host names of
// the hubs an Embedded serves.
func NewTLSIdentityFor(names ...string) (caPEM []byte, cert tls.Certificate, err error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: "Kiln embedded DPS TLS root " + now.UTC().Format(time.RFC3339), Organization: []string{"Kiln"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(1, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano() + 1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if !strings.EqualFold(n, "localhost") {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return caPEM, tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}, nil
}

// ServiceClient returns a client of this DPS's service API, with the owner
// policy's connection string, that trusts the DPS's TLS root.
func (e *Embedded) ServiceClient() (*dps.ServiceClient, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(e.TrustPEM) {
		return nil, station.Errorf("service client", station.KindInvalid, "the embedded DPS's trust bundle holds no certificate")
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	return dps.NewServiceClient(e.DPS.ServiceConnectionString(), dps.ServiceOptions{HTTP: hc, BaseURL: "https://" + e.DPS.Addr()})
}
