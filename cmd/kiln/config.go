package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"

	"github.com/kilnworks/kiln/hsm"
	"github.com/kilnworks/kiln/internal/atomicfile"
	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/station/sqlite"
)

// config is the station's configuration: the data directory and the station
// profile, read from $KILN_HOME/station.json when it exists; flags override it.
type config struct {
	Home          string               `json:"-"`
	Station       string               `json:"station"`
	Method        station.Method       `json:"method"`
	RegID         station.RegIDRule    `json:"registration_id"`
	EKCertPolicy  station.EKCertPolicy `json:"ek_cert_policy"`
	EKRoots       string               `json:"ek_roots"` // folder of manufacturer roots and intermediates (PEM)
	SerialPattern string               `json:"serial_pattern,omitempty"`
	Baud          int                  `json:"baud"`
	// Verify is the end-to-end check before a unit passes: "embedded" (the
	// station's own DPS and hub) or "off".
	Verify string `json:"verify"`
	// Production is the DPS the DUT is pointed at after the check; nil
	// leaves the verification configuration on the DUT.
	Production *station.DeviceConfig `json:"production,omitempty"`
	// DeviceKeyType is the key type the X.509 method asks DUTs for
	// ("EC-P256" when empty, or "RSA-2048").
	DeviceKeyType string `json:"device_key_type,omitempty"`
	// CA is the station's signing CA (the X.509 method).
	CA caConfig `json:"ca,omitzero"`
	// SymKeyGroup and X509Group name the enrollment groups of the
	// symmetric-key and X.509 methods ("kiln-symkey", "kiln-x509" when empty).
	SymKeyGroup string `json:"symkey_group,omitempty"`
	X509Group   string `json:"x509_group,omitempty"`
	// BatchTarget is the DPS target (kiln batch target list) that batches
	// sealed in the GUI are bound to; "" when none is chosen.
	BatchTarget string `json:"batch_target,omitempty"`
}

const configFile = "station.json"

// loadConfig reads the configuration of the data directory, creating the
// directory when it does not exist yet.
func loadConfig(e *env) (*config, error) {
	home := e.getenv("KILN_HOME")
	if home == "" {
		home = "kiln-data"
	}
	home, err := filepath.Abs(home)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, fmt.Errorf("create the data directory: %w", err)
	}
	p := station.DefaultProfile()
	c := &config{Home: home, Station: p.Station, Method: p.Method, RegID: p.RegID, EKCertPolicy: p.EKCertPolicy, Baud: 115200, Verify: "embedded"}
	path := filepath.Join(home, configFile)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("read the station configuration: %w", err)
	default:
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(c); err != nil {
			return nil, usagef("%s: %v: fix the file or remove it to use the defaults", path, err)
		}
	}
	if c.EKRoots == "" {
		c.EKRoots = filepath.Join(home, "ek-roots")
	} else if !filepath.IsAbs(c.EKRoots) {
		c.EKRoots = filepath.Join(home, c.EKRoots)
	}
	return c, nil
}

// profileFlags registers the flags that override the station profile.
func (c *config) profileFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Station, "station", c.Station, "station name written on every record")
	fs.Func("method", "provisioning method: tpm (enrolled by the TPM's EK), x509 (a leaf from the station CA for a key made on the DUT) or symkey (a key derived from the group key) (default "+string(c.Method)+")", func(s string) error {
		switch m := station.Method(s); m {
		case station.MethodTPM, station.MethodX509, station.MethodSymKey:
			c.Method = m
			return nil
		}
		return fmt.Errorf("%q is not tpm, x509 or symkey", s)
	})
	fs.Func("ek-cert-policy", "EK certificate policy: require, warn or off (default "+string(c.EKCertPolicy)+")", func(s string) error {
		switch p := station.EKCertPolicy(s); p {
		case station.EKCertRequire, station.EKCertWarn, station.EKCertOff:
			c.EKCertPolicy = p
			return nil
		}
		return fmt.Errorf("%q is not require, warn or off", s)
	})
	fs.Func("regid", "registration ID rule: ek (DPS default, from the EK) or serial (default "+string(c.RegID)+")", func(s string) error {
		switch r := station.RegIDRule(s); r {
		case station.RegIDFromEK, station.RegIDFromSerial:
			c.RegID = r
			return nil
		}
		return fmt.Errorf("%q is not ek or serial", s)
	})
	fs.StringVar(&c.EKRoots, "roots", c.EKRoots, "folder of trusted TPM manufacturer roots and intermediates (PEM)")
	fs.StringVar(&c.SerialPattern, "serial-pattern", c.SerialPattern, "regular expression a serial number must match")
	fs.Func("verify", "end-to-end check before a unit passes: embedded (the station's DPS and hub) or off (default "+c.Verify+")", func(s string) error {
		if s != "embedded" && s != "off" {
			return fmt.Errorf("%q is not embedded or off", s)
		}
		c.Verify = s
		return nil
	})
}

func (c *config) profile() station.Profile {
	return station.Profile{Station: c.Station, Method: c.Method, RegID: c.RegID, EKCertPolicy: c.EKCertPolicy, KeyType: c.DeviceKeyType}
}

func (c *config) serialPattern() (*regexp.Regexp, error) {
	if c.SerialPattern == "" {
		return nil, nil
	}
	re, err := regexp.Compile(c.SerialPattern)
	if err != nil {
		return nil, usagef("serial pattern %q: %v", c.SerialPattern, err)
	}
	return re, nil
}

func (c *config) dbPath() string { return filepath.Join(c.Home, "kiln.db") }

func (c *config) openStore(ctx context.Context) (*sqlite.Store, error) {
	return sqlite.Open(ctx, c.dbPath())
}

// verifier loads the EK root store. When the folder does not exist, every
// validation fails with NotFound, so that policy warn or require reports it
// on each unit.
func (c *config) verifier() (station.Verifier, error) {
	if _, err := os.Stat(c.EKRoots); errors.Is(err, fs.ErrNotExist) {
		return missingRoots(c.EKRoots), nil
	}
	roots, err := hsm.LoadRoots(c.EKRoots)
	if err != nil {
		return nil, err
	}
	return roots, nil
}

// missingRoots is the verifier of a root store folder that does not exist.
type missingRoots string

func (m missingRoots) VerifyEKCert(context.Context, *station.Endorsement) error {
	return station.Errorf("validate EK certificate", station.KindNotFound,
		"no EK root store at %s: put the TPM makers' root and intermediate certificates (PEM) there, or pass --roots", string(m))
}

// save writes c to $KILN_HOME/station.json atomically (a temporary file
// renamed over it), readable by its owner only.
func (c *config) save() error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(c.Home, configFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save the station configuration: %w", err)
	}
	return nil
}
