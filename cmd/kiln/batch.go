package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

const batchUsage = `kiln batch list|show|seal|push|enable|export|import|verify-manifest|signing-key|target ...

  list [--state S] [--json]                      the batches, newest first
  show ID [--json]                               a batch, its units' push state and refusals
  seal [ID] [--target NAME] [template flags]     close the open batch (or batch ID) to new units
  push ID [--target NAME] [--verify sample|all|none] [--group-id G --group-cert PEM|--group-key-file F] [--per-unit] [--json]
  enable ID [--json]                             second phase: enable the batch's pushed enrollments
  export ID --format bulk|csv|manifest --out FILE [--handover]
  import FILE --signer CERT.pem [--json]         a vendor (Microchip-style) manifest into the open batch
  verify-manifest FILE [--signer KEY.pem]        check a Kiln manifest's signatures
  signing-key                                    print the manifest signing key (PEM) to give customers
  target add NAME --connection-string-file F|- [--trust CA.pem] [--url URL] [--ops-per-minute N]
  target list [--json]`

func runBatch(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("say what to do:\n%s", batchUsage)
	}
	sub := map[string]func(context.Context, *env, []string) error{
		"list": batchList, "show": batchShow, "seal": batchSeal, "push": batchPush, "enable": batchEnable,
		"export": batchExport, "import": batchImport, "verify-manifest": batchVerifyManifest,
		"signing-key": batchSigningKey, "target": batchTarget,
	}[args[0]]
	if sub == nil {
		return usagef("unknown batch command %q:\n%s", args[0], batchUsage)
	}
	return sub(ctx, e, args[1:])
}

// batchEnv is what the batch commands share: the configuration, the store
// and the sealer of the data directory.
type batchEnv struct {
	c      *config
	store  *sqlite.Store
	sealer *cloudsync.Sealer
}

func openBatchEnv(ctx context.Context, e *env) (*batchEnv, error) {
	c, err := loadConfig(e)
	if err != nil {
		return nil, err
	}
	st, err := c.openStore(ctx)
	if err != nil {
		return nil, err
	}
	sl, err := cloudsync.LoadSealer(filepath.Join(c.Home, cloudsync.KeyFile))
	if err != nil {
		st.Close()
		return nil, err
	}
	return &batchEnv{c: c, store: st, sealer: sl}, nil
}

func (b *batchEnv) close() { b.store.Close() }

func (b *batchEnv) signer() (*cloudsync.Signer, error) {
	return cloudsync.LoadSigner(filepath.Join(b.c.Home, cloudsync.SigningKeyFile), b.sealer)
}

