package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
	"github.com/kilnworks/kiln/ui"
)

// guiBatches is the Batches screen's backend: listing, units and sealing on
// the station's store; pushing, exporting and enabling through cloudsync,
// as kiln batch does (the same batchEnv, pusher, outbox and signing key).
type guiBatches struct {
	e       *env
	be      *batchEnv
	targets *guiTargets
	log     *slog.Logger
	// groups returns the station's enrollment groups as the running
	// provisioner has them: the symmetric-key group (nil: not open) and
	// the station CA's signing certificate (DER; nil: no CA open). Nil:
	// batches of group units are pushed with kiln batch push only.
	groups func() (*station.SymKeyGroup, []byte)
}

var _ ui.BatchActions = (*guiBatches)(nil)

// newGUIBatches returns the Batches screen's backend and the Settings
// screen's batch targets over store, the station's store in the data
// directory of c. It opens (or creates) the data key that seals the
// targets' connection strings and the manifest signing key.
func newGUIBatches(e *env, c *config, store *sqlite.Store, log *slog.Logger) (*guiBatches, *guiTargets, error) {
	sl, err := cloudsync.LoadSealer(filepath.Join(c.Home, cloudsync.KeyFile))
	if err != nil {
		return nil, nil, err
	}
	be := &batchEnv{c: c, store: store, sealer: sl}
	file, err := loadConfig(e)
	if err != nil {
		return nil, nil, err
	}
	t := &guiTargets{e: e, be: be, log: log, seal: file.BatchTarget}
	return &guiBatches{e: e, be: be, targets: t, log: log}, t, nil
}

func (g *guiBatches) Batches(ctx context.Context, f station.BatchFilter) ([]*station.Batch, error) {
	return g.be.store.Batches(ctx, f)
}

func (g *guiBatches) Batch(ctx context.Context, id int64) (*station.Batch, error) {
	return g.be.store.Batch(ctx, id)
}

func (g *guiBatches) BatchUnits(ctx context.Context, id int64) ([]*station.Unit, error) {
	return g.be.store.BatchUnits(ctx, id)
}

// Seal seals the open batch id and binds it to the target chosen in
// Settings (or the only target), with the enrollment template it has.
func (g *guiBatches) Seal(ctx context.Context, id int64) error {
	b, err := g.be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	if b.State != station.BatchOpen {
		return station.Errorf("seal batch", station.KindConflict, "batch %d is %s, not open: it was sealed already", b.ID, b.State)
	}
	target, err := defaultTarget(ctx, g.be, g.targets.SealTarget())
	if err != nil {
		return err
	}
	if target != "" && target != b.TargetID {
		if err := g.be.store.SetBatchTarget(ctx, id, target, b.Template); err != nil {
			return err
		}
	}
	if err := g.be.store.Transition(ctx, id, station.BatchOpen, station.BatchSealed); err != nil {
		return err
	}
	g.log.Info("batch sealed", "batch", id, "target", target)
	return nil
}

// pusher returns the pusher of batch b's target, binding a sealed batch
// without a target to the default one first.
func (g *guiBatches) pusher(ctx context.Context, b *station.Batch, progress func(ui.BatchProgress)) (*cloudsync.Pusher, error) {
	target := ""
	if b.TargetID == "" {
		var err error
		if target, err = defaultTarget(ctx, g.be, g.targets.SealTarget()); err != nil {
			return nil, err
		}
		if target == "" {
			return nil, station.Errorf(fmt.Sprintf("push batch %d", b.ID), station.KindInvalid,
				"batch %d has no DPS target: add one in Settings under Batch targets and choose it under Seal batches with, then push again", b.ID)
		}
	}
	p, _, err := g.be.pusherFor(ctx, g.e, b, target)
	if err != nil {
		return nil, err
	}
	if p.Group, err = g.group(ctx, b); err != nil {
		return nil, err
	}
	p.Verify = cloudsync.VerifySample
	p.Progress = func(pr cloudsync.Progress) {
		progress(ui.BatchProgress{Phase: pr.Phase, Done: pr.Done, Failed: pr.Failed, Total: pr.Total, Elapsed: pr.Elapsed})
	}
	return p, nil
}

