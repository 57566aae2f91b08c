package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/fixtures"
	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// simOptions describes the simulated DUTs of `kiln simulate` and `kiln demo`.
type simOptions struct {
	count     int
	tpm       string // sim or swtpm
	lineRate  int
	prefix    string
	dropAfter int
	garbage   bool
	delay     time.Duration
	index     int // first DUT's number
}

func runSimulate(ctx context.Context, e *env, args []string) error {
	c, err := loadConfig(e)
	if err != nil {
		return err
	}
	o := simOptions{}
	fs := newFlags(e, "simulate")
	fs.IntVar(&o.count, "count", 1, "number of simulated DUTs")
	fs.StringVar(&o.tpm, "tpm", "sim", "TPM of each DUT: sim (in-process reference simulator) or swtpm (one swtpm each, EK certificate by swtpm_setup)")
	fs.IntVar(&o.lineRate, "line-rate", 115200, "line rate in bits/s the DUTs pace themselves to (8N1); negative: unthrottled")
	fs.StringVar(&o.prefix, "serial-prefix", "SIM-", "serial number prefix; a random part and the DUT's number follow")
	fs.IntVar(&o.dropAfter, "drop-after", 0, "misbehave: drop off the line after answering N requests (0: never)")
	fs.BoolVar(&o.garbage, "garbage", false, "misbehave: put random bytes on the line around answers")
	fs.DurationVar(&o.delay, "delay", 0, "misbehave: answer each request this late")
	fs.IntVar(&o.index, "index", 1, "number of the first DUT")
	serialFlag := fs.String("serial", "", "serial number of a single DUT (instead of prefix+random+number)")
	if err := parse(fs, args, false); err != nil {
		return err
	}
	if o.count < 1 {
		return usagef("--count must be at least 1")
	}
	if o.tpm != "sim" && o.tpm != "swtpm" {
		return usagef("--tpm must be sim or swtpm")
	}
	if o.tpm == "sim" && o.count > 1 {
		// One reference simulator per process: each DUT gets its own process,
		// as real DUTs are separate machines.
		return simulateChildren(ctx, e, args, o)
	}
	base := randomHex(3)
	var duts []*simDUT
	defer func() {
		for _, d := range duts {
			d.Close()
		}
	}()
	for i := range o.count {
		serial := *serialFlag
		if serial == "" {
			serial = fmt.Sprintf("%s%s-%02d", o.prefix, base, o.index+i)
		}
		d, err := startSimDUT(ctx, c, o, serial)
		if err != nil {
			return err
		}
		duts = append(duts, d)
		fmt.Fprintln(e.stdout, d.dut.Path())
		fmt.Fprintf(e.stderr, "DUT %s on %s tpm=%s line=%q roots=%s\n", serial, d.dut.Path(), d.tpmName, lineName(o.lineRate), d.roots)
	}
	syncStdout(e)
	fmt.Fprintln(e.stderr, "simulated DUTs are running; press Ctrl-C to stop them")
	<-ctx.Done()
	return nil
}

func lineName(rate int) string {
	if rate < 0 {
		return "unthrottled"
	}
	if rate == 0 {
		rate = 115200
	}
	return strconv.Itoa(rate) + " 8N1"
}

// simulateChildren runs one `kiln simulate --count 1` process per DUT and
// relays their port paths in order.
func simulateChildren(ctx context.Context, e *env, args []string, o simOptions) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	base := randomHex(3)
	paths := make([]string, o.count)
	var wg sync.WaitGroup
	errs := make(chan error, o.count)
	for i := range o.count {
		child := append([]string{"simulate"}, args...)
		child = append(child, "--count", "1", "--index", strconv.Itoa(o.index+i),
			"--serial", fmt.Sprintf("%s%s-%02d", o.prefix, base, o.index+i))
		cmd := exec.CommandContext(ctx, self, child...)
		cmd.Stderr = e.stderr
		cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
		cmd.WaitDelay = 5 * time.Second
		out, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start simulated DUT %d: %w", i+1, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sc := bufio.NewScanner(out)
			if sc.Scan() {
				paths[i] = sc.Text()
				errs <- nil
			} else {
				errs <- fmt.Errorf("simulated DUT %d exited before it printed its port", i+1)
			}
			for sc.Scan() {
			}
			_ = cmd.Wait()
		}()
	}
	for range o.count {
		if err := <-errs; err != nil {
			return err
		}
	}
	for _, p := range paths {
		fmt.Fprintln(e.stdout, p)
	}
	syncStdout(e)
	wg.Wait()
	return nil
}

// simDUT is a running simulated DUT with its TPM.
type simDUT struct {
	dut     *fixtures.DUT
	tpm     transport.TPMCloser
	swtpm   *fixtures.SWTPM
	tmpDir  string // swtpm's state and roots, removed when the DUT stops
	tpmName string
	roots   string
	serial  string
}

func (d *simDUT) Close() {
	d.dut.Close()
	d.tpm.Close()
	if d.swtpm != nil {
		d.swtpm.Close()
	}
	if d.tmpDir != "" {
		os.RemoveAll(d.tmpDir)
	}
}

// startSimDUT starts one simulated DUT. With the simulator, a fresh
// manufacturer CA signs its EK certificate and its root is added to the
// data directory's simulator/ek-roots folder (no CA key is kept).
func startSimDUT(ctx context.Context, c *config, o simOptions, serial string) (*simDUT, error) {
	d := &simDUT{serial: serial}
	switch o.tpm {
	case "sim":
		t, err := tpmsim.Open()
		if err != nil {
			return nil, err
		}
		ca, err := fixtures.NewCA("Kiln simulated TPM maker " + time.Now().UTC().Format("20060102T150405.000000"))
		if err != nil {
			t.Close()
			return nil, err
		}
		d.roots = filepath.Join(c.Home, "simulator", "ek-roots")
		if _, err := ca.WritePEM(d.roots); err != nil {
			t.Close()
			return nil, err
		}
		if err := fixtures.Manufacture(ctx, t, ca); err != nil {
			t.Close()
			return nil, err
		}
		d.tpm, d.tpmName = t, "sim"
	case "swtpm":
		dir, err := os.MkdirTemp("", "kiln-swtpm-")
		if err != nil {
			return nil, err
		}
		d.tmpDir = dir
		sw, err := fixtures.StartSWTPM(ctx, dir)
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		t, err := hsm.Open(sw.Spec())
		if err != nil {
			sw.Close()
			os.RemoveAll(dir)
			return nil, err
		}
		d.tpm, d.swtpm, d.tpmName, d.roots = t, sw, sw.Spec(), sw.RootsDir()
	}
	dut, err := fixtures.StartDUT(ctx, fixtures.DUTConfig{
		Info:     station.DeviceInfo{Serial: serial, Model: "kiln-sim", Firmware: "sim-" + version},
		TPM:      d.tpm,
		LineRate: o.lineRate,
		Faults: fixtures.DUTFaults{
			DropAfter: o.dropAfter,
			Garbage:   o.garbage,
			Delay:     o.delay,
		},
	})
	if err != nil {
		d.tpm.Close()
		if d.swtpm != nil {
			d.swtpm.Close()
		}
		if d.tmpDir != "" {
			os.RemoveAll(d.tmpDir)
		}
		return nil, err
	}
	d.dut = dut
	return d, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%X", b)
}

// syncStdout flushes stdout when it is a file, so that a script reading it
// sees the lines now.
func syncStdout(e *env) {
	if f, ok := e.stdout.(*os.File); ok {
		_ = f.Sync()
	}
}
