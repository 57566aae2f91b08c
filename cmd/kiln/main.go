// Command kiln is the Kiln provisioning station: it provisions devices under
// test over a serial link, records them in SQLite, and simulates DUTs for
// development and QA. Run `kiln help` for the subcommands.
//
// This is the only place where concrete adapters are built and wired.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	_ "github.com/kilnworks/kiln/internal/fynelocale" // first: before Fyne reads the locale
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// exit codes
const (
	exitPass  = 0
	exitFail  = 1 // a unit failed, or a command could not do its work
	exitUsage = 2 // bad flags or configuration
)

// usageError marks errors in how kiln was called (exit code 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// errFailed is returned by a command that already told the user why (a FAIL).
var errFailed = errors.New("failed")

type command struct {
	name, args, summary string
	run                 func(ctx context.Context, env *env, args []string) error
}

// env is what every command gets: its streams and the process environment.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	logLevel       slog.Level
}

func (e *env) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: e.logLevel}))
}

func commands() []command {
	return []command{
		{"gui", "[--port PATH] [--simulate] [--operator NAME]", "open the station window (the default; with no port, one simulated DUT)", runGUI},
		{"provision", "--port PATH [--port PATH...] [--method tpm|x509|symkey] [--serial S] [--json]", "provision the DUTs on serial ports, one slot each, and record them", runProvision},
		{"simulate", "[--count N] [--tpm sim|swtpm]", "start simulated DUTs on ptys and print their paths", runSimulate},
		{"agent", "--port PATH --tpm SPEC", "run the device-side agent on a serial port (what a DUT runs)", runAgent},
		{"serve", "[--addr A] [--hub-addr A] [--json]", "run the embedded DPS and IoT hub alone: a DPS emulator", runServe},
		{"ca", "init|show|export|import|use-remote ...", "the station's signing CA for the X.509 method", runCA},
		{"qa", "run|check [--slots N] SCENARIO...", "run QA scenarios on simulated or real DUTs; JUnit XML and HTML reports", runQA},
		{"records", "list|show ...", "list and show provisioning records", runRecords},
		{"batch", "list|show|seal|push|enable|export|...", "batches: push to a DPS enrollment list, export for customers", runBatch},
		{"tpm", "info --tpm SPEC", "show a TPM's EK, EK certificate and its validation", runTPM},
		{"demo", "", "provision one simulated unit end to end in the data dir (what make run does)", runDemo},
		{"version", "", "print the version", runVersion},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], &env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv})
	stop()
	os.Exit(code)
}

// run runs one kiln command line and returns the process exit code.
func run(ctx context.Context, args []string, e *env) int {
	if len(args) == 0 {
		args = []string{"gui"}
	}
	if args[0] == "-v" || args[0] == "--verbose" {
		e.logLevel = slog.LevelDebug
		args = args[1:]
	} else if e.logLevel == 0 {
		e.logLevel = slog.LevelWarn
	}
	name := args[0]
	if name == "help" || name == "-h" || name == "--help" {
		usage(e.stdout)
		return exitPass
	}
	for _, c := range commands() {
		if c.name != name {
			continue
		}
		err := c.run(ctx, e, args[1:])
		var ue usageError
		switch {
		case err == nil:
			return exitPass
		case errors.Is(err, flag.ErrHelp):
			return exitPass
		case errors.As(err, &ue):
			fmt.Fprintf(e.stderr, "kiln %s: %v\n", name, err)
			return exitUsage
		case errors.Is(err, errFailed):
			return exitFail
		default:
			fmt.Fprintf(e.stderr, "kiln %s: %v\n", name, err)
			return exitFail
		}
	}
	fmt.Fprintf(e.stderr, "kiln: unknown command %q\n\n", name)
	usage(e.stderr)
	return exitUsage
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "Kiln provisions devices under test over a serial link and records them.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: kiln [-v] COMMAND [flags]")
	fmt.Fprintln(w)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %-38s %s\n", c.name, c.args, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "The data directory is $KILN_HOME (default ./kiln-data). `kiln COMMAND -h` lists a command's flags.")
}

// newFlags returns a flag set that reports errors instead of exiting.
func newFlags(e *env, name string) *flag.FlagSet {
	fs := flag.NewFlagSet("kiln "+name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	return fs
}

// parse parses args and refuses stray positional arguments unless allowed.
func parse(fs *flag.FlagSet, args []string, positional bool) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	if !positional && fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

var version = "dev"

func runVersion(_ context.Context, e *env, _ []string) error {
	fmt.Fprintln(e.stdout, "kiln", version)
	return nil
}