// group returns the enrollment group of batch b's X.509 and symmetric-key
// units: the station's own, when every such unit enrolls through it
// (symmetric-key units of the station's group; X.509 units whose leaf the
// station CA signed). nil when b has no such units. Kinds: Invalid (units
// the station's groups do not cover, e.g. imported vendor parts: the
// message says to push them with kiln batch push --group-id).
func (g *guiBatches) group(ctx context.Context, b *station.Batch) (*cloudsync.Group, error) {
	units, err := g.be.store.BatchUnits(ctx, b.ID)
	if err != nil {
		return nil, err
	}
	op := fmt.Sprintf("push batch %d", b.ID)
	cli := fmt.Sprintf("push it with kiln batch push %d --group-id … --group-cert …|--group-key-file …", b.ID)
	var sym *station.SymKeyGroup
	var signing []byte
	if g.groups != nil {
		sym, signing = g.groups()
	}
	var signer *x509.Certificate
	if signing != nil {
		if signer, err = x509.ParseCertificate(signing); err != nil {
			return nil, station.E(op, station.KindInternal, fmt.Errorf("the station CA's signing certificate: %w", err))
		}
	}
	var x509s, syms int
	for _, u := range units {
		switch u.Method {
		case station.MethodSymKey:
			syms++
			if sym == nil || u.EnrollmentGroup != sym.ID {
				return nil, station.Errorf(op, station.KindInvalid,
					"unit %s enrolls through the symmetric-key group %q, which this station does not have open: %s", u.Serial, u.EnrollmentGroup, cli)
			}
		case station.MethodX509:
			x509s++
			leaf, err := x509.ParseCertificate(u.Certificate)
			if err != nil || signer == nil || leaf.CheckSignatureFrom(signer) != nil {
				return nil, station.Errorf(op, station.KindInvalid,
					"unit %s holds no certificate from this station's CA (an imported part, or the X.509 method is not in use): %s", u.Serial, cli)
			}
		}
	}
	switch {
	case x509s > 0 && syms > 0:
		return nil, station.Errorf(op, station.KindInvalid, "batch %d mixes X.509 and symmetric-key units, which need two enrollment groups: %s for each", b.ID, cli)
	case syms > 0:
		key := dps.EncodeKey(sym.Key)
		return &cloudsync.Group{ID: sym.ID, Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
			SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: key, SecondaryKey: key}}}, nil
	case x509s > 0:
		id := g.be.c.X509Group
		if id == "" {
			id = defaultX509Group
		}
		pemCert := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: signing}))
		return &cloudsync.Group{ID: id, Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
			X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: pemCert}}}}}, nil
	}
	return nil, nil
}

// Push pushes batch id to its target through cloudsync's durable outbox:
// a push stopped (ctx cancelled) leaves the batch pushing, and the next
// Push resumes it. The refused units are then listed by UnitErrors.
func (g *guiBatches) Push(ctx context.Context, id int64, progress func(ui.BatchProgress)) error {
	return g.withPusher(ctx, id, progress, (*cloudsync.Pusher).Push)
}

// withPusher runs one of a pusher's operations on batch id.
func (g *guiBatches) withPusher(ctx context.Context, id int64, progress func(ui.BatchProgress),
	run func(*cloudsync.Pusher, context.Context, int64) (*cloudsync.Report, error)) error {
	b, err := g.be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	p, err := g.pusher(ctx, b, progress)
	if err != nil {
		return err
	}
	_, err = run(p, ctx, id)
	return err
}

// Enable enables the enrollments of pushed batch id (the second phase of a
// two-phase enrollment).
func (g *guiBatches) Enable(ctx context.Context, id int64, progress func(ui.BatchProgress)) error {
	return g.withPusher(ctx, id, progress, (*cloudsync.Pusher).Enable)
}

// Export writes batch id to path in format, through a temporary file
// renamed over path once complete; with handover a sealed batch becomes
// exported.
func (g *guiBatches) Export(ctx context.Context, id int64, format, path string, handover bool, progress func(ui.BatchProgress)) error {
	op := fmt.Sprintf("export batch %d", id)
	b, err := g.be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	if b.State == station.BatchOpen {
		return station.Errorf(op, station.KindConflict, "batch %d is open: seal it first, so that no unit joins after the export", b.ID)
	}
	if path == "" || path == "-" || !filepath.IsAbs(path) {
		return station.Errorf(op, station.KindInvalid, "%q is not a file path: give the full path of the file to write (Browse… picks one)", path)
	}
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || !fi.IsDir() {
		return station.Errorf(op, station.KindInvalid, "the folder %s does not exist: pick another one (is the USB stick mounted?)", filepath.Dir(path))
	}
	units, err := g.be.store.BatchUnits(ctx, id)
	if err != nil {
		return err
	}
	w, commit, err := outFile(g.e, path)
	if err != nil {
		return station.E(op, station.KindInvalid, fmt.Errorf("%w: pick a folder you may write to", err))
	}
	start := time.Now()
	progress(ui.BatchProgress{Total: len(units)})
	step := func(done int) { progress(ui.BatchProgress{Done: done, Total: len(units), Elapsed: time.Since(start)}) }
	var group *cloudsync.Group
	if format == exportBulk {
		if group, err = g.group(ctx, b); err != nil {
			commit(err)
			return err
		}
	}
	if err := commit(writeBatchExport(g.be, w, b, units, format, group, false, step)); err != nil {
		return err
	}
	g.log.Info("batch exported", "batch", id, "format", format, "path", path, "units", len(units))
	if handover && b.State == station.BatchSealed {
		if err := g.be.store.Transition(ctx, id, station.BatchSealed, station.BatchExported); err != nil {
			return err
		}
		g.log.Info("batch handed over as files", "batch", id)
	}
	return nil
}