// parseMixed parses args whose positional arguments and flags come in any
// order (kiln batch push 3 --json); "--" ends the flags. The positional
// arguments are left in fs.Args().
func parseMixed(fs *flag.FlagSet, args []string) error {
	var pos []string
	for {
		if err := parse(fs, args, true); err != nil {
			return err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if len(args) > 0 && len(rest) < len(args) && args[len(args)-len(rest)-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	return fs.Parse(append([]string{"--"}, pos...))
}

func batchID(fs *flag.FlagSet) (int64, error) {
	if fs.NArg() != 1 {
		return 0, usagef("name one batch by its number (kiln batch list shows them)")
	}
	id, err := strconv.ParseInt(fs.Arg(0), 10, 64)
	if err != nil || id <= 0 {
		return 0, usagef("%q is not a batch number", fs.Arg(0))
	}
	return id, nil
}

func batchList(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch list")
	var f station.BatchFilter
	fs.Func("state", "only batches in this state: "+strings.Join(stateNames(), ", "), func(s string) error {
		if !station.BatchState(s).Valid() {
			return fmt.Errorf("%q is not one of %s", s, strings.Join(stateNames(), ", "))
		}
		f.State = station.BatchState(s)
		return nil
	})
	fs.IntVar(&f.Limit, "limit", 50, "at most this many batches, newest first")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	bs, err := be.store.Batches(ctx, f)
	if err != nil {
		return err
	}
	if *asJSON {
		if bs == nil {
			bs = []*station.Batch{}
		}
		return writeJSON(e, bs)
	}
	if len(bs) == 0 {
		fmt.Fprintln(e.stdout, "no batches")
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BATCH\tNAME\tSTATE\tUNITS\tTARGET\tCREATED")
	for _, b := range bs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\n", b.ID, b.Name, b.State, b.Units, orDash(b.TargetID), b.Created.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

func stateNames() []string {
	var s []string
	for _, x := range station.BatchStates {
		s = append(s, string(x))
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// batchDetail is the JSON of kiln batch show.
type batchDetail struct {
	*station.Batch
	Push     map[station.PushState]int `json:"push"`
	Enable   map[station.PushState]int `json:"enable"`
	Failures []station.PushItem        `json:"failures,omitempty"`
}

func batchShow(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch show")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	id, err := batchID(fs)
	if err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	b, err := be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	d := batchDetail{Batch: b}
	if d.Push, err = be.store.PushCounts(ctx, id, station.PushEnroll); err != nil {
		return err
	}
	if d.Enable, err = be.store.PushCounts(ctx, id, station.PushEnable); err != nil {
		return err
	}
	for _, op := range []station.PushOp{station.PushEnroll, station.PushEnable} {
		failed, err := be.store.PushItems(ctx, id, op, station.PushFailed)
		if err != nil {
			return err
		}
		d.Failures = append(d.Failures, failed...)
	}
	if *asJSON {
		return writeJSON(e, d)
	}
	w := e.stdout
	fmt.Fprintf(w, "batch %d  %s  %s\n", b.ID, b.Name, b.State)
	fmt.Fprintf(w, "  units      %d\n", b.Units)
	fmt.Fprintf(w, "  created    %s\n", b.Created.Local().Format(time.RFC3339))
	if !b.Sealed.IsZero() {
		fmt.Fprintf(w, "  sealed     %s\n", b.Sealed.Local().Format(time.RFC3339))
	}
	if !b.Pushed.IsZero() {
		fmt.Fprintf(w, "  %-10s %s\n", b.State, b.Pushed.Local().Format(time.RFC3339))
	}
	fmt.Fprintf(w, "  target     %s\n", orDash(b.TargetID))
	t := b.Template
	status := string(t.ProvisioningStatus)
	if status == "" {
		status = "enabled"
	}
	fmt.Fprintf(w, "  template   allocation %s, hubs %s, provisioning %s\n", orDash(t.AllocationPolicy), orDash(strings.Join(t.IoTHubs, ",")), status)
	for _, x := range []struct {
		name string
		c    map[station.PushState]int
	}{{"push", d.Push}, {"enable", d.Enable}} {
		if len(x.c) > 0 {
			fmt.Fprintf(w, "  %-10s %d done, %d failed, %d pending, %d sent (unknown until resumed)\n", x.name,
				x.c[station.PushDone], x.c[station.PushFailed], x.c[station.PushPending], x.c[station.PushSent])
		}
	}
	for i, f := range d.Failures {
		if i == 20 {
			fmt.Fprintf(w, "  … and %d more refusals (--json lists all)\n", len(d.Failures)-20)
			break
		}
		fmt.Fprintf(w, "  refused    %s %s (serial %s): %s\n", f.Op, f.Key, orDash(f.Serial), clip(f.Error, 120))
	}
	return nil
}

// templateFlags registers the enrollment template flags on fs.
func templateFlags(fs *flag.FlagSet, t *station.EnrollmentTemplate) {
	fs.StringVar(&t.AllocationPolicy, "allocation", t.AllocationPolicy, "allocation policy: hashed, geoLatency, static or custom")
	fs.Func("hub", "an IoT hub host name to allocate among (repeat for several)", func(s string) error {
		t.IoTHubs = append(t.IoTHubs, s)
		return nil
	})
	fs.Func("twin", "a JSON file holding the initial twin ({\"tags\":{},\"properties\":{\"desired\":{}}})", func(s string) error {
		b, err := os.ReadFile(s)
		t.InitialTwin = b
		return err
	})
	fs.BoolVar(&t.Capabilities.IoTEdge, "edge", t.Capabilities.IoTEdge, "the devices are IoT Edge devices")
	fs.Func("reprovision", "reprovision policy: reset, migrate or never (default: DPS's, migrate)", func(s string) error {
		switch s {
		case "reset":
			t.ReprovisionPolicy = &station.ReprovisionPolicy{UpdateHubAssignment: true}
		case "migrate":
			t.ReprovisionPolicy = &station.ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
		case "never":
			t.ReprovisionPolicy = &station.ReprovisionPolicy{}
		default:
			return fmt.Errorf("%q is not reset, migrate or never", s)
		}
		return nil
	})
	fs.Func("disabled", "push the enrollments disabled (two-phase: kiln batch enable after QA)", func(s string) error {
		on, err := strconv.ParseBool(s)
		t.ProvisioningStatus = station.ProvisioningEnabled
		if on {
			t.ProvisioningStatus = station.ProvisioningDisabled
		}
		return err
	})
	if f := fs.Lookup("disabled"); f != nil {
		f.DefValue = "false"
	}
}

func batchSeal(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch seal")
	target := fs.String("target", "", "bind the batch to this DPS target (kiln batch target list)")
	var tmpl station.EnrollmentTemplate
	templateFlags(fs, &tmpl)
	asJSON := fs.Bool("json", false, "print the sealed batch as JSON")
	if err := parseMixed(fs, fixDisabled(args)); err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	var b *station.Batch
	if fs.NArg() == 0 {
		if b, err = be.store.OpenBatch(ctx); err != nil {
			return err
		}
	} else {
		id, err := batchID(fs)
		if err != nil {
			return err
		}
		if b, err = be.store.Batch(ctx, id); err != nil {
			return err
		}
	}
	templateSet := false
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "allocation", "hub", "twin", "edge", "reprovision", "disabled":
			templateSet = true
		}
	})
	if *target == "" && templateSet {
		if b.TargetID == "" {
			return usagef("the enrollment template goes with a target: give --target NAME too")
		}
		*target = b.TargetID
	}
	if *target != "" {
		if err := be.store.SetBatchTarget(ctx, b.ID, *target, tmpl); err != nil {
			return err
		}
	}
	if b.State != station.BatchSealed {
		if err := be.store.Transition(ctx, b.ID, b.State, station.BatchSealed); err != nil {
			return err
		}
	}
	if b, err = be.store.Batch(ctx, b.ID); err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(e, b)
	}
	fmt.Fprintf(e.stdout, "batch %d (%s) sealed: %d units, target %s\n", b.ID, b.Name, b.Units, orDash(b.TargetID))
	return nil
}

// fixDisabled lets --disabled stand alone, as a boolean flag would.
func fixDisabled(args []string) []string {
	out := make([]string, 0, len(args))
	for _, a := range args {
		if a == "--disabled" || a == "-disabled" {
			a = "--disabled=true"
		}
		out = append(out, a)
	}
	return out
}

// groupFlags registers the flags of a batch's enrollment group.
type groupFlags struct {
	id, cert, keyFile string
	perUnit           bool
}

func (g *groupFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&g.id, "group-id", "", "an enrollment group of the batch's X.509 or symmetric-key units (default: the group each unit's record names, else the station's x509_group or symkey_group)")
	fs.StringVar(&g.cert, "group-cert", "", "X.509 group: the signing (CA) certificate, PEM")
	fs.StringVar(&g.keyFile, "group-key-file", "", "symmetric-key group: a file holding the group's primary key (base64)")
	fs.BoolVar(&g.perUnit, "per-unit", false, "also enroll group units individually (X.509: the unit's recorded leaf; symmetric key: the key derived from its group's)")
}

func (g *groupFlags) group() (*cloudsync.Group, error) {
	if g.id == "" {
		if g.cert != "" || g.keyFile != "" {
			return nil, usagef("--group-cert and --group-key-file need --group-id")
		}
		return nil, nil
	}
	switch {
	case g.cert != "" && g.keyFile == "":
		pemBytes, err := os.ReadFile(g.cert)
		if err != nil {
			return nil, usagef("group certificate: %v", err)
		}
		if blk, _ := pem.Decode(pemBytes); blk == nil || blk.Type != "CERTIFICATE" {
			return nil, usagef("%s holds no PEM certificate: give the CA certificate the units' leaves chain to", g.cert)
		} else if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
			return nil, usagef("%s: %v", g.cert, err)
		}
		return &cloudsync.Group{ID: g.id, Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
			X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: string(pemBytes)}}}}}, nil
	case g.keyFile != "" && g.cert == "":
		k, err := os.ReadFile(g.keyFile)
		if err != nil {
			return nil, usagef("group key: %v", err)
		}
		key := strings.TrimSpace(string(k))
		if _, err := dps.DecodeKey(key); err != nil {
			return nil, usagef("%s does not hold a base64 key", g.keyFile)
		}
		return &cloudsync.Group{ID: g.id, Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
			SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: key}}}, nil
	}
	return nil, usagef("give the group's --group-cert (X.509) or --group-key-file (symmetric key), one of them")
}

