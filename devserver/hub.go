package devserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"maps"
	"math"
	"net"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/kilnworks/kiln/station"
)

// Defaults of HubConfig.
const (
	// DefaultHubMaxMessage is IoT Hub's limit on a device-to-cloud message:
	// 256 KiB of body and properties.
	DefaultHubMaxMessage = 256 << 10
	// hubTelemetryKept is how many messages the hub keeps per device.
	hubTelemetryKept = 100
	// hubConnectTimeout bounds the TLS handshake and the wait for CONNECT.
	hubConnectTimeout = 30 * time.Second
	// hubLookupTimeout bounds one question to the DeviceDirectory.
	hubLookupTimeout = 10 * time.Second
)

// HubConfig configures the embedded IoT Hub endpoint. The zero value of
// every field but TLS, Hosts and Directory is a usable default.
type HubConfig struct {
	// Addr is the TCP address to listen on; "127.0.0.1:0" when empty.
	Addr string
	// TLS holds the server certificate. Client certificates are requested
	// so that X.509 devices can present theirs: when ClientAuth is left at
	// NoClientCert the hub uses VerifyClientCertIfGiven if ClientCAs is set
	// and RequestClientCert (thumbprint-only devices, as IoT Hub allows)
	// otherwise. Either way a device is accepted only if its certificate's
	// thumbprint is one of HubDevice.Thumbprints.
	TLS *tls.Config
	// Hosts are the hub host names served (e.g. kiln-1.azure-devices.net).
	// The host in a device's MQTT user name selects the hub; a device must
	// be assigned to that hub in the Directory.
	Hosts []string
	// Directory answers who a device is and how it authenticates.
	Directory DeviceDirectory
	// Now is the clock used to check SAS token expiry; time.Now when nil.
	Now func() time.Time
	// Logger receives the hub's logs, with component=hub; discarded when nil.
	Logger *slog.Logger
	// MaxMessage is the largest device message accepted, body plus property
	// bag, in bytes; DefaultHubMaxMessage when 0. A device that sends more is
	// disconnected, as IoT Hub does.
	MaxMessage int
	// OnTelemetry, when set, is called for every telemetry message accepted,
	// on the sending device's connection goroutine: keep it short.
	OnTelemetry func(Telemetry)
}

// Hub is an embedded, wire-compatible Azure IoT Hub device endpoint: MQTT
// 3.1.1 over TLS, as the official device SDKs speak it. Devices authenticate
// with SAS tokens or X.509 client certificates against the DeviceDirectory,
// send telemetry (kept in memory, the last 100 messages per device), read
// their twin and report properties. Cloud-to-device messages and direct
// methods are not offered. Its methods are safe for concurrent use.
type Hub struct {
	cfg   HubConfig
	hosts map[string]string // lower-case host → host as configured
	tls   *tls.Config
	log   *slog.Logger
	srv   *mqtt.Server
	hook  *hubHook

	ctx    context.Context // cancelled by Close; bounds directory lookups
	cancel context.CancelFunc
	closed chan struct{}
	once   sync.Once

	mu        sync.Mutex
	started   bool
	addr      string
	sessions  map[*mqtt.Client]*hubSession
	telemetry map[string][]Telemetry // by device ID, oldest first
	arrived   chan struct{}          // closed and replaced on every message
	twins     map[twinKey]*twinState
}

