package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

func runProvision(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "provision")
	var ports portList
	fs.Var(&ports, "port", "serial port of the DUT (e.g. /dev/ttyACM0 or a pty path from kiln simulate); repeat it, or give a comma-separated list, to provision several DUTs at once, one slot each")
	serial := fs.String("serial", "", "the unit's scanned serial number (default: the one the DUT reports)")
	operator := fs.String("operator", e.getenv("USER"), "operator name written on the record")
	asJSON := fs.Bool("json", false, "print the record as JSON instead of text")
	fs.IntVar(&c.Baud, "baud", c.Baud, "line rate of the serial port (8N1)")
	c.profileFlags(fs)
	if err := parse(fs, args, false); err != nil {
		return err
	}
	if len(ports) == 0 {
		return usagef("--port is required: the serial port the DUT is plugged into")
	}
	if len(ports) > 1 {
		if *serial != "" {
			return usagef("--serial names one unit: give a single --port with it")
		}
		return provisionSlots(ctx, e, c, ports, *operator, *asJSON)
	}
	port := &ports[0]
	p, closeFn, err := newProvisioner(ctx, e, c)
	if err != nil {
		return err
	}
	defer closeFn()
	var out io.Writer = e.stdout
	if *asJSON {
		out = io.Discard
	} else {
		fmt.Fprintf(out, "provisioning the DUT on %s (station %s, operator %s, method %s)\n", *port, c.Station, *operator, c.Method)
		p.OnStep = func(ev station.StepEvent) {
			if ev.Done {
				printStep(out, ev.Step)
			}
		}
	}
	r, err := p.Provision(ctx, station.Request{Port: *port, Serial: *serial, Operator: *operator})
	if r == nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(runJSON(r)); jerr != nil {
			return jerr
		}
	} else {
		printVerdict(out, r)
	}
	if err != nil {
		return errFailed
	}
	return nil
}

// newProvisioner wires the provisioner of a data directory for its method.
func newProvisioner(ctx context.Context, e *env, c *config) (*station.Provisioner, func(), error) {
	pattern, err := c.serialPattern()
	if err != nil {
		return nil, nil, err
	}
	verifier, err := c.verifier()
	if err != nil {
		return nil, nil, err
	}
	store, err := c.openStore(ctx)
	if err != nil {
		return nil, nil, err
	}
	closeAll := func() { store.Close() }
	var x *station.EndToEnd
	if c.Verify == "embedded" {
		var stop func()
		x, _, stop, err = startEndToEnd(ctx, e, c)
		if err != nil {
			store.Close()
			return nil, nil, fmt.Errorf("start the embedded DPS for the end-to-end check: %w", err)
		}
		closeAll = func() { stop(); store.Close() }
	}
	log := e.logger()
	var issuer station.Issuer
	var symKey *station.SymKeyGroup
	switch c.Method {
	case station.MethodX509:
		var closeCA func()
		if issuer, closeCA, err = openIssuer(ctx, e, c); err != nil {
			closeAll()
			return nil, nil, err
		}
		prev := closeAll
		closeAll = func() { closeCA(); prev() }
	case station.MethodSymKey:
		if symKey, err = openSymKeyGroup(ctx, e, c); err != nil {
			closeAll()
			return nil, nil, err
		}
	}
	if x != nil {
		x.X509Group = c.X509Group
	}
	p := &station.Provisioner{
		Store: store,
		Dial: func(ctx context.Context, port string) (station.Link, error) {
			return link.Open(ctx, port, link.Config{BaudRate: c.Baud, Logger: log})
		},
		Endorser:      hsm.Endorser{},
		Verifier:      verifier,
		Profile:       c.profile(),
		SerialPattern: pattern,
		Logger:        log,
		EndToEnd:      x,
		Batches:       store,
		Issuer:        issuer,
		SymKey:        symKey,
	}
	return p, closeAll, nil
}

func printStep(w io.Writer, s station.Step) {
	line := fmt.Sprintf("  %-18s %-4s %8s", s.Name, s.Status, ms(s.Duration))
	if s.Detail != "" {
		line += "  " + s.Detail
	}
	fmt.Fprintln(w, line)
	if s.Error != "" {
		fmt.Fprintf(w, "  %-18s      %8s  %s\n", "", "", s.Error)
	}
}

func printVerdict(w io.Writer, r *station.Run) {
	if r.Result == station.ResultPass {
		fmt.Fprintf(w, "PASS  %s  run %d  %s  registration ID %s  (%d bytes out, %d in)\n",
			r.Serial, r.ID, secs(r.Duration()), r.RegistrationID, r.BytesOut, r.BytesIn)
		return
	}
	serial := r.Serial
	if serial == "" {
		serial = "(no serial)"
	}
	fmt.Fprintf(w, "FAIL  %s  run %d  %s\n      %s\n", serial, r.ID, secs(r.Duration()), r.Error)
}

func ms(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

// runRecord is the JSON form of a run: the run with readable durations.
type runRecord struct {
	*station.Run
	ErrorKind string  `json:"error_kind,omitempty"`
	Seconds   float64 `json:"seconds"`
}

func runJSON(r *station.Run) runRecord {
	rr := runRecord{Run: r, Seconds: r.Duration().Seconds()}
	if r.Result == station.ResultFail {
		rr.ErrorKind = strings.ReplaceAll(r.ErrorKind.String(), " ", "_")
	}
	return rr
}
