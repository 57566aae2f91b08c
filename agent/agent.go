// Package agent is the device-side agent of Kiln: it serves the DUT link on
// the device's serial line, answers HELLO with the device's identity,
// passes TPM 2.0 commands through to the device's TPM, keeps the
// provisioning config the station writes (ConfigStore), generates a key
// pair and CSR (in the TPM when there is one) and keeps the certificate
// chain the station issues for it, keeps a symmetric key the station
// writes, and, when told, registers with DPS by TPM, X.509 or
// symmetric-key attestation, connects to the assigned IoT Hub and sends a
// telemetry message, streaming its progress to the station.
//
// It is pure Go and builds with CGO_ENABLED=0 for linux/arm64, arm and amd64;
// cmd/kiln-agent is its binary.
package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// CapTPM is the capability announced when the agent has a TPM.
const CapTPM = station.CapTPM

// Config configures an Agent. Only Info is needed; a zero TPM means the
// device has no TPM.
type Config struct {
	// Info is what the agent says about the device in HELLO (see
	// DetectInfo). CapTPM is added to its capabilities when TPM is set;
	// station.CapKeyGen and station.CapSymKey always are.
	Info station.DeviceInfo
	// TPM is the device's TPM, e.g. /dev/tpmrm0 through go-tpm's linuxtpm.
	TPM transport.TPM
	// Store keeps the provisioning config; nil means a MemoryStore.
	Store ConfigStore
	// DataDir is the directory (0700) keeping the identity the station
	// gives the DUT: the generated key, its certificate chain and the
	// symmetric key, each file 0600, secrets encrypted under a key sealed
	// in the TPM when there is one. Empty keeps them in memory (simulated
	// DUTs).
	DataDir string
	// MaxFrame is the largest frame the agent accepts; 0 means
	// link.DefaultMaxFrame.
	MaxFrame int
	// Logger receives what the agent does; nil discards it.
	Logger *slog.Logger
}

// Agent answers the DUT link on a device. It implements link.Handler.
// Its TPM is single-access: commands are serialised, one at a time.
type Agent struct {
	info     station.DeviceInfo
	maxFrame int
	log      *slog.Logger

	tpmMu sync.Mutex // the TPM is single-access
	tpm   transport.TPM
	htpm  *hsm.TPM // tpm for hsm operations; use under tpmMu

	store ConfigStore

	idMu  sync.Mutex // serialises the identity files
	vault vault

	dekMu sync.Mutex
	dek   []byte // the data-encryption key, once unsealed
}

var _ link.Handler = (*Agent)(nil)

// New returns an Agent. Kinds: Invalid (a frame limit out of range).
func New(cfg Config) (*Agent, error) {
	if cfg.MaxFrame != 0 && (cfg.MaxFrame < link.MinMaxFrame || cfg.MaxFrame > link.LimitMaxFrame) {
		return nil, station.Errorf("start agent", station.KindInvalid,
			"frame limit %d is outside %d–%d bytes", cfg.MaxFrame, link.MinMaxFrame, link.LimitMaxFrame)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	info := cfg.Info
	info.Capabilities = slices.Clone(info.Capabilities)
	caps := []string{station.CapKeyGen, station.CapSymKey}
	if cfg.TPM != nil {
		caps = append([]string{CapTPM}, caps...)
	}
	for _, c := range caps {
		if !info.Has(c) {
			info.Capabilities = append(info.Capabilities, c)
		}
	}
	store := cfg.Store
	if store == nil {
		store = &MemoryStore{}
	}
	var v vault = &memVault{}
	if cfg.DataDir != "" {
		v = &dirVault{dir: cfg.DataDir}
	}
	a := &Agent{info: info, maxFrame: cfg.MaxFrame, log: log.With("component", "agent"), tpm: cfg.TPM, store: store, vault: v}
	if cfg.TPM != nil {
		a.htpm = hsm.New(noClose{cfg.TPM})
	}
	return a, nil
}

// Info returns the device info given in Config (link.Serve sets Protocol).
func (a *Agent) Info(ctx context.Context) (station.DeviceInfo, error) {
	info := a.info
	info.Capabilities = slices.Clone(info.Capabilities)
	return info, nil
}

// TPM sends one raw TPM 2.0 command to the device's TPM and returns the raw
// response; TPM error codes travel inside the response. Commands are
// serialised. Kinds: NotFound (no TPM configured), Unavailable (the TPM did
// not answer).
func (a *Agent) TPM(ctx context.Context, cmd []byte) ([]byte, error) {
	const op = "TPM command"
	if a.tpm == nil {
		return nil, station.Errorf(op, station.KindNotFound, "this DUT has no TPM configured: start the agent with --tpm")
	}
	a.tpmMu.Lock()
	defer a.tpmMu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, station.E(op, station.KindUnavailable, err)
	}
	rsp, err := a.tpm.Send(cmd)
	if err != nil {
		return nil, station.Errorf(op, station.KindUnavailable, "the DUT's TPM did not answer (%v): check the TPM device and restart the agent", err)
	}
	a.log.Debug("TPM command", "cmd_bytes", len(cmd), "rsp_bytes", len(rsp), "cc", commandCode(cmd))
	return rsp, nil
}

// commandCode returns the TPM command code of a command, for logs.
func commandCode(cmd []byte) string {
	if len(cmd) < 10 {
		return "?"
	}
	return fmt.Sprintf("0x%02x%02x%02x%02x", cmd[6], cmd[7], cmd[8], cmd[9])
}

// Serve answers the station on rw (the device's serial line) until ctx is
// done or the line fails; see link.Serve. Besides HELLO and TPM it answers
// WRITE CONFIG, READ CONFIG and PROVISION (link.AddProvisioning) and
// GENERATE KEY, WRITE CERT CHAIN, WRITE SYMMETRIC KEY and READ IDENTITY
// (link.AddIdentity).
func (a *Agent) Serve(ctx context.Context, rw io.ReadWriter) error {
	a.log.Info("serving DUT link", "serial", a.info.Serial, "model", a.info.Model, "capabilities", a.info.Capabilities)
	cfg := link.ServeConfig{MaxFrame: a.maxFrame, Logger: a.log}
	link.AddProvisioning(&cfg, a)
	link.AddIdentity(&cfg, a)
	return link.Serve(ctx, rw, a, cfg)
}