// UnitErrors lists the items of batch id's push and enable that the target
// refused, from the outbox.
func (g *guiBatches) UnitErrors(ctx context.Context, id int64) ([]ui.UnitError, error) {
	if _, err := g.be.store.Batch(ctx, id); err != nil {
		return nil, err
	}
	var out []ui.UnitError
	for _, op := range []station.PushOp{station.PushEnroll, station.PushEnable} {
		items, err := g.be.store.PushItems(ctx, id, op, station.PushFailed)
		if err != nil {
			return nil, err
		}
		for _, it := range items {
			reg := it.Key
			if strings.HasPrefix(reg, "serial:") {
				reg = ""
			}
			msg := it.Error
			if op == station.PushEnable {
				msg = "enable: " + msg
			}
			out = append(out, ui.UnitError{Serial: it.Serial, RegistrationID: reg, Kind: codeKind(it.ErrorCode), Message: msg, At: it.Updated})
		}
	}
	return out, nil
}

// codeKind is the station Kind of a DPS error code.
func codeKind(code int) station.Kind {
	switch code / 1000 {
	case 401, 403:
		return station.KindUnauthorized
	case 404:
		return station.KindNotFound
	case 409, 412:
		return station.KindConflict
	case 429, 500, 502, 503, 504:
		return station.KindUnavailable
	}
	return station.KindInvalid
}

// ExportFormats are the formats of cloudsync's export, as kiln batch
// export names them.
func (g *guiBatches) ExportFormats() []ui.ExportFormat {
	return []ui.ExportFormat{
		{ID: exportBulk, Label: "DPS bulk JSON", Ext: ".json"},
		{ID: exportCSV, Label: "CSV", Ext: ".csv"},
		{ID: exportManifest, Label: "Signed manifest", Ext: ".manifest.json"},
	}
}

// guiTargets is the Settings screen's batch targets: kept in the store with
// their connection strings sealed, as kiln batch target add keeps them.
type guiTargets struct {
	e   *env
	be  *batchEnv
	log *slog.Logger

	mu   sync.Mutex // guards seal; serializes SetSealTarget
	seal string
}

var _ ui.Targets = (*guiTargets)(nil)

func (t *guiTargets) Targets(ctx context.Context) ([]ui.BatchTarget, error) {
	ts, err := t.be.store.Targets(ctx)
	if err != nil {
		return nil, err
	}
	var out []ui.BatchTarget
	for _, x := range ts {
		ops := x.OpsPerMinute
		if ops == 0 {
			ops = station.DefaultOpsPerMinute
		}
		out = append(out, ui.BatchTarget{Name: x.Name, Host: x.HostName, OpsPerMinute: ops, PrivateCA: len(x.TrustPEM) > 0})
	}
	return out, nil
}

// AddTarget seals nt's connection string and stores the target. Neither
// the string nor its key is logged or put in an error.
func (t *guiTargets) AddTarget(ctx context.Context, nt ui.NewBatchTarget) error {
	op := "add target " + nt.Name
	tg := &station.Target{Name: nt.Name, OpsPerMinute: nt.OpsPerMinute}
	if nt.TrustPath != "" {
		b, err := os.ReadFile(nt.TrustPath)
		if err != nil {
			return station.Errorf(op, station.KindInvalid, "the TLS root %s cannot be read (%v): give the PEM file of the devserver's CA, e.g. kiln-data/devserver/ca.pem", nt.TrustPath, err)
		}
		tg.TrustPEM = b
	}
	// Check the name before sealing: the sealed string is bound to it.
	tg.SealedConnectionString = []byte{0}
	if err := tg.Validate(); err != nil {
		return err
	}
	if err := t.be.sealer.SealTarget(tg, nt.ConnectionString); err != nil {
		return err
	}
	if _, err := cloudsync.NewServiceClient(tg, t.be.sealer); err != nil {
		return err
	}
	if err := t.be.store.PutTarget(ctx, tg); err != nil {
		return err
	}
	t.log.Info("batch target added", "target", tg.Name, "host", tg.HostName, "ops_per_minute", tg.OpsPerMinute)
	return nil
}

