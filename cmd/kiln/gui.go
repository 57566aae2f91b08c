package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/app"
	"go.bug.st/serial/enumerator"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
	"github.com/kilnworks/kiln/ui"
)

// runGUI opens the station window: the provisioner of the data directory
// with the end-to-end check against the embedded DPS, and, with no port
// given, one simulated DUT on the first slot.
func runGUI(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "gui")
	port := fs.String("port", "", "serial ports of the DUT slots, comma-separated: one slot each (default with --simulate: the simulated DUT's pty)")
	simulate := fs.Bool("simulate", true, "attach one simulated DUT (default true when no --port is given)")
	operator := fs.String("operator", e.getenv("USER"), "operator name preset in the login field")
	setPassword := fs.Bool("set-supervisor-password", false, "read a new supervisor password from standard input, store its scrypt hash in the data directory, and exit")
	var variants []ui.Variant
	fs.Func("variant", "a product variant as PREFIX=MODEL: serials starting with PREFIX are MODEL (repeatable; when given, other serials are refused)", func(v string) error {
		prefix, model, ok := strings.Cut(v, "=")
		if !ok || prefix == "" || model == "" {
			return fmt.Errorf("--variant %q is not PREFIX=MODEL, e.g. GW2-=Gateway GW-200", v)
		}
		variants = append(variants, ui.Variant{Prefix: prefix, Model: model})
		return nil
	})
	fs.IntVar(&c.Baud, "baud", c.Baud, "line rate of the serial port (8N1)")
	c.profileFlags(fs)
	if err := parse(fs, args, false); err != nil {
		return err
	}
	authPath := filepath.Join(c.Home, supervisorFile)
	if *setPassword {
		pw, err := readNewPassword(os.Stdin, e.stderr)
		if err != nil {
			return err
		}
		if err := setSupervisorPassword(authPath, pw, 0); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "supervisor password set (scrypt hash in %s)\n", authPath)
		return nil
	}
	var ports []string
	for _, p := range strings.Split(*port, ",") {
		if p = strings.TrimSpace(p); p != "" {
			ports = append(ports, p)
		}
	}
	if e.getenv("DISPLAY") == "" && e.getenv("WAYLAND_DISPLAY") == "" {
		return fmt.Errorf("no display: the station GUI needs an X or Wayland session (DISPLAY is not set); on a machine without one, run make demo or kiln provision")
	}
	simSet := false
	fs.Visit(func(f *flag.Flag) { simSet = simSet || f.Name == "simulate" })
	if *port != "" && !simSet {
		*simulate = false
	}

	var sim *guiSim
	if *simulate {
		if sim, err = newGUISim(ctx, c); err != nil {
			return fmt.Errorf("start the simulated DUT: %w", err)
		}
		defer sim.Close()
		// The station trusts the simulated TPM maker, so the EK certificate
		// is required, as in the demo.
		c.EKRoots, c.EKCertPolicy = sim.roots, station.EKCertRequire
	}
	verify := c.Verify
	noCheck := *c
	noCheck.Verify = "off"
	p, closeStore, err := newProvisioner(ctx, e, &noCheck)
	if err != nil {
		return err
	}
	defer closeStore()
	if sim != nil {
		// A new simulated DUT brings a new maker root: read the folder at
		// each validation.
		p.Verifier = rootsDir(c.EKRoots)
	}
	var dpsd *embeddedDPS
	if verify == "embedded" {
		x, d, stop, err := startEndToEnd(ctx, e, c)
		if err != nil {
			return fmt.Errorf("start the embedded DPS for the end-to-end check: %w", err)
		}
		defer stop()
		p.EndToEnd, dpsd = x, d
	}

	live := &liveProvisioner{p: *p}
	settings := newGUISettings(e, c, live, p.EndToEnd)
	defer settings.Close()
	log := e.logger().With("component", "gui")
	store, ok := p.Batches.(*sqlite.Store)
	if !ok {
		return fmt.Errorf("the station's batch store is not the data directory's SQLite store: batches cannot be pushed from the GUI")
	}
	batches, targets, err := newGUIBatches(e, c, store, log)
	if err != nil {
		return err
	}
	// Batches of X.509 and symmetric-key units enroll through the groups
	// the provisioner has open (Settings may open them later).
	batches.groups = func() (*station.SymKeyGroup, []byte) {
		cur := live.current()
		var signing []byte
		if s, ok := cur.Issuer.(interface{ SigningCertificate() []byte }); ok {
			signing = s.SigningCertificate()
		}
		return cur.SymKey, signing
	}
	if sim != nil && len(variants) > 0 {
		variants = append(variants, ui.Variant{Prefix: "SIM-", Model: "Simulated DUT"})
	}
	cfg := ui.Config{
		Batches:       batches,
		Targets:       targets,
		ExportDir:     filepath.Join(c.Home, "exports"),
		Auth:          &guiAuth{path: authPath, log: log},
		Variants:      variants,
		Provisioner:   live,
		Settings:      settings,
		Records:       p.Store,
		Station:       c.Station,
		SerialPattern: p.SerialPattern,
		Operator:      *operator,
		HealthEvery:   5 * time.Second,
		Alert:         func() { fmt.Fprint(e.stderr, "\a") },
		Save:          func(name string, data []byte) (string, error) { return saveExport(c, name, data) },
		ListPorts:     listPorts,
		ShiftStart:    shiftStart(time.Now()),
		// Wait for the unit to be unplugged before the next scan: a USB
		// serial port disappears with its unit; the simulated DUT's pty does
		// not, so the operator confirms.
		Unplug: func(int) *ui.Unplug {
			if sim != nil {
				return &ui.Unplug{}
			}
			return &ui.Unplug{Present: portPresent}
		},
	}
	slotPorts := func() []string { return ports }
	if sim != nil {
		cfg.Simulator = sim
		slotPorts = func() []string { p, _ := sim.DUT(); return []string{p} }
	} else {
		cfg.Ports = ports
		if len(ports) == 0 {
			cfg.Ports = []string{""}
		}
	}
	var dialer net.Dialer
	cfg.Health = []ui.HealthCheck{
		{Name: "DUT link", Check: func(context.Context) error {
			ps := slotPorts()
			if len(ps) == 0 {
				return checkPort("")
			}
			for _, p := range ps {
				if err := checkPort(p); err != nil {
					return err
				}
			}
			return nil
		}},
		{Name: "TPM / CA", Check: func(context.Context) error {
			pr := settings.Profile()
			return checkRoots(pr.EKCertPolicy, pr.EKRoots)
		}},
		{Name: "Embedded DPS", Check: func(ctx context.Context) error { return checkDPS(ctx, dpsd, verify) }},
		{Name: "Records store", Check: func(ctx context.Context) error {
			_, err := p.Store.Runs(ctx, station.RunFilter{Limit: 1})
			return err
		}},
		{Name: "Cloud target", Status: func(ctx context.Context) (string, error) {
			tg, err := targets.current(ctx)
			if err != nil {
				return "", err
			}
			return cloudStatus(ctx, tg, settings.production(), dialer.DialContext)
		}},
		{Name: "Outbox", Status: func(ctx context.Context) (string, error) { return outboxStatus(ctx, store) }},
	}
	if dpsd != nil {
		cfg.Devserver = &devserverView{d: dpsd, store: p.Store}
	}

	a := app.NewWithID("io.kilnworks.kiln")
	a.Settings().SetTheme(ui.Theme())
	u, err := ui.New(cfg)
	if err != nil {
		return err
	}
	defer u.Close()
	live.update(func(p *station.Provisioner) { p.OnStep = u.Step })
	w := a.NewWindow("Kiln — station " + c.Station)
	w.SetMainMenu(u.MainMenu())
	w.SetContent(u.Content())
	u.FocusScan()
	w.Resize(fyne.NewSize(1280, 800))
	go func() {
		<-ctx.Done()
		fyne.Do(a.Quit)
	}()
	w.ShowAndRun()
	return nil
}

