package station

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"
)

// Provisioner runs the provisioning workflow for one DUT at a time per call;
// calls for different ports may run in parallel (one per slot). Every run is
// recorded with its steps as it goes, so a run that stops half way shows how
// far it got.
type Provisioner struct {
	Store    Store
	Dial     func(ctx context.Context, port string) (Link, error) // opens the DUT link on a port
	Endorser Endorser
	Verifier Verifier // EK certificate validation; nil means no root store is configured
	Profile  Profile
	// SerialPattern, when set, is the format a serial number must have
	// (scanned or reported by the DUT).
	SerialPattern *regexp.Regexp
	Now           func() time.Time // defaults to time.Now
	Logger        *slog.Logger     // defaults to slog.Default()
	// EndToEnd, when set, proves each unit against a DPS before it passes.
	EndToEnd *EndToEnd
	// Issuer is the station CA that signs device certificates under the
	// X.509 method; required by it.
	Issuer Issuer
	// SymKey is the group the symmetric-key method derives device keys
	// from; required by it.
	SymKey *SymKeyGroup
	// Batches, when set, puts each passing unit into the open batch (opening
	// one named by the date when none is open) in the record step.
	Batches BatchStore
	// OnStep, when set, is told when a step starts (Done false) and ends
	// (Done true). It is called from the provisioning goroutine: a GUI must
	// hand the event over to its own thread.
	OnStep func(StepEvent)
}

// Request asks for one unit to be provisioned.
type Request struct {
	Port     string // where the DUT is attached
	Serial   string // scanned serial number; empty: use the one the DUT reports
	Operator string // who runs the station, written on the record
}

// StepEvent reports the progress of a run.
type StepEvent struct {
	RunID  int64
	Port   string
	Serial string
	Step   Step // while running: Name and Started only
	Done   bool
}

// Steps lists the steps a run goes through under this provisioner.
func (p *Provisioner) Steps() []string {
	steps, err := stepsFor(p.profile().Method, p.EndToEnd != nil)
	if err != nil {
		return nil
	}
	return steps
}

func (p *Provisioner) profile() Profile {
	prof := p.Profile
	if prof.Method == "" {
		def := DefaultProfile()
		prof.Method = def.Method
		if prof.Station == "" {
			prof.Station = def.Station
		}
		if prof.RegID == "" {
			prof.RegID = def.RegID
		}
		if prof.EKCertPolicy == "" {
			prof.EKCertPolicy = def.EKCertPolicy
		}
	}
	return prof
}

// checkMethod says whether the provisioner has what its method needs.
func (p *Provisioner) checkMethod(m Method) error {
	const op = "provision"
	if _, err := stepsFor(m, false); err != nil {
		return err
	}
	switch {
	case m == MethodX509 && p.Issuer == nil:
		return Errorf(op, KindInvalid, "the X.509 method needs the station CA, and none is configured: run kiln ca init (or kiln ca use-remote)")
	case m == MethodSymKey && (p.SymKey == nil || len(p.SymKey.Key) < 16):
		return Errorf(op, KindInvalid, "the symmetric-key method needs the station's enrollment group key, and none is configured: check the data directory")
	case m == MethodTPM && p.Endorser == nil:
		return Errorf(op, KindInvalid, "the TPM method needs a TPM endorser: a station wiring error")
	}
	return nil
}

// Provision provisions the unit on req.Port and returns its run. The run is
// returned also when the unit fails; the error is then the reason (an
// *Error with a Kind), and run.Error says the same for a person. An error
// with a nil run means nothing could be recorded (the store failed).
func (p *Provisioner) Provision(ctx context.Context, req Request) (*Run, error) {
	now := p.Now
	if now == nil {
		now = time.Now
	}
	log := p.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "provisioner", "port", req.Port)
	prof := p.profile()
	if err := p.checkMethod(prof.Method); err != nil {
		return nil, err
	}

	r := &Run{
		Serial:   strings.TrimSpace(req.Serial),
		Port:     req.Port,
		Station:  prof.Station,
		Operator: req.Operator,
		Method:   prof.Method,
		Started:  now().UTC(),
		Result:   ResultRunning,
	}
	if err := p.Store.CreateRun(ctx, r); err != nil {
		return nil, fmt.Errorf("record the start of a run on %s: %w", req.Port, err)
	}
	w := &runner{p: p, r: r, now: now, ctx: ctx}

	err := w.steps(prof)
	w.finish(err)
	if err != nil {
		// Not an error log: the error is returned; this is the station's audit line.
		log.Info("unit failed", "run", r.ID, "serial", r.Serial, "step", w.current, "reason", err)
	} else {
		log.Info("unit passed", "run", r.ID, "serial", r.Serial, "registration_id", r.RegistrationID, "duration", r.Duration())
	}
	if w.storeErr != nil {
		return r, errors.Join(err, w.storeErr)
	}
	return r, err
}