// NewHub checks cfg and returns a Hub that is not yet listening: call Start.
// Kinds: Invalid.
func NewHub(cfg HubConfig) (*Hub, error) {
	const op = "new hub"
	if cfg.TLS == nil || len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetCertificate == nil && cfg.TLS.GetConfigForClient == nil {
		return nil, station.Errorf(op, station.KindInvalid, "no server certificate: set HubConfig.TLS with the hub's certificate and key")
	}
	if cfg.Directory == nil {
		return nil, station.Errorf(op, station.KindInvalid, "no device directory: set HubConfig.Directory")
	}
	if len(cfg.Hosts) == 0 {
		return nil, station.Errorf(op, station.KindInvalid, "no hub host names: set HubConfig.Hosts to the hubs devices are assigned to")
	}
	hosts := make(map[string]string, len(cfg.Hosts))
	for _, h := range cfg.Hosts {
		if h == "" || strings.ContainsAny(h, "/ ?") {
			return nil, station.Errorf(op, station.KindInvalid, "hub host name %q is not a host name: write it like kiln-1.azure-devices.net", h)
		}
		hosts[strings.ToLower(h)] = h
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxMessage <= 0 {
		cfg.MaxMessage = DefaultHubMaxMessage
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "hub")

	tc := cfg.TLS.Clone()
	if tc.MinVersion < tls.VersionTLS12 {
		tc.MinVersion = tls.VersionTLS12
	}
	if tc.ClientAuth == tls.NoClientCert {
		tc.ClientAuth = tls.RequestClientCert
		if tc.ClientCAs != nil {
			tc.ClientAuth = tls.VerifyClientCertIfGiven
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	h := &Hub{
		cfg:       cfg,
		hosts:     hosts,
		tls:       tc,
		log:       log,
		ctx:       ctx,
		cancel:    cancel,
		closed:    make(chan struct{}),
		sessions:  map[*mqtt.Client]*hubSession{},
		telemetry: map[string][]Telemetry{},
		arrived:   make(chan struct{}),
		twins:     map[twinKey]*twinState{},
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MinimumProtocolVersion = 4 // IoT Hub speaks MQTT 3.1.1 only
	caps.MaximumQos = 1             // IoT Hub has no QoS 2
	caps.SharedSubAvailable = 0
	caps.SubIDAvailable = 0
	caps.TopicAliasMaximum = 0
	caps.MaximumClientWritesPending = 256
	caps.MaximumSessionExpiryInterval = 3600
	// Refuse absurd packets before reading them; the exact limit on
	// messages is checked in the hook.
	caps.MaximumPacketSize = uint32(min(cfg.MaxMessage+(64<<10)+16, math.MaxUint32))
	h.srv = mqtt.New(&mqtt.Options{
		Capabilities: caps,
		// mochi's own logs at Warn and above only; no packet contents below.
		Logger: slog.New(minLevel{log.With("mqtt", "mochi").Handler(), slog.LevelWarn}),
		// $SYS topics: mochi publishes them once at start; never again (and
		// no device may subscribe to them).
		SysTopicResendInterval: math.MaxInt32,
		InlineClient:           false,
	})
	h.hook = &hubHook{hub: h}
	if err := h.srv.AddHook(h.hook, nil); err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	return h, nil
}

// Start listens on cfg.Addr with TLS and serves devices until Close. ctx
// bounds the start-up only. Kinds: Unavailable (the address cannot be
// listened on), Conflict (started or closed already).
func (h *Hub) Start(ctx context.Context) error {
	const op = "start hub"
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.closed:
		return station.Errorf(op, station.KindConflict, "the hub is closed: make a new one with NewHub")
	default:
	}
	if h.started {
		return station.Errorf(op, station.KindConflict, "the hub is started already")
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", h.cfg.Addr)
	if err != nil {
		return station.Errorf(op, station.KindUnavailable, "listen on %s: %w: choose a free address or stop what uses it", h.cfg.Addr, err)
	}
	l := &hubListener{id: "hub-mqtts", ln: ln, tls: h.tls, log: h.log}
	if err := h.srv.AddListener(l); err != nil {
		_ = ln.Close()
		return station.E(op, station.KindInternal, err)
	}
	if err := h.srv.Serve(); err != nil {
		_ = ln.Close()
		return station.E(op, station.KindInternal, err)
	}
	h.started = true
	h.addr = ln.Addr().String()
	h.log.Info("hub listening", "addr", h.addr, "hosts", h.cfg.Hosts)
	return nil
}

// Addr returns the address the hub listens on (host:port), or "" before
// Start.
func (h *Hub) Addr() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.addr
}

// Close disconnects every device, stops listening and waits for the hub's
// goroutines to end. It is idempotent.
func (h *Hub) Close() error {
	h.once.Do(func() {
		h.cancel()
		close(h.closed)
		_ = h.srv.Close() // never fails
		h.mu.Lock()
		clear(h.sessions)
		h.mu.Unlock()
	})
	return nil
}

// Telemetry returns the messages recorded from deviceID, on any hub served,
// oldest first (at most the last 100).
func (h *Hub) Telemetry(deviceID string) []Telemetry {
	h.mu.Lock()
	defer h.mu.Unlock()
	kept := h.telemetry[deviceID]
	out := make([]Telemetry, len(kept))
	for i, t := range kept {
		out[i] = t.clone()
	}
	return out
}

// WaitTelemetry returns the first message recorded from deviceID on hub
// (any hub served when hub is ""), waiting for one to arrive if there is
// none yet. Kinds: Unavailable (ctx ended first, or the hub was closed).
func (h *Hub) WaitTelemetry(ctx context.Context, hub, deviceID string) (Telemetry, error) {
	const op = "wait for telemetry"
	for {
		h.mu.Lock()
		for _, t := range h.telemetry[deviceID] {
			if hub == "" || strings.EqualFold(t.Hub, hub) {
				h.mu.Unlock()
				return t.clone(), nil
			}
		}
		arrived := h.arrived
		h.mu.Unlock()
		select {
		case <-arrived:
		case <-ctx.Done():
			return Telemetry{}, station.Errorf(op, station.KindUnavailable,
				"no telemetry from device %q on hub %q (%w): check that the device connected to the hub it was assigned and sent a message",
				deviceID, hub, ctx.Err())
		case <-h.closed:
			return Telemetry{}, station.Errorf(op, station.KindUnavailable,
				"the hub closed before device %q sent telemetry", deviceID)
		}
	}
}

// record keeps a telemetry message, wakes WaitTelemetry and calls
// OnTelemetry.
func (h *Hub) record(t Telemetry) {
	h.mu.Lock()
	kept := append(h.telemetry[t.DeviceID], t)
	if len(kept) > hubTelemetryKept {
		kept = append(kept[:0:0], kept[len(kept)-hubTelemetryKept:]...)
	}
	h.telemetry[t.DeviceID] = kept
	close(h.arrived)
	h.arrived = make(chan struct{})
	h.mu.Unlock()
	if h.cfg.OnTelemetry != nil {
		h.cfg.OnTelemetry(t.clone())
	}
}

func (t Telemetry) clone() Telemetry {
	t.Properties = maps.Clone(t.Properties)
	t.Body = bytes.Clone(t.Body)
	return t
}

// minLevel is a slog.Handler that drops records below min.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (m minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= m.min && m.Handler.Enabled(ctx, l)
}

func (m minLevel) WithAttrs(as []slog.Attr) slog.Handler {
	return minLevel{m.Handler.WithAttrs(as), m.min}
}

func (m minLevel) WithGroup(name string) slog.Handler {
	return minLevel{m.Handler.WithGroup(name), m.min}
}
