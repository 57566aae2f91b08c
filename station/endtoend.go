package station

import (
	"context"
	"fmt"
	"time"
)

// The steps of the end-to-end check, run after the duplicate check and
// before the unit is recorded (a unit that fails the check is not recorded
// as provisioned, so it can be run again once fixed).
const (
	StepEnroll     = "enroll"            // the unit's individual enrollment on the verification DPS
	StepConfigure  = "write-config"      // the DUT is told where to register
	StepRegister   = "verify-dps"        // the DUT registers; the DPS says assigned
	StepHub        = "verify-hub"        // the hub saw the DUT's telemetry
	StepProduction = "production-config" // the DUT is pointed at production, read back
)

// EndToEndSteps lists the steps of the TPM method with the end-to-end check.
var EndToEndSteps = []string{StepConnect, StepIdentify, StepReadEK, StepValidateEK, StepDuplicates,
	StepEnroll, StepConfigure, StepRegister, StepHub, StepProduction, StepRecord}

// Enroller manages units' individual enrollments on a DPS.
type Enroller interface {
	// EnrollTPM creates or replaces the individual enrollment of regID,
	// attested by the EK (TPM2B_PUBLIC). Kinds: Unauthorized, Unavailable,
	// Invalid.
	EnrollTPM(ctx context.Context, regID string, ekPublic []byte) error
}

// RegistrationState is what a DPS knows of a device's registration.
type RegistrationState struct {
	Status       string // assigned, assigning, failed, disabled
	AssignedHub  string
	DeviceID     string
	ErrorCode    int
	ErrorMessage string
}

// Observer reports what a DPS and its hubs saw of a device.
type Observer interface {
	// Registration returns the DPS's registration state of regID. Kinds:
	// NotFound (it never registered), Unavailable.
	Registration(ctx context.Context, regID string) (RegistrationState, error)
	// WaitTelemetry waits until hub has received telemetry from deviceID
	// and returns when it arrived. Kinds: Unavailable (ctx ended first).
	WaitTelemetry(ctx context.Context, hub, deviceID string) (time.Time, error)
}

// RefusalExplainer is an Observer that knows why the DPS refused a device:
// the DUT learns only a status and a code (a DPS tells a device no more), so
// the FAIL reason gets the DPS's own account when the station can ask it.
type RefusalExplainer interface {
	// Refusal returns why the DPS last refused a request of regID, if it
	// did at or after since.
	Refusal(ctx context.Context, regID string, since time.Time) (string, bool)
}

// EndToEnd proves each unit against a DPS before it passes: the unit is
// enrolled, registers from the DUT, is assigned to a hub, connects to it and
// sends telemetry.
type EndToEnd struct {
	Enroller Enroller
	Observer Observer
	// Verify is the configuration the DUT gets for the check (ID scope,
	// endpoint, trust bundle); the registration ID is set per unit.
	Verify DeviceConfig
	// Production, when set, is written to the DUT after the check and read
	// back, so that the unit ships pointing at the production DPS.
	Production *DeviceConfig
	// X509Group is the ID of the X.509 enrollment group the X.509 method's
	// units register through; empty means "kiln-x509".
	X509Group string
	// Timeout bounds the DUT's registration and the hub check; 0 means 2 minutes.
	Timeout time.Duration
}

