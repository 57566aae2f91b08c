package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/kilnworks/kiln/station"
)

// runDemo provisions one simulated unit end to end in the data directory:
// what a newcomer sees first (make run).
func runDemo(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	fs := newFlags(e, "demo")
	operator := fs.String("operator", "demo", "operator name written on the record")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "Kiln demo: data directory %s\n", c.Home)
	fmt.Fprintln(e.stdout, "starting a simulated DUT: the agent and a reference TPM 2.0 simulator on a pty, paced to 115200 baud")
	d, err := startSimDUT(ctx, c, simOptions{tpm: "sim", lineRate: 115200}, "DEMO-"+randomHex(4))
	if err != nil {
		return err
	}
	defer d.Close()
	fmt.Fprintf(e.stdout, "DUT %s is on %s; its TPM maker's root is in %s\n\n", d.serial, d.dut.Path(), d.roots)

	// The demo trusts the simulated maker, so the EK certificate is required.
	c.EKRoots, c.EKCertPolicy = d.roots, station.EKCertRequire
	p, closeFn, err := newProvisioner(ctx, e, c)
	if err != nil {
		return err
	}
	defer closeFn()
	p.OnStep = func(ev station.StepEvent) {
		if ev.Done {
			printStep(e.stdout, ev.Step)
		}
	}
	fmt.Fprintf(e.stdout, "kiln provision --port %s --ek-cert-policy require --roots %s\n", d.dut.Path(), d.roots)
	r, perr := p.Provision(ctx, station.Request{Port: d.dut.Path(), Operator: *operator})
	if r == nil {
		return perr
	}
	printVerdict(e.stdout, r)
	fmt.Fprintf(e.stdout, "\nThe record is in %s. Next:\n", filepath.Join(c.Home, "kiln.db"))
	fmt.Fprintf(e.stdout, "  bin/kiln records show %d\n  bin/kiln records list\n  bin/kiln simulate --count 2   # then: bin/kiln provision --port PATH\n", r.ID)
	if perr != nil {
		return errFailed
	}
	return nil
}
