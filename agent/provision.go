package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// Bounds of one provisioning run.
const (
	provisionLimit = 5 * time.Minute  // the whole run
	requestTimeout = 30 * time.Second // one HTTPS request to DPS
)

var _ link.Provisioner = (*Agent)(nil)

// WriteConfig validates cfg (ValidateConfig) and stores it. Kinds:
// Invalid, Unavailable.
func (a *Agent) WriteConfig(ctx context.Context, cfg station.DeviceConfig) error {
	if err := ValidateConfig(cfg); err != nil {
		return err
	}
	if err := a.store.Save(ctx, cfg); err != nil {
		return err
	}
	a.log.Info("provisioning config written", "id_scope", cfg.IDScope, "endpoint", cfg.GlobalEndpoint,
		"registration_id", cfg.RegistrationID, "trust_bundle_bytes", len(cfg.TrustBundle))
	return nil
}

// ReadConfig returns the stored config. Kinds: NotFound (none written
// yet), Invalid, Unavailable.
func (a *Agent) ReadConfig(ctx context.Context) (station.DeviceConfig, error) {
	return a.store.Load(ctx)
}

// Provision runs the end-to-end check the station asks for: it reads the
// stored config, registers with DPS by TPM attestation (dps.DeviceClient),
// and when DPS assigns the device, connects to the assigned hub with a SAS
// token signed by the TPM and sends one telemetry message. progress is
// called for each stage: "register", "challenge", "activated",
// "assigning", then the DPS status ("assigned", "failed", "disabled"), then
// "hub-connect", "hub-connected" and "telemetry". The TPM is used one
// operation at a time under the agent's TPM mutex, so TPM passthrough
// commands never land inside a sequence. A DPS status other than assigned
// is returned in the report with a nil error. Kinds: NotFound (no TPM, no
// config), Invalid, Unauthorized, Unavailable.
func (a *Agent) Provision(ctx context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
	const op = "provision"
	if a.tpm == nil {
		return station.ProvisionReport{}, station.Errorf(op, station.KindNotFound,
			"this DUT has no TPM configured, and TPM attestation needs one: start the agent with --tpm")
	}
	cfg, err := a.store.Load(ctx)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	if err := ValidateConfig(cfg); err != nil {
		return station.ProvisionReport{}, err
	}
	httpc, err := dps.NewTLSClient(cfg.TrustBundle, requestTimeout)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	tlsCfg, err := dps.TLSConfig(cfg.TrustBundle)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, provisionLimit)
	defer cancel()

	start := time.Now()
	report := func(stage, detail string) {
		a.log.Info("provisioning", "stage", stage, "detail", detail)
		if progress != nil {
			progress(station.ProvisionProgress{Stage: stage, Detail: detail, After: time.Since(start)})
		}
	}
	tpm := &lockedTPM{mu: a.lockTPM, t: hsm.New(noClose{a.tpm})}
	dc := &dps.DeviceClient{Endpoint: cfg.GlobalEndpoint, IDScope: cfg.IDScope, HTTP: httpc, Progress: report}
	st, err := dc.RegisterTPM(ctx, cfg.RegistrationID, tpm, nil)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	rep := station.ProvisionReport{
		Status:       st.Status,
		AssignedHub:  st.AssignedHub,
		DeviceID:     st.DeviceID,
		ErrorCode:    st.ErrorCode,
		ErrorMessage: st.ErrorMessage,
	}
	if st.Status != dps.StatusAssigned {
		return rep, nil
	}

	report("hub-connect", "connecting to "+st.AssignedHub+" as "+st.DeviceID)
	hub, err := dps.ConnectHub(ctx, dps.HubConfig{Addr: st.AssignedHub, DeviceID: st.DeviceID, Signer: tpm.HMAC, TLS: tlsCfg})
	if err != nil {
		return station.ProvisionReport{}, err
	}
	defer hub.Close()
	report("hub-connected", "connected to "+st.AssignedHub)
	body, err := json.Marshal(map[string]string{"kiln": "end-to-end check", "serial": a.info.Serial})
	if err != nil {
		return station.ProvisionReport{}, station.E(op, station.KindInternal, err)
	}
	mid, err := hub.SendTelemetry(ctx, body, nil)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	rep.TelemetrySent = time.Now().UTC()
	rep.MessageID = mid
	report("telemetry", "message "+mid+" acknowledged by the hub")
	return rep, nil
}

// lockTPM takes the agent's TPM mutex and returns its unlock.
func (a *Agent) lockTPM() func() {
	a.tpmMu.Lock()
	return a.tpmMu.Unlock
}

// lockedTPM is an hsm.TPM whose every operation holds the agent's TPM
// mutex, so that it never interleaves with TPM passthrough commands.
type lockedTPM struct {
	mu func() func()
	t  *hsm.TPM
}

var _ dps.TPMDevice = (*lockedTPM)(nil)

func (l *lockedTPM) Endorsement(ctx context.Context) (*station.Endorsement, error) {
	defer l.mu()()
	return l.t.Endorsement(ctx)
}

func (l *lockedTPM) ActivateDPS(ctx context.Context, blob []byte) error {
	defer l.mu()()
	return l.t.ActivateDPS(ctx, blob)
}

func (l *lockedTPM) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	defer l.mu()()
	return l.t.HMAC(ctx, data)
}

// noClose hides the Close of the agent's TPM transport from hsm.TPM: the
// agent owns it.
type noClose struct{ t transport.TPM }

func (n noClose) Send(cmd []byte) ([]byte, error) { return n.t.Send(cmd) }
