package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnworks/kiln/devserver"
)

// dpsOptions configure the embedded DPS and its hub.
type dpsOptions struct {
	addr       string // DPS device and service API (HTTPS)
	hubAddr    string // the embedded IoT Hub (MQTT over TLS)
	idScope    string
	retryAfter time.Duration
	// tlsCert and tlsKey, when set, are the PEM files of the certificate
	// (with its chain) and key the DPS and hub serve, instead of a TLS
	// identity made at start.
	tlsCert, tlsKey string
}

// embeddedDPS is the devserver and its embedded hub, running.
type embeddedDPS struct {
	dps    *devserver.Server
	hub    *devserver.Hub
	caPath string // the TLS root devices must trust (PEM)
	caPEM  []byte
}

func (e *embeddedDPS) Close() {
	e.hub.Close()
	e.dps.Close()
}

// startEmbeddedDPS starts the devserver with its data in dir and one linked
// hub served by the embedded hub. Its TLS identity is made anew at each
// start (a CA and a server certificate for loopback): no TLS private key is
// ever written to disk, and the CA certificate is written to dir/ca.pem for
// devices and SDK clients to trust.
func startEmbeddedDPS(ctx context.Context, dir string, o dpsOptions, log *slog.Logger) (*embeddedDPS, error) {
	var err error
	if err = os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var caPEM []byte
	var cert tls.Certificate
	caPath := filepath.Join(dir, "ca.pem")
	if o.tlsCert != "" || o.tlsKey != "" {
		if cert, err = tls.LoadX509KeyPair(o.tlsCert, o.tlsKey); err != nil {
			return nil, usagef("TLS certificate %s and key %s: %v: give a PEM certificate (with its chain) and its PEM key", o.tlsCert, o.tlsKey, err)
		}
		// Devices trust the last certificate of the chain given.
		chain := cert.Certificate
		caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: chain[len(chain)-1]})
	} else if caPEM, cert, err = newTLSIdentity(); err != nil {
		return nil, fmt.Errorf("make the embedded DPS's TLS certificate: %w", err)
	}
	if err := os.WriteFile(caPath, caPEM, 0o644); err != nil {
		return nil, err
	}
	hubAddr, err := concreteAddr(o.hubAddr)
	if err != nil {
		return nil, err
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	srv, err := devserver.New(devserver.Config{
		IDScope:    o.idScope,
		Addr:       o.addr,
		TLS:        tlsConf,
		DataDir:    dir,
		Hubs:       []devserver.LinkedHub{{Name: hubAddr, Weight: 1, ApplyAllocationPolicy: true}},
		Logger:     log,
		RetryAfter: o.retryAfter,
	})
	if err != nil {
		return nil, err
	}
	hub, err := devserver.NewHub(devserver.HubConfig{
		Addr:      hubAddr,
		TLS:       tlsConf.Clone(),
		Hosts:     []string{hubAddr},
		Directory: srv,
		Logger:    log,
	})
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
	return &embeddedDPS{dps: srv, hub: hub, caPath: caPath, caPEM: caPEM}, nil
}

// concreteAddr turns a :0 address into one with a free port, because a hub
// is named by its address before it listens.
func concreteAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", usagef("%q is not HOST:PORT", addr)
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

// newTLSIdentity makes a throwaway CA and a server certificate for the
// loopback names, and returns the CA certificate (PEM) and the server's
// certificate with its key.
func newTLSIdentity() ([]byte, tls.Certificate, error) {
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
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return caPEM, tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}, nil
}