// stationGroups returns the station's own enrollment groups that units
// need and flag (the group given on the command line, may be nil) does not
// cover: the X.509 group (station.json x509_group, default kiln-x509)
// under the station CA's signing certificate (its intermediate, or a
// remote step-ca's root), and the symmetric-key group (symkey_group,
// default kiln-symkey) with the station's group key, when withKey (a push:
// the key goes to the target only; an export would write it into a file,
// which takes --group-key-file). A unit whose record names another group
// is left for the pusher to refuse by name.
func (be *batchEnv) stationGroups(ctx context.Context, e *env, units []*station.Unit, flag *cloudsync.Group, withKey bool) ([]*cloudsync.Group, error) {
	x509ID, symID := be.c.X509Group, be.c.SymKeyGroup
	if x509ID == "" {
		x509ID = defaultX509Group
	}
	if symID == "" {
		symID = defaultSymKeyGroup
	}
	var out []*cloudsync.Group
	have := func(id string) bool {
		for _, g := range out {
			if strings.EqualFold(g.ID, id) {
				return true
			}
		}
		return false
	}
	var given []*cloudsync.Group
	if flag != nil {
		given = append(given, flag)
	}
	for _, u := range units {
		if u.Method != station.MethodX509 && u.Method != station.MethodSymKey {
			continue
		}
		if _, err := cloudsync.UnitGroup(u, given); err == nil {
			continue
		}
		id := u.EnrollmentGroup
		switch {
		case u.Method == station.MethodX509 && (id == "" || strings.EqualFold(id, x509ID)):
			if have(x509ID) {
				continue
			}
			root, inters, err := caCerts(ctx, e, be.c)
			if err != nil {
				return nil, fmt.Errorf("the X.509 units of the batch register through enrollment group %s, signed by the station CA: %w", x509ID, err)
			}
			signing := root
			if len(inters) > 0 {
				signing = inters[0]
			}
			out = append(out, &cloudsync.Group{ID: x509ID, Attestation: dps.AttestationMechanism{Type: dps.AttestationX509,
				X509: &dps.X509Attestation{SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: cloudsync.CertificatePEM(signing.Raw)}}}}})
		case u.Method == station.MethodSymKey && (id == "" || strings.EqualFold(id, symID)):
			if have(symID) {
				continue
			}
			if !withKey {
				return nil, usagef("the batch's symmetric-key units register through group %s, whose key is a secret: to write it into the bulk file give --group-id %s --group-key-file FILE; csv and manifest exports name the group and each unit's key fingerprint without it", symID, symID)
			}
			g, err := openSymKeyGroup(ctx, e, be.c)
			if err != nil {
				return nil, err
			}
			out = append(out, &cloudsync.Group{ID: g.ID, Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
				SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(g.Key)}}})
		}
	}
	return out, nil
}