// runner carries one run through its steps.
type runner struct {
	p        *Provisioner
	r        *Run
	now      func() time.Time
	ctx      context.Context
	link     Link
	current  string
	storeErr error // the first failure to record a step: the record is incomplete
}

// record writes to the store even when the run's context was cancelled (an
// aborted run is still recorded), with a bound so a dead store cannot hang.
func (w *runner) record(f func(ctx context.Context) error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(w.ctx), 10*time.Second)
	defer cancel()
	if err := f(ctx); err != nil && w.storeErr == nil {
		w.storeErr = fmt.Errorf("record run %d: %w", w.r.ID, err)
	}
}

// step runs one named step and records it. fn returns a detail for the
// record, a warning (the step passes with status warn) and an error.
func (w *runner) step(name string, fn func() (detail string, warn, err error)) error {
	w.current = name
	s := Step{Name: name, Started: w.now().UTC()}
	if w.p.OnStep != nil {
		w.p.OnStep(StepEvent{RunID: w.r.ID, Port: w.r.Port, Serial: w.r.Serial, Step: s})
	}
	var detail string
	var warn, err error
	if err = w.ctx.Err(); err == nil {
		detail, warn, err = fn()
	}
	if err != nil && w.ctx.Err() != nil && KindOf(err) == KindOther {
		err = Errorf(name, KindUnavailable, "stopped: %w", w.ctx.Err())
	}
	s.Duration = w.now().Sub(s.Started)
	s.Detail = detail
	switch {
	case err != nil:
		s.Status, s.Error = StepFail, err.Error()
	case warn != nil:
		s.Status, s.Error = StepWarn, warn.Error()
	default:
		s.Status = StepOK
	}
	w.r.Steps = append(w.r.Steps, s)
	w.record(func(ctx context.Context) error { return w.p.Store.AddStep(ctx, w.r.ID, s) })
	if w.p.OnStep != nil {
		w.p.OnStep(StepEvent{RunID: w.r.ID, Port: w.r.Port, Serial: w.r.Serial, Step: s, Done: true})
	}
	return err
}

func (w *runner) skip(name, why string) {
	s := Step{Name: name, Status: StepSkip, Started: w.now().UTC(), Detail: why}
	w.r.Steps = append(w.r.Steps, s)
	w.record(func(ctx context.Context) error { return w.p.Store.AddStep(ctx, w.r.ID, s) })
	if w.p.OnStep != nil {
		w.p.OnStep(StepEvent{RunID: w.r.ID, Port: w.r.Port, Serial: w.r.Serial, Step: s, Done: true})
	}
}

func (w *runner) finish(err error) {
	r := w.r
	if w.link != nil {
		st := w.link.Stats()
		r.BytesOut, r.BytesIn = st.BytesOut, st.BytesIn
		_ = w.link.Close()
	}
	r.Finished = w.now().UTC()
	if err != nil {
		r.Result, r.ErrorKind, r.Error = ResultFail, KindOf(err), err.Error()
	} else {
		r.Result = ResultPass
	}
	w.record(func(ctx context.Context) error { return w.p.Store.FinishRun(ctx, r) })
}