// guiSim is the GUI's simulated DUT, which the operator can replace with a
// fresh one (the in-process TPM simulator allows one DUT per process).
type guiSim struct {
	c     *config
	roots string
	mu    sync.Mutex
	d     *simDUT
}

var _ ui.Simulator = (*guiSim)(nil)

func newGUISim(ctx context.Context, c *config) (*guiSim, error) {
	g := &guiSim{c: c}
	if _, _, err := g.Replace(ctx); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *guiSim) DUT() (string, string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.d == nil {
		return "", ""
	}
	return g.d.dut.Path(), g.d.serial
}

// Replace closes the current simulated DUT and starts a new one. The DUT
// outlives ctx: it runs until the next Replace or Close.
func (g *guiSim) Replace(ctx context.Context) (string, string, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.d != nil {
		g.d.Close()
		g.d = nil
	}
	d, err := startSimDUT(context.WithoutCancel(ctx), g.c, simOptions{tpm: "sim", lineRate: 115200}, "SIM-"+randomHex(3))
	if err != nil {
		return "", "", err
	}
	g.d, g.roots = d, d.roots
	return d.dut.Path(), d.serial, nil
}

func (g *guiSim) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.d != nil {
		g.d.Close()
		g.d = nil
	}
}

// rootsDir validates EK certificates against the roots in a folder, read
// at each validation.
type rootsDir string