// pusherFor builds the pusher of batch b's target.
func (be *batchEnv) pusherFor(ctx context.Context, e *env, b *station.Batch, targetFlag string) (*cloudsync.Pusher, *station.Target, error) {
	if targetFlag != "" && targetFlag != b.TargetID {
		if err := be.store.SetBatchTarget(ctx, b.ID, targetFlag, b.Template); err != nil {
			return nil, nil, err
		}
		b.TargetID = targetFlag
	}
	if b.TargetID == "" {
		return nil, nil, usagef("batch %d has no target: give --target NAME (kiln batch target list)", b.ID)
	}
	tg, err := be.store.Target(ctx, b.TargetID)
	if err != nil {
		return nil, nil, err
	}
	svc, err := cloudsync.NewServiceClient(tg, be.sealer)
	if err != nil {
		return nil, nil, err
	}
	p := &cloudsync.Pusher{Store: be.store, Service: svc, Logger: e.logger(),
		Quota: cloudsync.Quota{Operations: tg.OpsPerMinute, Window: time.Minute}}
	return p, tg, nil
}

func batchPush(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch push")
	target := fs.String("target", "", "push to this target (and bind the batch to it)")
	verify := fs.String("verify", "sample", "read back after the push: sample, all or none")
	sample := fs.Int("sample", 20, "how many enrollments --verify sample reads back")
	workers := fs.Int("workers", 0, "requests in flight at once (default 32; the quota paces them either way)")
	var gf groupFlags
	gf.register(fs)
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	id, err := batchID(fs)
	if err != nil {
		return err
	}
	switch cloudsync.Verify(*verify) {
	case cloudsync.VerifySample, cloudsync.VerifyAll, cloudsync.VerifyNone:
	default:
		return usagef("--verify %q: use sample, all or none", *verify)
	}
	group, err := gf.group()
	if err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	b, err := be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	p, tg, err := be.pusherFor(ctx, e, b, *target)
	if err != nil {
		return err
	}
	units, err := be.store.BatchUnits(ctx, id)
	if err != nil {
		return err
	}
	own, err := be.stationGroups(ctx, e, units, group, true)
	if err != nil {
		return err
	}
	p.Verify, p.Sample, p.Workers, p.Group, p.Groups, p.PerUnit = cloudsync.Verify(*verify), *sample, *workers, group, own, gf.perUnit
	pl := newProgressLine(e, *asJSON, fmt.Sprintf("push batch %d to %s", b.ID, tg.Name))
	p.Progress = pl.update
	rep, err := p.Push(ctx, id)
	pl.end()
	return printReport(e, *asJSON, "push", rep, err)
}

