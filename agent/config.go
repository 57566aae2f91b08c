package agent

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/kilnworks/kiln/station"
)

// DefaultConfigPath is where kiln-agent keeps its provisioning config.
const DefaultConfigPath = "/var/lib/kiln-agent/config.json"

// ConfigStore keeps the DUT's provisioning config across restarts.
// Implementations are safe for concurrent use.
type ConfigStore interface {
	// Load returns the stored config. Kinds: NotFound (none stored yet),
	// Invalid (the stored config is corrupt), Unavailable.
	Load(ctx context.Context) (station.DeviceConfig, error)
	// Save replaces the stored config; a reader sees the old config or the
	// new one, never a mix. Kinds: Unavailable.
	Save(ctx context.Context, cfg station.DeviceConfig) error
}

// ValidateConfig checks a provisioning config before it is stored: an ID
// scope, a DPS endpoint (host or host:port), a registration ID that DPS
// accepts (station.ValidRegistrationID), a method that is empty, tpm, x509
// or symkey and, when set, a trust bundle of PEM certificates only. Kinds:
// Invalid.
func ValidateConfig(cfg station.DeviceConfig) error {
	const op = "check provisioning config"
	if s := cfg.IDScope; s == "" || strings.ContainsAny(s, "/?#%& \t\r\n") {
		return station.Errorf(op, station.KindInvalid, "the ID scope %q is empty or has characters an ID scope cannot have: copy it from the DPS overview", s)
	}
	ep := strings.TrimPrefix(cfg.GlobalEndpoint, "https://")
	if ep == "" || strings.ContainsAny(ep, "/?#@ \t\r\n") {
		return station.Errorf(op, station.KindInvalid, "the DPS endpoint %q is not a host or host:port, e.g. global.azure-devices-provisioning.net", cfg.GlobalEndpoint)
	}
	if err := station.ValidRegistrationID(cfg.RegistrationID); err != nil {
		return station.E(op, station.KindInvalid, err)
	}
	switch cfg.Method {
	case "", station.MethodTPM, station.MethodX509, station.MethodSymKey:
	default:
		return station.Errorf(op, station.KindInvalid, "the attestation method %q is not tpm, x509 or symkey", cfg.Method)
	}
	if cfg.TrustBundle != "" {
		if err := checkTrustBundle(cfg.TrustBundle); err != nil {
			return station.E(op, station.KindInvalid, err)
		}
	}
	return nil
}

// checkTrustBundle checks that b is one or more PEM certificates and
// nothing else but white space.
func checkTrustBundle(b string) error {
	rest := []byte(b)
	n := 0
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		n++
		if blk.Type != "CERTIFICATE" {
			return errors.New("the trust bundle holds a PEM " + blk.Type + ", not only certificates: write the CA certificates alone")
		}
		if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
			return errors.New("certificate " + strconv.Itoa(n) + " of the trust bundle does not parse: " + err.Error())
		}
	}
	if n == 0 {
		return errors.New("the trust bundle holds no PEM certificate: write the CA certificates of the DPS and hub servers")
	}
	if len(strings.TrimSpace(string(rest))) != 0 {
		return errors.New("the trust bundle has text after its last certificate that is not PEM: write PEM certificates only")
	}
	return nil
}

// FileStore keeps the config as a JSON file at Path, readable by its owner
// only (0600). Save writes a temporary file beside it, syncs it and renames
// it over the old one, so a crash leaves the old config or the new one.
type FileStore struct {
	Path string
	mu   sync.Mutex
}

var _ ConfigStore = (*FileStore)(nil)

// NewFileStore returns a FileStore at path (DefaultConfigPath when empty).
func NewFileStore(path string) *FileStore {
	if path == "" {
		path = DefaultConfigPath
	}
	return &FileStore{Path: path}
}

// Load reads the config file. Kinds: NotFound, Invalid, Unavailable.
func (s *FileStore) Load(ctx context.Context) (station.DeviceConfig, error) {
	const op = "load provisioning config"
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := os.ReadFile(s.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return station.DeviceConfig{}, station.Errorf(op, station.KindNotFound,
			"no provisioning config at %s yet: the station writes it (WRITE CONFIG) before provisioning", s.Path)
	case err != nil:
		return station.DeviceConfig{}, station.Errorf(op, station.KindUnavailable, "read %s: %w", s.Path, err)
	}
	var cfg station.DeviceConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return station.DeviceConfig{}, station.Errorf(op, station.KindInvalid,
			"%s is not a provisioning config (%v): have the station write the config again", s.Path, err)
	}
	return cfg, nil
}

// Save writes the config atomically with mode 0600, creating the directory
// (0700) if needed. Kinds: Unavailable.
func (s *FileStore) Save(ctx context.Context, cfg station.DeviceConfig) error {
	const op = "save provisioning config"
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return writePrivate(op, s.Path, append(b, '\n'), "--config")
}

// writePrivate writes b to path atomically (a temporary file beside it,
// synced and renamed over it, the directory synced) with mode 0600,
// creating the directory (0700) when needed; flag names the option that
// chose the path, for the error. Kinds: Unavailable.
func writePrivate(op, path string, b []byte, flag string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return station.Errorf(op, station.KindUnavailable, "create %s: %w: check the %s path and its permissions", dir, err, flag)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+"-*.tmp")
	if err != nil {
		return station.Errorf(op, station.KindUnavailable, "create a file in %s: %w: check the %s path and its permissions", dir, err, flag)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return station.Errorf(op, station.KindUnavailable, "restrict %s to its owner: %w", tmp, err)
	}
	if _, err := f.Write(b); err != nil {
		return station.Errorf(op, station.KindUnavailable, "write %s: %w: check the free space", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return station.Errorf(op, station.KindUnavailable, "sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return station.Errorf(op, station.KindUnavailable, "close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return station.Errorf(op, station.KindUnavailable, "replace %s: %w", path, err)
	}
	ok = true
	if d, err := os.Open(dir); err == nil { // make the rename durable
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// MemoryStore keeps the config in memory, for simulated DUTs. The zero
// value holds no config.
type MemoryStore struct {
	mu  sync.Mutex
	cfg *station.DeviceConfig
}

var _ ConfigStore = (*MemoryStore)(nil)

// Load returns the config last saved. Kinds: NotFound.
func (s *MemoryStore) Load(context.Context) (station.DeviceConfig, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg == nil {
		return station.DeviceConfig{}, station.Errorf("load provisioning config", station.KindNotFound,
			"no provisioning config yet: the station writes it (WRITE CONFIG) before provisioning")
	}
	return *s.cfg, nil
}

// Save keeps cfg.
func (s *MemoryStore) Save(_ context.Context, cfg station.DeviceConfig) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg = &cfg
	return nil
}
