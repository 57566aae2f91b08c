package link

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"
	"unicode/utf8"

	"github.com/kilnworks/kiln/station"
)

// The payloads of WRITE CONFIG, READ CONFIG and PROVISION are compact JSON
// (encoding/json) objects of station.DeviceConfig, station.ProvisionProgress
// and station.ProvisionReport, with the JSON names of those types; readers
// ignore unknown names, so later versions can add fields. See
// docs/dut-link.md §7.

var _ station.ProvisioningLink = (*Client)(nil)

// StageStart is the stage of the event an agent sends as soon as it starts
// PROVISION, before any work: the station's sign that the request arrived.
const StageStart = "start"

// maxDetail is the longest progress detail an agent sends, in bytes.
const maxDetail = 512

// WriteConfig stores cfg on the DUT (WRITE CONFIG, 0x20). It runs HELLO
// first if none has succeeded on this Client. Kinds: Unavailable, Invalid
// (the agent refused the config, or it does not fit the DUT's frame limit).
func (c *Client) WriteConfig(ctx context.Context, cfg station.DeviceConfig) error {
	p, err := json.Marshal(cfg)
	if err != nil {
		return station.E("write DUT config", station.KindInternal, err)
	}
	_, err = c.request(ctx, "write DUT config", CmdWriteConfig, p, c.cfg.ConfigTimeout, c.cfg.ConfigTimeout, nil)
	return err
}

// ReadConfig returns the configuration stored on the DUT (READ CONFIG,
// 0x21). Kinds: Unavailable, NotFound (none written yet), Invalid (a
// malformed answer).
func (c *Client) ReadConfig(ctx context.Context) (station.DeviceConfig, error) {
	const op = "read DUT config"
	f, err := c.request(ctx, op, CmdReadConfig, nil, c.cfg.ConfigTimeout, c.cfg.ConfigTimeout, nil)
	if err != nil {
		return station.DeviceConfig{}, err
	}
	cfg, err := DecodeConfig(f.Payload)
	if err != nil {
		return station.DeviceConfig{}, station.Errorf(op, station.KindInvalid, "%s: %v: the agent is faulty", c.dut, err)
	}
	return cfg, nil
}

// ProvisionNow makes the DUT register with DPS, connect to its hub and send
// telemetry (PROVISION, 0x30), calling progress (when not nil) on the
// caller's goroutine for each event the agent streams, in order, the
// agent's "start" event included. The request is sent again only when
// ProvisionStartTimeout passes without any event, or ProvisionTimeout
// passes without a new one; the agent never runs a repeated request twice.
// Malformed events are logged and skipped. A DPS status other than
// assigned comes back in the report with a nil error. Kinds: Unavailable,
// Unauthorized, NotFound (no TPM or no config on the DUT), Invalid.
func (c *Client) ProvisionNow(ctx context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
	const op = "provision DUT"
	onEvent := func(f Frame) {
		ev, err := DecodeProgress(f.Payload)
		if err != nil {
			c.log.Warn("skipped a malformed progress event", "seq", f.Seq, "err", err)
			return
		}
		if progress != nil {
			progress(ev)
		}
	}
	f, err := c.request(ctx, op, CmdProvision, nil, c.cfg.ProvisionStartTimeout, c.cfg.ProvisionTimeout, onEvent)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	rep, err := DecodeReport(f.Payload)
	if err != nil {
		return station.ProvisionReport{}, station.Errorf(op, station.KindInvalid, "%s: %v: the agent is faulty", c.dut, err)
	}
	return rep, nil
}

// request runs one command under c.mu, after HELLO when the session needs
// one; a request that fails as Unavailable makes the next one start with
// HELLO.
func (c *Client) request(ctx context.Context, op string, cmd Command, payload []byte, first, idle time.Duration, onEvent func(Frame)) (Frame, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.hello {
		if _, err := c.helloLocked(ctx); err != nil {
			return Frame{}, err
		}
	}
	f, err := c.roundTripEvents(ctx, op, cmd, payload, first, idle, onEvent)
	if err != nil && station.KindOf(err) == station.KindUnavailable {
		c.hello = false
	}
	return f, err
}

// DecodeConfig reads a WRITE CONFIG request or READ CONFIG response
// payload. It does not validate the values. Errors hold no payload bytes.
func DecodeConfig(p []byte) (station.DeviceConfig, error) {
	var cfg station.DeviceConfig
	err := decodeJSON(p, &cfg, "config")
	return cfg, err
}