func printReport(e *env, asJSON bool, what string, rep *cloudsync.Report, err error) error {
	if rep == nil {
		return err
	}
	if asJSON {
		if jerr := writeJSON(e, rep); jerr != nil {
			return jerr
		}
		if err != nil {
			fmt.Fprintf(e.stderr, "kiln batch %s: %v\n", what, err)
			return errFailed
		}
		return nil
	}
	fmt.Fprintf(e.stdout, "%s: %d of %d done, %d failed; %d requests, %d throttled, %d retried, %d read back, %d verified, in %s\n",
		what, rep.Done, rep.Total, rep.Failed, rep.Requests, rep.Throttled, rep.Retries, rep.ReadBack, rep.Verified, rep.Elapsed.Round(time.Millisecond))
	for i, f := range rep.Failures {
		if i == 10 {
			fmt.Fprintf(e.stdout, "  … and %d more (kiln batch show %d --json)\n", len(rep.Failures)-10, rep.BatchID)
			break
		}
		fmt.Fprintf(e.stdout, "  refused %s (serial %s): %s\n", f.Key, orDash(f.Serial), clip(f.Error, 120))
	}
	return err
}

func batchEnable(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch enable")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	id, err := batchID(fs)
	if err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	b, err := be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	p, tg, err := be.pusherFor(ctx, e, b, "")
	if err != nil {
		return err
	}
	pl := newProgressLine(e, *asJSON, fmt.Sprintf("enable batch %d on %s", b.ID, tg.Name))
	p.Progress = pl.update
	rep, err := p.Enable(ctx, id)
	pl.end()
	return printReport(e, *asJSON, "enable", rep, err)
}