func (r rootsDir) VerifyEKCert(ctx context.Context, e *station.Endorsement) error {
	roots, err := hsm.LoadRoots(string(r))
	if err != nil {
		return err
	}
	return roots.VerifyEKCert(ctx, e)
}

// devserverView feeds the Devserver screen.
type devserverView struct {
	d     *embeddedDPS
	store station.Store
}

func (v *devserverView) Status(ctx context.Context) (ui.DevserverStatus, error) {
	st := ui.DevserverStatus{
		GlobalEndpoint:   v.d.dps.Endpoint(),
		ServiceEndpoint:  "https://" + v.d.dps.Addr(),
		IDScope:          v.d.dps.IDScope(),
		ConnectionString: v.d.dps.ServiceConnectionString(),
		Hub:              v.d.hub.Addr(),
		TrustBundle:      v.d.caPath,
	}
	runs, err := v.store.Runs(ctx, station.RunFilter{Result: station.ResultPass, Limit: 100})
	if err != nil {
		return st, err
	}
	seen := map[string]bool{}
	for _, r := range runs {
		if r.DeviceID == "" || seen[r.DeviceID] {
			continue
		}
		seen[r.DeviceID] = true
		for _, t := range v.d.hub.Telemetry(r.DeviceID) {
			st.Telemetry++
			if t.Received.After(st.LastTelemetry) {
				st.LastTelemetry = t.Received
			}
		}
	}
	return st, nil
}

// shiftStart is the start of the shift at t: shifts start at 06:00, 14:00
// and 22:00 local time.
func shiftStart(t time.Time) time.Time {
	day := time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, t.Location())
	for _, h := range []int{22, 14, 6} {
		if s := day.Add(time.Duration(h) * time.Hour); !t.Before(s) {
			return s
		}
	}
	return day.Add(-2 * time.Hour) // before 06:00: the night shift of the day before
}

// portPresent reports whether a serial port's device node exists.
func portPresent(port string) bool {
	_, err := os.Stat(port)
	return err == nil
}

func checkPort(port string) error {
	if port == "" {
		return station.Errorf("DUT link", station.KindNotFound, "no serial port picked: pick the DUT's port on the slot")
	}
	if _, err := os.Stat(port); err != nil {
		return station.Errorf("DUT link", station.KindUnavailable, "no serial port at %s: plug the DUT's cable in, or pick its port", port)
	}
	return nil
}

func checkRoots(policy station.EKCertPolicy, roots string) error {
	if policy == station.EKCertOff {
		return nil
	}
	if _, err := hsm.LoadRoots(roots); err != nil {
		return station.Errorf("TPM / CA", station.KindNotFound, "the TPM makers' roots in %s cannot be read (%v): put their PEM certificates there", roots, err)
	}
	return nil
}

// liveProvisioner is the GUI's provisioner: the Settings screen changes its
// profile between runs, and each run uses the provisioner as it was at the
// run's start.
type liveProvisioner struct {
	mu sync.Mutex
	p  station.Provisioner
}

var _ ui.Provisioner = (*liveProvisioner)(nil)

func (l *liveProvisioner) current() *station.Provisioner {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.p
	return &p
}

func (l *liveProvisioner) update(f func(p *station.Provisioner)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f(&l.p)
}

func (l *liveProvisioner) Provision(ctx context.Context, req station.Request) (*station.Run, error) {
	return l.current().Provision(ctx, req)
}

func (l *liveProvisioner) Steps() []string { return l.current().Steps() }

