package main

import (
	"context"
	"fmt"
	"path/filepath"
	"time"
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
	if err := parse(fs, args, false); err != nil {
		return err
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
		fmt.Fprintf(w, "  IoT hub            %s (MQTT over TLS)\n", info.Hub)
		fmt.Fprintf(w, "  trust bundle       %s (for Node: NODE_EXTRA_CA_CERTS=%s)\n", info.TrustBundle, info.TrustBundle)
		fmt.Fprintln(w, "Press Ctrl-C to stop.")
	}
	syncStdout(e)
	<-ctx.Done()
	return nil
}

type serveInfo struct {
	GlobalEndpoint    string `json:"global_endpoint"`
	IDScope           string `json:"id_scope"`
	ServiceConnection string `json:"service_connection_string"`
	Hub               string `json:"hub"`
	MQTT              string `json:"mqtt,omitempty"` // the DPS device API over MQTT with TLS (host:port)
	TrustBundle       string `json:"trust_bundle"`
}