func batchExport(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch export")
	format := fs.String("format", "", "bulk (DPS bulk-operation JSON), csv, or manifest (signed, one JWS per unit)")
	out := fs.String("out", "", "the file to write (- for standard output)")
	handover := fs.Bool("handover", false, "mark the sealed batch exported: handed over as files instead of pushed")
	var gf groupFlags
	gf.register(fs)
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	id, err := batchID(fs)
	if err != nil {
		return err
	}
	if *out == "" {
		return usagef("give --out FILE (or - for standard output)")
	}
	group, err := gf.group()
	if err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	b, err := be.store.Batch(ctx, id)
	if err != nil {
		return err
	}
	if b.State == station.BatchOpen {
		return station.Errorf("export batch", station.KindConflict, "batch %d is open: seal it first (kiln batch seal %d), so that no unit joins after the export", b.ID, b.ID)
	}
	units, err := be.store.BatchUnits(ctx, id)
	if err != nil {
		return err
	}
	w, commit, err := outFile(e, *out)
	if err != nil {
		return err
	}
	pl := newProgressLine(e, *out == "-", fmt.Sprintf("export batch %d as %s", b.ID, *format))
	step := func(done int) { pl.update(cloudsync.Progress{Phase: "export", Done: done, Total: len(units)}) }
	switch *format {
	case "bulk":
		var f *cloudsync.BulkFile
		var groups []*cloudsync.Group
		if groups, err = be.stationGroups(ctx, e, units, group, false); err == nil {
			if group != nil {
				groups = append([]*cloudsync.Group{group}, groups...)
			}
			f, err = cloudsync.BulkExportGroups(b, units, groups, gf.perUnit)
		}
		if err == nil {
			err = cloudsync.WriteBulkJSON(w, f)
			step(len(units))
		}
	case "csv":
		err = cloudsync.WriteCSV(w, b, units, step)
	case "manifest":
		var s *cloudsync.Signer
		if s, err = be.signer(); err == nil {
			var m *cloudsync.Manifest
			if m, err = cloudsync.SignManifest(b, units, s, time.Now(), step); err == nil {
				err = cloudsync.WriteManifest(w, m)
			}
		}
	default:
		err = usagef("--format %q: use bulk, csv or manifest", *format)
	}
	pl.end()
	if err = commit(err); err != nil {
		return err
	}
	if *handover && b.State == station.BatchSealed {
		if err := be.store.Transition(ctx, b.ID, station.BatchSealed, station.BatchExported); err != nil {
			return err
		}
	}
	if *out != "-" {
		fmt.Fprintf(e.stdout, "batch %d: %d units written to %s (%s)\n", b.ID, len(units), *out, *format)
	}
	return nil
}

// outFile opens path for writing through a temporary file that commit
// renames over it when err is nil ("-": standard output).
func outFile(e *env, path string) (io.Writer, func(error) error, error) {
	if path == "-" {
		return e.stdout, func(err error) error { return err }, nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return nil, nil, fmt.Errorf("write %s: %w", path, err)
	}
	return f, func(err error) error {
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(f.Name(), path)
		}
		if err != nil {
			os.Remove(f.Name())
		}
		return err
	}, nil
}