func (t *guiTargets) SealTarget() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.seal
}

// SetSealTarget chooses the target batches sealed in the GUI are bound to
// and saves the choice in station.json (batch_target).
func (t *guiTargets) SetSealTarget(ctx context.Context, name string) error {
	if name != "" {
		if _, err := t.be.store.Target(ctx, name); err != nil {
			return err
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	file, err := loadConfig(t.e)
	if err != nil {
		return err
	}
	file.BatchTarget = name
	if err := file.save(); err != nil {
		return station.Errorf("choose target", station.KindInternal, "%v: check the data directory %s", err, file.Home)
	}
	t.seal = name
	t.log.Info("batches are sealed with target", "target", name)
	return nil
}

// current returns the target batches go to by default (nil: none).
func (t *guiTargets) current(ctx context.Context) (*station.Target, error) {
	name, err := defaultTarget(ctx, t.be, t.SealTarget())
	if err != nil || name == "" {
		return nil, err
	}
	return t.be.store.Target(ctx, name)
}

// outboxStatus is the Outbox health tile: the units of sealed batches
// waiting to leave, and the items of pushes in progress that the target
// does not hold yet (the durable outbox). Items the target refused make
// the tile abnormal.
func outboxStatus(ctx context.Context, s cloudsync.Store) (string, error) {
	sealedUnits, pending, failed := 0, 0, 0
	var failedIn []string
	for _, st := range []station.BatchState{station.BatchSealed, station.BatchPushing, station.BatchPushed} {
		list, err := s.Batches(ctx, station.BatchFilter{State: st, Limit: 10000})
		if err != nil {
			return "", station.Errorf("outbox", station.KindOf(err), "the batches cannot be read (%v): check the Records store tile", err)
		}
		for _, b := range list {
			if st == station.BatchSealed {
				sealedUnits += b.Units
			}
			ops := []station.PushOp{station.PushEnroll}
			if st == station.BatchPushed {
				ops = []station.PushOp{station.PushEnable}
			}
			for _, op := range ops {
				c, err := s.PushCounts(ctx, b.ID, op)
				if err != nil {
					return "", station.Errorf("outbox", station.KindOf(err), "the outbox cannot be read (%v): check the Records store tile", err)
				}
				pending += c[station.PushPending] + c[station.PushSent]
				if n := c[station.PushFailed]; n > 0 {
					failed += n
					failedIn = append(failedIn, fmt.Sprint(b.ID))
				}
			}
		}
	}
	if failed > 0 {
		return "", station.Errorf("outbox", station.KindInvalid, "%d items refused by the target (batch %s): see their errors on the Batches screen, fix them and push again",
			failed, strings.Join(failedIn, ", "))
	}
	var parts []string
	if pending > 0 {
		parts = append(parts, fmt.Sprintf("%d items to push", pending))
	}
	if sealedUnits > 0 {
		parts = append(parts, fmt.Sprintf("%d units sealed", sealedUnits))
	}
	if len(parts) == 0 {
		return "empty", nil
	}
	return strings.Join(parts, ", "), nil
}

// cloudStatus is the Cloud target tile: whether the batch target (when one
// is configured) answers on its service port, else whether the production
// DPS the station points units at answers on TCP 443. Without either the
// tile says so and is normal.
func cloudStatus(ctx context.Context, target *station.Target, prod *station.DeviceConfig, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (string, error) {
	var addr, what, fix string
	switch {
	case target != nil:
		addr, what, fix = targetAddr(target), "batch target "+target.Name, "check the network, or the target in Settings under Batch targets"
	case prod != nil && prod.GlobalEndpoint != "":
		addr, what, fix = prod.GlobalEndpoint, "production DPS", "check the network or the production endpoint in Settings"
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(strings.TrimSuffix(addr, "/"), "443")
		}
	default:
		return "none configured", nil
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = errors.New("no answer in 3 s")
		}
		return "", station.Errorf("cloud target", station.KindUnavailable, "the %s at %s does not answer (%v): %s", what, addr, err, fix)
	}
	conn.Close()
	if target != nil {
		return target.Name + " reachable", nil
	}
	return "reachable", nil
}
