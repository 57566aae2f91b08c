package main

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnworks/kiln/devserver"
)

// dpsOptions configure the embedded DPS and its hub.
type dpsOptions struct {
	addr       string // DPS device and service API (HTTPS)
	hubAddr    string // the embedded IoT Hub (MQTT over TLS)
	mqttAddr   string // DPS device API over MQTT with TLS; empty: none
	idScope    string
	retryAfter time.Duration
	// tlsCert and tlsKey, when set, are the PEM files of the certificate
	// (with its chain) and key the DPS and hub serve, instead of a TLS
	// identity made at start.
	tlsCert, tlsKey string
	// issuer, when set, answers the CSRs devices send with their
	// registration with certificates from the station CA.
	issuer devserver.CertificateIssuer
	// quotas are the DPS's limits and throttles; the zero value (the
	// station's) throttles nothing.
	quotas devserver.Quotas
	// hubs are the linked hubs the embedded hub serves by host name, with
	// the geoLatency map naming them and the client of custom allocation
	// webhooks; none: one hub named by hubAddr.
	hubs      []devserver.LinkedHub
	latencies devserver.Latencies
	webhook   *http.Client
}

// embeddedDPS is the devserver and its embedded hub, running.
type embeddedDPS struct {
	*devserver.Embedded
	dps    *devserver.Server
	hub    *devserver.Hub
	caPath string // the TLS root devices must trust (PEM)
	caPEM  []byte
}

// startEmbeddedDPS starts the devserver with its data in dir and its linked
// hubs (one unless o.hubs lists several) served by the embedded hub. Unless a certificate is given, its TLS
// identity is made anew at each start, so no TLS private key is written to
// disk; the root devices must trust is written to dir/ca.pem.
func startEmbeddedDPS(ctx context.Context, dir string, o dpsOptions, log *slog.Logger) (*embeddedDPS, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cfg := devserver.EmbeddedConfig{DataDir: dir, Addr: o.addr, HubAddr: o.hubAddr, MQTTAddr: o.mqttAddr, IDScope: o.idScope, RetryAfter: o.retryAfter, Logger: log, Issuer: o.issuer, Quotas: o.quotas,
		Hubs: o.hubs, Latencies: o.latencies, WebhookClient: o.webhook}
	if o.tlsCert != "" || o.tlsKey != "" {
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			return nil, usagef("TLS certificate %s and key %s: %v: give a PEM certificate (with its chain) and its PEM key", o.tlsCert, o.tlsKey, err)
		}
		// Devices trust the last certificate of the chain given.
		chain := cert.Certificate
		cfg.Certificate = &cert
		cfg.TrustPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: chain[len(chain)-1]})
	}
	emb, err := devserver.StartEmbedded(ctx, cfg)
	if err != nil {
		return nil, err
	}
	caPath := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caPath, emb.TrustPEM, 0o644); err != nil {
		emb.Close()
		return nil, err
	}
	return &embeddedDPS{Embedded: emb, dps: emb.DPS, hub: emb.Hub, caPath: caPath, caPEM: emb.TrustPEM}, nil
}