// DecodeProgress reads a PROVISION event payload: the stage is required
// and the time since the start must not be negative.
func DecodeProgress(p []byte) (station.ProvisionProgress, error) {
	var ev station.ProvisionProgress
	if err := decodeJSON(p, &ev, "progress event"); err != nil {
		return station.ProvisionProgress{}, err
	}
	if ev.Stage == "" {
		return station.ProvisionProgress{}, fmt.Errorf("the progress event names no stage")
	}
	if ev.After < 0 {
		return station.ProvisionProgress{}, fmt.Errorf("the progress event is %v before the start", -ev.After)
	}
	return ev, nil
}

// DecodeReport reads a PROVISION response payload: the DPS status is
// required.
func DecodeReport(p []byte) (station.ProvisionReport, error) {
	var r station.ProvisionReport
	if err := decodeJSON(p, &r, "provisioning report"); err != nil {
		return station.ProvisionReport{}, err
	}
	if r.Status == "" {
		return station.ProvisionReport{}, fmt.Errorf("the provisioning report has no status")
	}
	return r, nil
}

// decodeJSON reads exactly one JSON object of UTF-8 text into v.
func decodeJSON(p []byte, v any, what string) error {
	if !utf8.Valid(p) {
		return fmt.Errorf("the %s is not UTF-8", what)
	}
	if t := bytes.TrimSpace(p); len(t) == 0 || t[0] != '{' {
		return fmt.Errorf("the %s is not a JSON object", what)
	}
	dec := json.NewDecoder(bytes.NewReader(p))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("the %s is not the expected JSON: %v", what, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("the %s has data after its JSON object", what)
	}
	return nil
}

// Provisioner is the device side of the provisioning commands: what an
// agent does when the station writes or reads its config or tells it to
// provision. Errors travel to the station as error frames (kind and
// message).
type Provisioner interface {
	// WriteConfig validates and stores cfg. Kinds: Invalid, Unavailable.
	WriteConfig(ctx context.Context, cfg station.DeviceConfig) error
	// ReadConfig returns the stored config. Kinds: NotFound (none).
	ReadConfig(ctx context.Context) (station.DeviceConfig, error)
	// Provision registers with DPS, connects to the hub and sends telemetry,
	// calling progress for each stage (from the calling goroutine only).
	// Kinds: see station.ProvisioningLink.ProvisionNow.
	Provision(ctx context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error)
}

// AddProvisioning makes Serve answer WRITE CONFIG, READ CONFIG and
// PROVISION with p, adding them to cfg.Commands and cfg.Streams. PROVISION
// sends a "start" event at once, then one event per progress call, then
// the report. Like every command, a repeated PROVISION request (same seq
// and payload) is answered from the cache and does not run again; one that
// arrives while the first still runs waits in the line buffer and gets the
// cached answer once the first has finished.
func AddProvisioning(cfg *ServeConfig, p Provisioner) {
	if cfg.Commands == nil {
		cfg.Commands = map[Command]HandlerFunc{}
	}
	if cfg.Streams == nil {
		cfg.Streams = map[Command]StreamFunc{}
	}
	cfg.Commands[CmdWriteConfig] = func(ctx context.Context, payload []byte) ([]byte, error) {
		dc, err := DecodeConfig(payload)
		if err != nil {
			return nil, station.Errorf("write config", station.KindInvalid, "%v: the station and agent disagree on WRITE CONFIG; update both", err)
		}
		return nil, p.WriteConfig(ctx, dc)
	}
	cfg.Commands[CmdReadConfig] = func(ctx context.Context, _ []byte) ([]byte, error) {
		dc, err := p.ReadConfig(ctx)
		if err != nil {
			return nil, err
		}
		return json.Marshal(dc)
	}
	cfg.Streams[CmdProvision] = func(ctx context.Context, _ []byte, emit func([]byte) error) ([]byte, error) {
		start := time.Now()
		send := func(ev station.ProvisionProgress) {
			ev.Detail = truncate(ev.Detail, maxDetail)
			b, err := json.Marshal(ev)
			if err == nil {
				err = emit(b)
			}
			_ = err // a failed line shows when the answer is written
		}
		send(station.ProvisionProgress{Stage: StageStart})
		rep, err := p.Provision(ctx, func(ev station.ProvisionProgress) {
			if ev.After == 0 {
				ev.After = time.Since(start)
			}
			send(ev)
		})
		if err != nil {
			return nil, err
		}
		if rep.Status == "" {
			return nil, station.Errorf("provision", station.KindInternal, "the agent made a report without a status")
		}
		return json.Marshal(rep)
	}
}

// truncate cuts s to at most n bytes at a rune boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