// guiSettings is the Settings screen's hook: it validates a profile, saves
// the fields the supervisor changed to station.json and applies the profile
// to the live provisioner for the next run.
type guiSettings struct {
	e    *env
	live *liveProvisioner
	x    *station.EndToEnd // the embedded check; nil when it was not started
	mu   sync.Mutex        // serializes Apply; guards cur
	cur  ui.Profile
	prod *station.DeviceConfig
	// issuer and symKey are opened when a method first needs them and
	// kept for the session.
	issuer  station.Issuer
	symKey  *station.SymKeyGroup
	closers []func()
}

// Close releases what the settings opened (the station CA).
func (g *guiSettings) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, c := range g.closers {
		c()
	}
	g.closers = nil
}

var _ ui.Settings = (*guiSettings)(nil)

func newGUISettings(e *env, c *config, live *liveProvisioner, x *station.EndToEnd) *guiSettings {
	g := &guiSettings{e: e, live: live, x: x, prod: c.Production, cur: ui.Profile{
		Method: c.Method, EKCertPolicy: c.EKCertPolicy, RegID: c.RegID, SerialPattern: c.SerialPattern,
		EKRoots: c.EKRoots, Verify: c.Verify,
	}}
	if c.Verify == "embedded" && x == nil {
		g.cur.Verify = "off"
	}
	if c.Production != nil {
		g.cur.ProductionIDScope, g.cur.ProductionEndpoint = c.Production.IDScope, c.Production.GlobalEndpoint
	}
	return g
}

// production returns the production DPS in force (nil: none).
func (g *guiSettings) production() *station.DeviceConfig {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.prod
}

func (g *guiSettings) Profile() ui.Profile {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.cur
}

func (g *guiSettings) Apply(ctx context.Context, pr ui.Profile) error {
	const op = "settings"
	switch pr.Method {
	case station.MethodTPM, station.MethodX509, station.MethodSymKey:
	default:
		return station.Errorf(op, station.KindInvalid, "method %q is not tpm, x509 or symkey", pr.Method)
	}
	switch pr.EKCertPolicy {
	case station.EKCertRequire, station.EKCertWarn, station.EKCertOff:
	default:
		return station.Errorf(op, station.KindInvalid, "EK certificate policy %q is not require, warn or off", pr.EKCertPolicy)
	}
	switch pr.RegID {
	case station.RegIDFromEK, station.RegIDFromSerial:
	default:
		return station.Errorf(op, station.KindInvalid, "registration ID rule %q is not ek or serial", pr.RegID)
	}
	var re *regexp.Regexp
	if pr.SerialPattern != "" {
		var err error
		if re, err = regexp.Compile(pr.SerialPattern); err != nil {
			return station.Errorf(op, station.KindInvalid, "the serial pattern %q is not a valid regular expression (%v)", pr.SerialPattern, err)
		}
	}
	if pr.Method == station.MethodTPM && pr.EKCertPolicy != station.EKCertOff {
		if _, err := hsm.LoadRoots(pr.EKRoots); err != nil {
			return station.Errorf(op, station.KindInvalid, "the EK roots folder %s cannot be read (%v): put the TPM makers' PEM certificates there, or set the EK certificate policy to off", pr.EKRoots, err)
		}
	}
	switch {
	case pr.Verify != "embedded" && pr.Verify != "off":
		return station.Errorf(op, station.KindInvalid, "verification %q is not embedded or off", pr.Verify)
	case pr.Verify == "embedded" && g.x == nil:
		return station.Errorf(op, station.KindInvalid, "the embedded DPS was not started with this station: restart kiln gui with --verify embedded")
	case (pr.ProductionIDScope == "") != (pr.ProductionEndpoint == ""):
		return station.Errorf(op, station.KindInvalid, "give both the production ID scope and the production endpoint, or neither")
	}

	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.openMethod(ctx, pr.Method); err != nil {
		return err
	}
	var prod *station.DeviceConfig
	if pr.ProductionIDScope != "" {
		prod = &station.DeviceConfig{IDScope: pr.ProductionIDScope, GlobalEndpoint: pr.ProductionEndpoint}
		if g.prod != nil {
			prod.TrustBundle = g.prod.TrustBundle
		}
	}

	// Save what the supervisor changed over the file as it is: flags and
	// simulation mode override the file for this session only.
	file, err := loadConfig(g.e)
	if err != nil {
		return err
	}
	old := g.cur
	if pr.Method != old.Method {
		file.Method = pr.Method
	}
	if pr.EKCertPolicy != old.EKCertPolicy {
		file.EKCertPolicy = pr.EKCertPolicy
	}
	if pr.RegID != old.RegID {
		file.RegID = pr.RegID
	}
	if pr.SerialPattern != old.SerialPattern {
		file.SerialPattern = pr.SerialPattern
	}
	if pr.EKRoots != old.EKRoots {
		file.EKRoots = pr.EKRoots
	}
	if pr.Verify != old.Verify {
		file.Verify = pr.Verify
	}
	if pr.ProductionIDScope != old.ProductionIDScope || pr.ProductionEndpoint != old.ProductionEndpoint {
		file.Production = prod
	}
	if err := file.save(); err != nil {
		return station.Errorf(op, station.KindInternal, "%v: check the data directory %s", err, file.Home)
	}

	g.live.update(func(p *station.Provisioner) {
		p.Profile.Method, p.Profile.EKCertPolicy, p.Profile.RegID = pr.Method, pr.EKCertPolicy, pr.RegID
		if g.issuer != nil {
			p.Issuer = g.issuer
		}
		if g.symKey != nil {
			p.SymKey = g.symKey
		}
		p.SerialPattern = re
		if pr.EKRoots != old.EKRoots {
			p.Verifier = rootsDir(pr.EKRoots)
		}
		p.EndToEnd = nil
		if pr.Verify == "embedded" {
			x := *g.x
			x.Production = prod
			p.EndToEnd = &x
		}
	})
	g.cur, g.prod = pr, prod
	return nil
}