func (w *runner) steps(prof Profile) error {
	p, r, ctx := w.p, w.r, w.ctx
	if r.Serial != "" {
		if err := p.checkSerial(r.Serial); err != nil {
			w.current = "scan"
			return err
		}
	}

	if err := w.step(StepConnect, func() (string, error, error) {
		l, err := p.Dial(ctx, r.Port)
		if err != nil {
			return "", nil, err
		}
		w.link = l
		return "link open on " + r.Port, nil, nil
	}); err != nil {
		return err
	}

	if err := w.step(StepIdentify, func() (string, error, error) {
		info, err := w.link.Info(ctx)
		if err != nil {
			return "", nil, err
		}
		r.Model, r.Firmware = info.Model, info.Firmware
		detail := fmt.Sprintf("serial %q, model %q, firmware %q, link protocol v%d", info.Serial, info.Model, info.Firmware, info.Protocol)
		switch {
		case r.Serial == "" && info.Serial == "":
			return detail, nil, Errorf("identify", KindInvalid, "the DUT on %s reports no serial number and none was scanned: scan the unit's label", r.Port)
		case r.Serial == "":
			if err := p.checkSerial(info.Serial); err != nil {
				return detail, nil, err
			}
			r.Serial = info.Serial
		case info.Serial != "" && !strings.EqualFold(info.Serial, r.Serial):
			return detail, nil, Errorf("identify", KindConflict, "scanned serial %s, but the DUT on %s reports %s: check that the scanned unit is the one on this port", r.Serial, r.Port, info.Serial)
		}
		if c, what := methodCapability(prof.Method); !info.Has(c) {
			return detail, nil, Errorf("identify", KindInvalid, "the DUT %s reports no %s, so the %s method cannot provision it: check the unit's variant or the station profile", r.Serial, what, prof.Method)
		}
		return detail, nil, nil
	}); err != nil {
		return err
	}

	switch prof.Method {
	case MethodX509:
		return w.x509Steps(prof)
	case MethodSymKey:
		return w.symKeySteps(prof)
	}
	return w.tpmSteps(prof)
}

// methodCapability returns the DUT capability method m needs, and its name
// for a person.
func methodCapability(m Method) (string, string) {
	switch m {
	case MethodX509:
		return CapKeyGen, "key generation"
	case MethodSymKey:
		return CapSymKey, "symmetric-key storage"
	}
	return CapTPM, "TPM"
}

// tpmSteps runs the TPM method's steps after identify.
func (w *runner) tpmSteps(prof Profile) error {
	p, r, ctx := w.p, w.r, w.ctx
	var e *Endorsement
	if err := w.step(StepReadEK, func() (string, error, error) {
		var err error
		e, err = p.Endorser.Endorsement(ctx, w.link)
		if err != nil {
			return "", nil, err
		}
		r.EKHash = e.EKHash()
		detail := "EK sha256 " + r.EKHash
		if e.EKCreated {
			detail += " (EK created and persisted)"
		}
		if e.SRKCreated {
			detail += " (SRK created and persisted)"
		}
		if e.EKCert != nil {
			detail += fmt.Sprintf("; EK certificate %d bytes", len(e.EKCert))
		} else {
			detail += "; no EK certificate"
		}
		return detail, nil, nil
	}); err != nil {
		return err
	}

	switch regID, err := RegistrationID(prof.RegID, r.Serial, e.EKPublic); {
	case err != nil:
		w.current = StepReadEK
		return err
	default:
		r.RegistrationID = regID
	}

	if prof.EKCertPolicy == EKCertOff {
		w.skip(StepValidateEK, "EK certificate policy is off")
	} else if err := w.step(StepValidateEK, func() (string, error, error) {
		var err error
		if p.Verifier == nil {
			err = Errorf("validate EK certificate", KindInvalid, "no manufacturer root store is configured: set one in the station profile")
		} else {
			err = p.Verifier.VerifyEKCert(ctx, e)
		}
		if err == nil {
			return "EK certificate chains to a trusted root and matches the EK", nil, nil
		}
		if prof.EKCertPolicy == EKCertWarn {
			return "accepted under policy warn", err, nil
		}
		return "", nil, err
	}); err != nil {
		return err
	}

	if err := w.step(StepDuplicates, func() (string, error, error) {
		u, err := p.Store.UnitBySerial(ctx, r.Serial)
		switch {
		case err == nil:
			return "", nil, Errorf("check duplicates", KindConflict, "serial %s was already provisioned in run %d on %s (EK sha256 %s): a unit is provisioned once; check the label", u.Serial, u.RunID, u.Created.Format(time.DateTime), short(u.EKHash))
		case KindOf(err) != KindNotFound:
			return "", nil, err
		}
		u, err = p.Store.UnitByEKHash(ctx, r.EKHash)
		switch {
		case err == nil:
			return "", nil, Errorf("check duplicates", KindConflict, "this TPM's EK (sha256 %s) is already recorded for unit %s (run %d), so unit %s cannot have it too: the DUT may be a clone or its TPM was reused; set it aside", short(r.EKHash), u.Serial, u.RunID, r.Serial)
		case KindOf(err) != KindNotFound:
			return "", nil, err
		}
		return "serial and EK not seen before", nil, nil
	}); err != nil {
		return err
	}

	if x := p.EndToEnd; x != nil {
		if err := w.endToEnd(x, func() (string, error) {
			if err := x.Enroller.EnrollTPM(ctx, r.RegistrationID, e.EKPublic); err != nil {
				return "", err
			}
			return "individual TPM enrollment " + r.RegistrationID, nil
		}); err != nil {
			return err
		}
	}

	return w.recordUnit(&Unit{
		EKHash:    r.EKHash,
		EKPublic:  e.EKPublic,
		EKKeyDER:  e.EKKeyDER,
		SRKPublic: e.SRKPublic,
		EKCert:    e.EKCert,
	})
}

