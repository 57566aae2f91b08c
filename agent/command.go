package agent

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/station"
	"go.bug.st/serial"
)

// Options are the settings of the agent command, shared by `kiln agent` and
// the kiln-agent binary that DUTs ship.
type Options struct {
	Port     string // serial port to serve, e.g. /dev/ttyGS0 (USB gadget serial)
	TPM      string // TPM spec, e.g. /dev/tpmrm0; empty: no TPM
	Baud     int    // line rate, 8N1
	Serial   string // overrides what DetectInfo finds
	Model    string
	Firmware string
	Config   string // provisioning config file, e.g. /var/lib/kiln-agent/config.json
	DataDir  string // identity directory: generated key, certificate chain, symmetric key
}

// Flags registers the agent command's flags on fs, with tpmHelp describing
// the TPM specs the caller can open.
func (o *Options) Flags(fs *flag.FlagSet, tpmHelp string) {
	fs.StringVar(&o.Port, "port", "/dev/ttyGS0", "serial port to serve the DUT link on")
	fs.StringVar(&o.TPM, "tpm", "/dev/tpmrm0", "the device's TPM: "+tpmHelp+"; empty for none")
	fs.IntVar(&o.Baud, "baud", 115200, "line rate (8N1)")
	fs.StringVar(&o.Serial, "serial", "", "serial number to report (default: from the device tree or DMI)")
	fs.StringVar(&o.Model, "model", "", "model to report (default: from the device tree or DMI)")
	fs.StringVar(&o.Firmware, "firmware", "", "firmware version to report (default: from /etc/os-release)")
	fs.StringVar(&o.DataDir, "data-dir", DefaultDataDir, "directory keeping the identity the station gives the device (generated key, certificate chain, symmetric key), owner-only")
	fs.StringVar(&o.Config, "config", DefaultConfigPath, "file keeping the provisioning config the station writes (ID scope, DPS endpoint, registration ID, trust bundle)")
}

// Run opens the TPM with openTPM and serves the DUT link on the serial port
// until ctx is done. When the line fails (a USB gadget port goes away while
// the cable is out), it reopens the port and serves again.
func Run(ctx context.Context, o Options, openTPM func(spec string) (transport.TPMCloser, error), log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	info := DetectInfo()
	if o.Serial != "" {
		info.Serial = o.Serial
	}
	if o.Model != "" {
		info.Model = o.Model
	}
	if o.Firmware != "" {
		info.Firmware = o.Firmware
	}
	cfg := Config{Info: info, Logger: log, Store: NewFileStore(o.Config), DataDir: o.DataDir}
	if o.TPM != "" {
		t, err := openTPM(o.TPM)
		if err != nil {
			return fmt.Errorf("open the TPM %s: %w", o.TPM, err)
		}
		defer t.Close()
		cfg.TPM = t
	}
	a, err := New(cfg)
	if err != nil {
		return err
	}
	mode := &serial.Mode{BaudRate: o.Baud, DataBits: 8, Parity: serial.NoParity, StopBits: serial.OneStopBit}
	port, err := serial.Open(o.Port, mode)
	if err != nil {
		return station.Errorf("open serial port", station.KindUnavailable, "open %s: %w: check the port name (a USB gadget needs g_serial or a configfs ACM function)", o.Port, err)
	}
	log.Info("agent serving", "port", o.Port, "serial", info.Serial, "model", info.Model, "tpm", o.TPM != "")
	for {
		err := serveOnce(ctx, a, port)
		if ctx.Err() != nil {
			return nil
		}
		log.Warn("line failed; reopening", "port", o.Port, "err", err)
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
			if port, err = serial.Open(o.Port, mode); err == nil {
				break
			}
		}
	}
}

// serveOnce serves on port until the line fails or ctx is done, and closes port.
func serveOnce(ctx context.Context, a *Agent, port serial.Port) error {
	stop := context.AfterFunc(ctx, func() { port.Close() })
	defer stop()
	err := a.Serve(ctx, port)
	port.Close()
	if err == nil {
		err = errors.New("link closed")
	}
	return err
}