func batchVerifyManifest(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch verify-manifest")
	signerPath := fs.String("signer", "", "the signer's public key or certificate (PEM); default: this station's signing key")
	asJSON := fs.Bool("json", false, "print the verified entries as JSON")
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("name one manifest file")
	}
	raw, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	var pemBytes []byte
	if *signerPath != "" {
		if pemBytes, err = os.ReadFile(*signerPath); err != nil {
			return err
		}
	} else {
		be, err := openBatchEnv(ctx, e)
		if err != nil {
			return err
		}
		s, err := be.signer()
		be.close()
		if err != nil {
			return err
		}
		pemBytes = s.PublicKeyPEM()
	}
	pub, err := cloudsync.ParsePublicKeyPEM(pemBytes)
	if err != nil {
		return err
	}
	m, err := cloudsync.DecodeManifest(raw)
	if err != nil {
		return err
	}
	claims, err := cloudsync.VerifyManifest(m, pub)
	if err != nil {
		fmt.Fprintf(e.stderr, "kiln batch verify-manifest: %s does NOT verify: %v\n", fs.Arg(0), err)
		return errFailed
	}
	if *asJSON {
		return writeJSON(e, claims)
	}
	fmt.Fprintf(e.stdout, "%s verifies: %d units of batch %d (%s), signed by %s\n", fs.Arg(0), len(claims), m.BatchID, m.Batch, m.KeyID)
	return nil
}

func batchSigningKey(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch signing-key")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	s, err := be.signer()
	if err != nil {
		return err
	}
	_, err = e.stdout.Write(s.PublicKeyPEM())
	return err
}

func batchImport(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch import")
	signerPath := fs.String("signer", "", "the vendor's manifest signer certificate (PEM), or the root it chains to")
	operator := fs.String("operator", e.getenv("USER"), "operator name written on the imported units")
	asJSON := fs.Bool("json", false, "print the imported parts as JSON")
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("name one vendor manifest file")
	}
	if *signerPath == "" {
		return usagef("give --signer CERT.pem: the certificate the vendor's manifest is verified against")
	}
	pemBytes, err := os.ReadFile(*signerPath)
	if err != nil {
		return err
	}
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return usagef("%s holds no PEM certificate", *signerPath)
	}
	signer, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return usagef("%s: %v", *signerPath, err)
	}
	raw, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	entries, err := cloudsync.DecodeVendorManifest(raw)
	if err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	pl := newProgressLine(e, *asJSON, "import "+filepath.Base(fs.Arg(0)))
	b, parts, err := cloudsync.Import(ctx, be.store, entries, signer, be.c.Station, *operator, time.Now(),
		func(done int) { pl.update(cloudsync.Progress{Phase: "import", Done: done, Total: len(entries)}) })
	pl.end()
	if err != nil {
		return err
	}
	if *asJSON {
		type part struct {
			UniqueID       string `json:"uniqueId"`
			RegistrationID string `json:"registrationId"`
			Model          string `json:"model"`
			BatchID        int64  `json:"batchId"`
		}
		out := make([]part, 0, len(parts))
		for _, p := range parts {
			out = append(out, part{p.UniqueID, p.RegistrationID, p.Model, b.ID})
		}
		return writeJSON(e, out)
	}
	fmt.Fprintf(e.stdout, "%d parts verified and imported into batch %d (%s)\n", len(parts), b.ID, b.Name)
	return nil
}

func batchTarget(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("say add or list: kiln batch target add NAME --connection-string-file F, kiln batch target list")
	}
	switch args[0] {
	case "add":
		return targetAdd(ctx, e, args[1:])
	case "list":
		return targetList(ctx, e, args[1:])
	}
	return usagef("unknown target command %q: use add or list", args[0])
}

