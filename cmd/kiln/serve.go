package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// runServe is `kiln serve`: the embedded DPS alone, headless, as a DPS
// emulator for developers.
func runServe(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	o := dpsOptions{}
	fs := newFlags(e, "serve")
	fs.StringVar(&o.addr, "addr", "127.0.0.1:0", "DPS device and service API address (HTTPS); the Node SDK's HTTP transport needs port 443")
	fs.StringVar(&o.mqttAddr, "mqtt-addr", "127.0.0.1:0", "DPS device API address over MQTT with TLS (DPS's 8883); empty: none. MQTT over WebSockets is on --addr at /$iothub/websocket")
	fs.StringVar(&o.hubAddr, "hub-addr", "127.0.0.1:0", "embedded IoT Hub address (MQTT over TLS)")
	fs.StringVar(&o.idScope, "id-scope", "", "ID scope (default: one generated on first start and kept)")
	fs.DurationVar(&o.retryAfter, "retry-after", time.Second, "poll interval the service asks devices for")
	dir := fs.String("data", "", "data directory of the DPS (default $KILN_HOME/devserver)")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "PEM certificate (with its chain) to serve instead of one made at start")
	fs.StringVar(&o.tlsKey, "tls-key", "", "PEM key of --tls-cert")
	asJSON := fs.Bool("json", false, "print the endpoints as one JSON object")
	issue := fs.Bool("issue-certs", false, "answer the CSRs devices send with their registration (clientCertificateCsr) with certificates from the station CA (kiln ca)")
	quotas := quotaFlags(fs)
	hubs := fs.String("hubs", "", "linked hubs served by the embedded hub, by host name: NAME[=WEIGHT],... (e.g. hub1.localhost=2,hub2.localhost); each is named NAME:PORT after --hub-addr's port (NAME alone on 8883) and devices must resolve NAME to the hub; empty: one hub named by --hub-addr")
	latencyMap := fs.String("latency-map", "", "geoLatency allocation map: a file of NETWORK HUB LATENCY lines (e.g. 10.0.0.0/8 hub1.localhost 20ms), HUB as in --hubs")
	webhookTrust := fs.String("webhook-trust", "", "PEM roots trusted for custom allocation webhooks (HTTPS), instead of the system's")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	if o.quotas, err = quotas(); err != nil {
		return err
	}
	if o.hubs, err = parseHubs(*hubs); err != nil {
		return err
	}
	if *latencyMap != "" {
		b, err := os.ReadFile(*latencyMap)
		if err != nil {
			return usagef("--latency-map: %v: give a file of NETWORK HUB LATENCY lines", err)
		}
		if o.latencies, err = devserver.ParseLatencies(b); err != nil {
			return usagef("--latency-map %s: %v", *latencyMap, err)
		}
	}
	if *webhookTrust != "" {
		b, err := os.ReadFile(*webhookTrust)
		if err != nil {
			return usagef("--webhook-trust: %v: give a PEM file of CA certificates", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return usagef("--webhook-trust %s holds no PEM certificate", *webhookTrust)
		}
		o.webhook = &http.Client{Timeout: devserver.DefaultWebhookTimeout,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	}
	if *issue {
		iss, closeCA, err := openIssuer(ctx, e, c)
		if err != nil {
			return err
		}
		defer closeCA()
		o.issuer = dpsIssuer{iss}
	}
	if *dir == "" {
		*dir = filepath.Join(c.Home, "devserver")
	}
	d, err := startEmbeddedDPS(ctx, *dir, o, e.logger())
	if err != nil {
		return err
	}
	defer d.Close()
	info := serveInfo{
		GlobalEndpoint:    d.dps.Endpoint(),
		IDScope:           d.dps.IDScope(),
		ServiceConnection: d.dps.ServiceConnectionString(),
		Hub:               d.hub.Addr(),
		Hubs:              d.HubNames,
		MQTT:              d.dps.MQTTAddr(),
		TrustBundle:       d.caPath,
	}
	if *asJSON {
		if err := writeJSON(e, info); err != nil {
			return err
		}
	} else {
		w := e.stdout
		fmt.Fprintln(w, "Kiln DPS emulator (Azure IoT Hub DPS wire protocol)")
		fmt.Fprintf(w, "  global endpoint    %s (HTTPS)\n", info.GlobalEndpoint)
		fmt.Fprintf(w, "  ID scope           %s\n", info.IDScope)
		fmt.Fprintf(w, "  service            %s\n", info.ServiceConnection)
		if info.MQTT != "" {
			fmt.Fprintf(w, "  DPS over MQTT      %s (MQTT over TLS; WebSockets: wss://%s/$iothub/websocket)\n", info.MQTT, d.dps.Addr())
		}
		if len(o.hubs) == 0 {
			fmt.Fprintf(w, "  IoT hub            %s (MQTT over TLS)\n", info.Hub)
		} else {
			fmt.Fprintf(w, "  IoT hubs           %s (MQTT over TLS, all at %s: devices must resolve the names to it)\n", strings.Join(info.Hubs, ", "), info.Hub)
		}
		fmt.Fprintf(w, "  trust bundle       %s (for Node: NODE_EXTRA_CA_CERTS=%s)\n", info.TrustBundle, info.TrustBundle)
		fmt.Fprintf(w, "  throttling         %s\n", throttleText(o.quotas))
		fmt.Fprintln(w, "Press Ctrl-C to stop.")
	}
	syncStdout(e)
	<-ctx.Done()
	return nil
}

// quotaFlags defines the flags of the DPS's limits and throttles, DPS's
// own by default (dps-protocol.md §10), and returns the function that
// reads them once parsed. --throttle=false turns every rate quota off, as
// the station's embedded DPS runs; a count limit of 0 is no limit.
func quotaFlags(fs *flag.FlagSet) func() (devserver.Quotas, error) {
	throttle := fs.Bool("throttle", true, "throttle as DPS does (429 with retry-after over a rate quota); false: serve at line speed")
	regs := fs.Int("registrations-per-minute", devserver.DPSRegistrationsPerMinute, "device register and lookup requests per minute, whole service; 0: no throttle")
	ops := fs.Int("operations-per-minute", devserver.DPSOperationsPerMinute, "service API requests per minute; 0: no throttle")
	polls := fs.Int("polls-per-device", devserver.DPSPollsPerDevice, "operation status polls per device per --poll-window; 0: no throttle")
	window := fs.Duration("poll-window", devserver.DPSPollWindow, "window of --polls-per-device")
	enrollments := fs.Int("max-enrollments", devserver.DPSMaxEnrollments, "most individual enrollments; 0: no limit")
	registrations := fs.Int("max-registrations", devserver.DPSMaxRegistrations, "most device registration states; 0: no limit")
	symGroups := fs.Int("max-symmetric-key-groups", devserver.MaxSymmetricKeyGroups, "most symmetric-key enrollment groups; 0: no limit")
	x509Groups := fs.Int("max-x509-groups", devserver.MaxX509Groups, "most X.509 enrollment groups; 0: no limit")
	message := fs.Int("max-message-bytes", devserver.DPSMaxMessageBytes, "largest request body or MQTT publish, in bytes")
	bulk := fs.Int("max-bulk-items", dps.MaxBulkItems, "most enrollments or groups in one bulk operation; 0: no limit")
	return func() (devserver.Quotas, error) {
		count := func(name string, v int) (int, error) {
			switch {
			case v < 0:
				return 0, usagef("--%s %d: give 0 (no limit) or more", name, v)
			case v == 0:
				return -1, nil
			}
			return v, nil
		}
		var q devserver.Quotas
		var err error
		for _, c := range []struct {
			name string
			v    int
			to   *int
		}{{"max-enrollments", *enrollments, &q.MaxEnrollments}, {"max-registrations", *registrations, &q.MaxRegistrations},
			{"max-symmetric-key-groups", *symGroups, &q.MaxSymmetricKeyGroups}, {"max-x509-groups", *x509Groups, &q.MaxX509Groups},
			{"max-bulk-items", *bulk, &q.MaxBulkItems}} {
			if *c.to, err = count(c.name, c.v); err != nil {
				return q, err
			}
		}
		if *message <= 0 {
			return q, usagef("--max-message-bytes %d: give a positive size (DPS's is %d)", *message, devserver.DPSMaxMessageBytes)
		}
		q.MaxMessageBytes = *message
		if *throttle {
			for _, r := range []struct {
				name string
				v    int
			}{{"registrations-per-minute", *regs}, {"operations-per-minute", *ops}, {"polls-per-device", *polls}} {
				if r.v < 0 {
					return q, usagef("--%s %d: give 0 (no throttle) or more", r.name, r.v)
				}
			}
			if *window <= 0 {
				return q, usagef("--poll-window %s: give a positive duration", *window)
			}
			q.RegistrationsPerMinute, q.OperationsPerMinute, q.PollsPerDevice, q.PollWindow = *regs, *ops, *polls, *window
		}
		return q, nil
	}
}

// throttleText describes the rate quotas for the operator.
func throttleText(q devserver.Quotas) string {
	if q.RegistrationsPerMinute == 0 && q.OperationsPerMinute == 0 && q.PollsPerDevice == 0 {
		return "off (line speed)"
	}
	per := func(n int, unit string) string {
		if n == 0 {
			return "unlimited " + unit
		}
		return fmt.Sprintf("%d %s", n, unit)
	}
	return per(q.RegistrationsPerMinute, "registrations/min") + ", " + per(q.OperationsPerMinute, "service operations/min") + ", " +
		per(q.PollsPerDevice, "polls per device") + " per " + q.PollWindow.String() + " (429 with retry-after beyond; --throttle=false for line speed)"
}

// parseHubs reads --hubs: NAME[=WEIGHT] separated by commas; every hub
// applies the allocation policy.
func parseHubs(v string) ([]devserver.LinkedHub, error) {
	var hubs []devserver.LinkedHub
	for _, f := range strings.Split(v, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		h := devserver.LinkedHub{Name: f, Weight: 1, ApplyAllocationPolicy: true}
		if name, w, ok := strings.Cut(f, "="); ok {
			n, err := strconv.Atoi(w)
			if err != nil || n < 1 || n > 1000 {
				return nil, usagef("--hubs %s: the weight %q is not 1 to 1000: write NAME=WEIGHT, like hub1.localhost=2", f, w)
			}
			h.Name, h.Weight = name, n
		}
		hubs = append(hubs, h)
	}
	return hubs, nil
}

type serveInfo struct {
	GlobalEndpoint    string   `json:"global_endpoint"`
	IDScope           string   `json:"id_scope"`
	ServiceConnection string   `json:"service_connection_string"`
	Hub               string   `json:"hub"`            // the embedded hub's address
	Hubs              []string `json:"hubs,omitempty"` // the linked hubs' names (--hubs), all served at Hub
	MQTT              string   `json:"mqtt,omitempty"` // the DPS device API over MQTT with TLS (host:port)
	TrustBundle       string   `json:"trust_bundle"`
}
