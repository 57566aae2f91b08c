// Command kiln-agent is the device-side agent that DUTs ship: it serves the
// Kiln DUT link on a serial port (a USB gadget serial port such as
// /dev/ttyGS0), passes TPM commands to the device's TPM, generates the
// device's key (in the TPM when it has one) and keeps its certificate chain
// or symmetric key in --data-dir, and provisions the device against DPS
// when the station says so. It is pure Go (CGO_ENABLED=0) and
// cross-compiles to linux/arm64, arm and amd64.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/agent"
	"github.com/kilnworks/kiln/hsm"
)

func main() {
	var o agent.Options
	fs := flag.NewFlagSet("kiln-agent", flag.ExitOnError)
	o.Flags(fs, "/dev/tpmrm0, swtpm:HOST:PORT or swtpm:unix:PATH")
	verbose := fs.Bool("v", false, "log debug detail")
	fs.Parse(os.Args[1:])
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	open := func(spec string) (transport.TPMCloser, error) { return hsm.Open(spec) }
	if err := agent.Run(ctx, o, open, log); err != nil {
		fmt.Fprintln(os.Stderr, "kiln-agent:", err)
		os.Exit(1)
	}
}