// recordUnit fills u from the run, records it and puts it into the open
// batch: the record step of every method.
func (w *runner) recordUnit(u *Unit) error {
	p, r, ctx := w.p, w.r, w.ctx
	return w.step(StepRecord, func() (string, error, error) {
		u.Serial, u.RegistrationID, u.Method = r.Serial, r.RegistrationID, r.Method
		u.Model, u.Firmware = r.Model, r.Firmware
		u.RunID, u.Station, u.Operator, u.Created = r.ID, r.Station, r.Operator, w.now().UTC()
		if err := p.Store.RecordUnit(ctx, u); err != nil {
			return "", nil, err
		}
		detail := "registration ID " + r.RegistrationID
		if p.Batches == nil {
			return detail, nil, nil
		}
		b, err := w.joinBatch()
		if err != nil {
			return detail, nil, E("join batch", KindOf(err), fmt.Errorf(
				"unit %s is recorded, but it is in no batch (%w): fix the cause, then add the unit to the open batch by hand; provisioning it again would fail as a duplicate", r.Serial, err))
		}
		return fmt.Sprintf("%s; batch %d (%s)", detail, b.ID, b.Name), nil, nil
	})
}

// joinBatch puts the run's (recorded) unit into the open batch, opening one
// when none is open. The unit is recorded already, so this finishes even when
// the run's context is cancelled, within a bound. A batch sealed or opened by
// someone else meanwhile is a Conflict; it is retried a few times.
func (w *runner) joinBatch() (*Batch, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(w.ctx), 10*time.Second)
	defer cancel()
	bs := w.p.Batches
	var err error
	for range 3 {
		var b *Batch
		b, err = bs.OpenBatch(ctx)
		if KindOf(err) == KindNotFound {
			b = &Batch{Name: BatchName(w.now()), State: BatchOpen, Created: w.now().UTC()}
			err = bs.CreateBatch(ctx, b)
		}
		if err == nil {
			err = bs.AddUnit(ctx, b.ID, w.r.Serial)
		}
		if err == nil {
			return b, nil
		}
		if KindOf(err) != KindConflict {
			break
		}
	}
	return nil, err
}

func (p *Provisioner) checkSerial(s string) error {
	if p.SerialPattern != nil && !p.SerialPattern.MatchString(s) {
		return Errorf("check serial", KindInvalid, "serial %q does not have this product's format %s: rescan the label", s, p.SerialPattern)
	}
	return nil
}

func short(h string) string {
	if len(h) > 16 {
		return h[:16] + "…"
	}
	return h
}

// RegistrationID returns a unit's DPS registration ID under rule.
func RegistrationID(rule RegIDRule, serial string, ekPublic []byte) (string, error) {
	switch rule {
	case RegIDFromEK, "":
		if len(ekPublic) == 0 {
			return "", Errorf("registration ID", KindInvalid, "no EK to derive the registration ID from")
		}
		return RegistrationIDFromEK(ekPublic), nil
	case RegIDFromSerial:
		id := strings.ToLower(serial)
		if err := ValidRegistrationID(id); err != nil {
			return "", err
		}
		return id, nil
	default:
		return "", Errorf("registration ID", KindInvalid, "unknown registration ID rule %q: use ek or serial", rule)
	}
}

// ValidRegistrationID checks the DPS rules for a registration ID: 1 to 128
// characters, lower-case letters, digits and - . _ :, with no separator at
// the start or the end.
func ValidRegistrationID(id string) error {
	if id == "" || len(id) > 128 {
		return Errorf("registration ID", KindInvalid, "registration ID %q must be 1 to 128 characters", id)
	}
	for i, c := range id {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' || c == '.' || c == '_' || c == ':':
			if i == 0 || i == len(id)-1 {
				return Errorf("registration ID", KindInvalid, "registration ID %q must not start or end with %q", id, c)
			}
		default:
			return Errorf("registration ID", KindInvalid, "registration ID %q has %q: only a-z, 0-9 and - . _ : are allowed", id, c)
		}
	}
	return nil
}