func checkDPS(ctx context.Context, d *embeddedDPS, verify string) error {
	if d == nil {
		if verify == "off" {
			return nil // the end-to-end check is off by configuration
		}
		return station.Errorf("embedded DPS", station.KindUnavailable, "the embedded DPS is not running: restart kiln gui")
	}
	var dialer net.Dialer
	for _, addr := range []string{d.dps.Addr(), d.hub.Addr()} {
		conn, err := dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			return station.Errorf("embedded DPS", station.KindUnavailable, "the embedded DPS does not answer on %s: restart kiln gui", addr)
		}
		conn.Close()
	}
	return nil
}

// listPorts lists the USB serial ports with their VID, PID and serial.
func listPorts() ([]ui.Port, error) {
	ports, err := enumerator.GetDetailedPortsList()
	if err != nil {
		return nil, err
	}
	return portChoices(ports), nil
}

// portChoices describes serial ports for the port picker: a USB port with
// its VID, PID and serial number.
func portChoices(ports []*enumerator.PortDetails) []ui.Port {
	var out []ui.Port
	for _, p := range ports {
		desc := ""
		if p.IsUSB {
			desc = fmt.Sprintf("USB %s:%s", p.VID, p.PID)
			if p.SerialNumber != "" {
				desc += " SN " + p.SerialNumber
			}
		}
		out = append(out, ui.Port{Path: p.Name, Description: desc})
	}
	return out
}

// saveExport writes an export into the data directory's exports folder.
func saveExport(c *config, name string, data []byte) (string, error) {
	dir := filepath.Join(c.Home, "exports")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	path := filepath.Join(dir, filepath.Base(name))
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return "", err
	}
	return path, nil
}

// openMethod opens what method m needs that the running provisioner may
// lack: the station CA for x509, the group key for symkey. Called with
// g.mu held.
func (g *guiSettings) openMethod(ctx context.Context, m station.Method) error {
	c, err := loadConfig(g.e)
	if err != nil {
		return err
	}
	switch {
	case m == station.MethodX509 && g.issuer == nil && g.live.current().Issuer == nil:
		iss, closeFn, err := openIssuer(ctx, g.e, c)
		if err != nil {
			return station.E("settings", station.KindOf(err), fmt.Errorf("the X.509 method needs the station CA: %w", err))
		}
		g.issuer = iss
		g.closers = append(g.closers, closeFn)
	case m == station.MethodSymKey && g.symKey == nil && g.live.current().SymKey == nil:
		k, err := openSymKeyGroup(ctx, g.e, c)
		if err != nil {
			return station.E("settings", station.KindOf(err), fmt.Errorf("the symmetric-key method needs the group key: %w", err))
		}
		g.symKey = k
	}
	return nil
}