func targetAdd(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch target add")
	connFile := fs.String("connection-string-file", "", "a file holding the DPS service connection string (- for standard input); or set KILN_DPS_CONNECTION_STRING")
	trust := fs.String("trust", "", "the CA certificate (PEM) of the service's TLS certificate, for a devserver")
	url := fs.String("url", "", "the service's URL when it is not https://{HostName} (a devserver on a port)")
	ops := fs.Int("ops-per-minute", station.DefaultOpsPerMinute, "the service's operations quota per minute")
	if err := parseMixed(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("name the target: kiln batch target add NAME --connection-string-file F")
	}
	// The connection string holds a key: never on the command line, where
	// other users' ps would see it.
	conn := e.getenv("KILN_DPS_CONNECTION_STRING")
	switch *connFile {
	case "":
	case "-":
		b, err := io.ReadAll(io.LimitReader(os.Stdin, 4096))
		if err != nil {
			return err
		}
		conn = string(b)
	default:
		b, err := os.ReadFile(*connFile)
		if err != nil {
			return usagef("connection string: %v", err)
		}
		conn = string(b)
	}
	conn = strings.TrimSpace(conn)
	if conn == "" {
		return usagef("give the service connection string in a file (--connection-string-file) or in KILN_DPS_CONNECTION_STRING")
	}
	t := &station.Target{Name: fs.Arg(0), BaseURL: *url, OpsPerMinute: *ops}
	if *trust != "" {
		b, err := os.ReadFile(*trust)
		if err != nil {
			return usagef("trust: %v", err)
		}
		t.TrustPEM = b
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	if err := be.sealer.SealTarget(t, conn); err != nil {
		return err
	}
	if _, err := cloudsync.NewServiceClient(t, be.sealer); err != nil {
		return err
	}
	if err := be.store.PutTarget(ctx, t); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "target %s saved: %s, %d operations per minute (connection string sealed)\n", t.Name, t.HostName, t.OpsPerMinute)
	return nil
}

func targetList(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "batch target list")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	be, err := openBatchEnv(ctx, e)
	if err != nil {
		return err
	}
	defer be.close()
	ts, err := be.store.Targets(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		if ts == nil {
			ts = []*station.Target{}
		}
		return writeJSON(e, ts)
	}
	if len(ts) == 0 {
		fmt.Fprintln(e.stdout, "no targets: add one with kiln batch target add")
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tHOST\tURL\tOPS/MIN")
	for _, t := range ts {
		ops := t.OpsPerMinute
		if ops == 0 {
			ops = station.DefaultOpsPerMinute
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", t.Name, t.HostName, orDash(t.BaseURL), ops)
	}
	return tw.Flush()
}

// progressLine prints the progress of a long command: rewritten in place
// on a terminal, a plain line every few seconds otherwise; on standard
// error when standard output carries JSON.
type progressLine struct {
	w     io.Writer
	tty   bool
	label string
	start time.Time
	last  time.Time
	text  string
}

func newProgressLine(e *env, toStderr bool, label string) *progressLine {
	w := e.stdout
	if toStderr {
		w = e.stderr
	}
	tty := false
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progressLine{w: w, tty: tty, label: label, start: time.Now()}
}

func (p *progressLine) update(pr cloudsync.Progress) {
	now := time.Now()
	el := now.Sub(p.start)
	p.text = formatProgress(p.label, pr, el)
	every := 2 * time.Second
	if p.tty {
		every = 200 * time.Millisecond
	}
	if now.Sub(p.last) < every && pr.Done < pr.Total {
		return
	}
	p.last = now
	p.print()
}

func (p *progressLine) print() {
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", p.text)
	} else {
		fmt.Fprintln(p.w, p.text)
	}
}

func (p *progressLine) end() {
	if p.tty && p.text != "" {
		fmt.Fprintln(p.w)
	}
}

// formatProgress is one progress line: done/total, rate and ETA.
func formatProgress(label string, pr cloudsync.Progress, el time.Duration) string {
	s := fmt.Sprintf("%s: %s %d/%d", label, pr.Phase, pr.Done, pr.Total)
	if pr.Total > 0 {
		s += fmt.Sprintf(" (%d%%)", pr.Done*100/pr.Total)
	}
	if el > 0 && pr.Done > 0 {
		rate := float64(pr.Done) / el.Seconds()
		s += fmt.Sprintf(", %.1f/s", rate)
		if left := pr.Total - pr.Done; left > 0 {
			s += ", ETA " + time.Duration(float64(left)/rate*float64(time.Second)).Round(time.Second).String()
		}
	}
	if pr.Failed > 0 {
		s += fmt.Sprintf(", %d failed", pr.Failed)
	}
	return s
}
