package agent

import (
	"context"
	"crypto/tls"
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
// stored config and registers with DPS by the config's method
// (dps.DeviceClient): tpm (also when empty), by TPM attestation; x509,
// presenting the stored certificate chain with the generated key (in the
// TPM or in software) in the TLS handshake; symkey, with a SAS token
// signed by the stored symmetric key. When DPS assigns the device, it
// connects to the assigned hub the same way (a SAS token signed by the
// TPM's imported key or the symmetric key, or the client certificate) and
// sends one telemetry message. progress is called for each stage:
// "register", for TPM attestation "challenge" and "activated", then
// "assigning", then the DPS status ("assigned", "failed", "disabled"),
// then "hub-connect", "hub-connected" and "telemetry". The TPM is used one
// operation at a time under the agent's TPM mutex, so TPM passthrough
// commands never land inside a sequence. A DPS status other than assigned
// is returned in the report with a nil error. Kinds: NotFound (no TPM for
// the tpm method, no config, no key, chain or symmetric key for the
// method), Invalid, Unauthorized, Unavailable.
func (a *Agent) Provision(ctx context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
	const op = "provision"
	cfg, err := a.store.Load(ctx)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	if err := ValidateConfig(cfg); err != nil {
		return station.ProvisionReport{}, err
	}
	method := cfg.Method
	if method == "" {
		method = station.MethodTPM
	}
	if method == station.MethodTPM && a.tpm == nil {
		return station.ProvisionReport{}, station.Errorf(op, station.KindNotFound,
			"this DUT has no TPM configured, and TPM attestation needs one: start the agent with --tpm")
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
		a.log.Info("provisioning", "stage", stage, "detail", detail, "method", method)
		if progress != nil {
			progress(station.ProvisionProgress{Stage: stage, Detail: detail, After: time.Since(start)})
		}
	}
	dc := &dps.DeviceClient{Endpoint: cfg.GlobalEndpoint, IDScope: cfg.IDScope, HTTP: httpc, Progress: report}
	var (
		st  *dps.DeviceRegistrationState
		hub = dps.HubConfig{TLS: tlsCfg}
	)
	switch method {
	case station.MethodTPM:
		tpm := &lockedTPM{mu: a.lockTPM, t: a.htpm}
		st, err = dc.RegisterTPM(ctx, cfg.RegistrationID, tpm, nil)
		hub.Signer = tpm.HMAC
	case station.MethodX509:
		var cert tls.Certificate
		if cert, err = a.tlsCertificate(ctx); err != nil {
			return station.ProvisionReport{}, err
		}
		st, err = dc.RegisterX509(ctx, cfg.RegistrationID, cert, nil)
		hub.Certificate = &cert
	case station.MethodSymKey:
		var key []byte
		if key, err = a.symmetricKey(ctx, cfg.RegistrationID); err != nil {
			return station.ProvisionReport{}, err
		}
		st, err = dc.RegisterSymmetricKey(ctx, cfg.RegistrationID, key, nil)
		hub.Key = key
	}
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
	hub.Addr, hub.DeviceID = st.AssignedHub, st.DeviceID
	hc, err := dps.ConnectHub(ctx, hub)
	if err != nil {
		return station.ProvisionReport{}, err
	}
	defer hc.Close()
	report("hub-connected", "connected to "+st.AssignedHub)
	body, err := json.Marshal(map[string]string{"kiln": "end-to-end check", "serial": a.info.Serial})
	if err != nil {
		return station.ProvisionReport{}, station.E(op, station.KindInternal, err)
	}
	mid, err := hc.SendTelemetry(ctx, body, nil)
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