// endToEnd runs the check for the unit of run r; enroll makes the DPS
// expect the unit (an individual enrollment or its group) and returns the
// step's detail.
func (w *runner) endToEnd(x *EndToEnd, enroll func() (string, error)) error {
	p, r, ctx := w.p, w.r, w.ctx
	pl, ok := w.link.(ProvisioningLink)
	if !ok {
		w.current = StepEnroll
		return Errorf("end-to-end check", KindInternal, "the DUT link cannot run the end-to-end check: a station wiring error")
	}
	timeout := x.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	if err := w.step(StepEnroll, func() (string, error, error) {
		detail, err := enroll()
		return detail, nil, err
	}); err != nil {
		return err
	}
	if err := w.step(StepConfigure, func() (string, error, error) {
		cfg := x.Verify
		cfg.RegistrationID, cfg.Method = r.RegistrationID, methodOnDevice(r.Method)
		if err := pl.WriteConfig(ctx, cfg); err != nil {
			return "", nil, err
		}
		return fmt.Sprintf("ID scope %s, endpoint %s", cfg.IDScope, cfg.GlobalEndpoint), nil, nil
	}); err != nil {
		return err
	}
	var report ProvisionReport
	if err := w.step(StepRegister, func() (string, error, error) {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		since := w.now()
		var err error
		report, err = pl.ProvisionNow(cctx, func(pp ProvisionProgress) {
			if p.OnStep != nil {
				p.OnStep(StepEvent{RunID: r.ID, Port: r.Port, Serial: r.Serial,
					Step: Step{Name: StepRegister, Started: w.now().UTC(), Detail: pp.Stage + " " + pp.Detail}})
			}
		})
		if err != nil {
			if why := refusal(ctx, x.Observer, r.RegistrationID, since); why != "" {
				err = E("verify on DPS", KindOf(err), fmt.Errorf("%w; the DPS says: %s", err, why))
			}
			return "", nil, err
		}
		r.DPSStatus, r.AssignedHub, r.DeviceID = report.Status, report.AssignedHub, report.DeviceID
		if report.Status != "assigned" {
			return "", nil, Errorf("verify on DPS", KindUnauthorized, "the DUT's registration ended %s (DPS error %d: %s): check the enrollment and the unit's identity",
				report.Status, report.ErrorCode, report.ErrorMessage)
		}
		st, err := x.Observer.Registration(ctx, r.RegistrationID)
		if err != nil {
			return "", nil, err
		}
		if st.Status != "assigned" || st.AssignedHub != report.AssignedHub || st.DeviceID != report.DeviceID {
			return "", nil, Errorf("verify on DPS", KindConflict, "the DUT says it was assigned to %s as %s, but the DPS records %s at %s as %s: the DUT's report cannot be trusted",
				report.AssignedHub, report.DeviceID, st.Status, st.AssignedHub, st.DeviceID)
		}
		return fmt.Sprintf("assigned to %s as %s", st.AssignedHub, st.DeviceID), nil, nil
	}); err != nil {
		return err
	}
	if err := w.step(StepHub, func() (string, error, error) {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		at, err := x.Observer.WaitTelemetry(cctx, report.AssignedHub, report.DeviceID)
		if err != nil {
			return "", nil, Errorf("verify hub", KindUnavailable, "hub %s saw no telemetry from %s: %w", report.AssignedHub, report.DeviceID, err)
		}
		r.TelemetryAt = at.UTC()
		return "telemetry received " + at.UTC().Format(time.RFC3339Nano), nil, nil
	}); err != nil {
		return err
	}
	if x.Production == nil {
		w.skip(StepProduction, "no production DPS configured: the DUT keeps the verification configuration")
		return nil
	}
	return w.step(StepProduction, func() (string, error, error) {
		cfg := *x.Production
		cfg.RegistrationID, cfg.Method = r.RegistrationID, methodOnDevice(r.Method)
		if err := pl.WriteConfig(ctx, cfg); err != nil {
			return "", nil, err
		}
		got, err := pl.ReadConfig(ctx)
		if err != nil {
			return "", nil, err
		}
		if got != cfg {
			return "", nil, Errorf("production config", KindConflict, "the DUT read back a configuration other than the one written (ID scope %q, endpoint %q): check the DUT's storage", got.IDScope, got.GlobalEndpoint)
		}
		return fmt.Sprintf("ID scope %s, endpoint %s (read back)", cfg.IDScope, cfg.GlobalEndpoint), nil, nil
	})
}

// methodOnDevice is the attestation method written into a DUT's config: the
// TPM method stays empty, which agents that predate the field read as tpm.
func methodOnDevice(m Method) Method {
	if m == MethodTPM {
		return ""
	}
	return m
}

// refusal asks o, when it can say, why the DPS refused regID since then.
func refusal(ctx context.Context, o Observer, regID string, since time.Time) string {
	re, ok := o.(RefusalExplainer)
	if !ok {
		return ""
	}
	why, ok := re.Refusal(ctx, regID, since)
	if !ok {
		return ""
	}
	return why
}
