package agent

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/kilnworks/kiln/station"
)

// DefaultDataDir is where kiln-agent keeps the identity the station gives
// it: the generated key, the certificate chain and the symmetric key.
const DefaultDataDir = "/var/lib/kiln-agent"

// vault keeps the agent's identity files by name. Files hold key
// material: implementations never log their contents.
type vault interface {
	// get returns the file's bytes, or nil and no error when it is absent.
	get(name string) ([]byte, error)
	// put replaces the file atomically.
	put(name string, b []byte) error
	// del removes the file; an absent file is no error.
	del(name string) error
}

// dirVault keeps files in a directory (0700), each file 0600, written
// through a synced temporary file renamed over the old one.
type dirVault struct {
	dir string
	mu  sync.Mutex
}

func (v *dirVault) get(name string) ([]byte, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	p := filepath.Join(v.dir, name)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, station.Errorf("read identity", station.KindUnavailable, "read %s: %w: check the --data-dir permissions", p, err)
	}
	return b, nil
}

func (v *dirVault) put(name string, b []byte) error {
	const op = "store identity"
	v.mu.Lock()
	defer v.mu.Unlock()
	return writePrivate(op, filepath.Join(v.dir, name), b, "--data-dir")
}

func (v *dirVault) del(name string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	p := filepath.Join(v.dir, name)
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return station.Errorf("remove identity file", station.KindUnavailable, "remove %s: %w", p, err)
	}
	return nil
}

// memVault keeps files in memory, for simulated DUTs.
type memVault struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (v *memVault) get(name string) ([]byte, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]byte(nil), v.m[name]...), nil
}

func (v *memVault) put(name string, b []byte) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.m == nil {
		v.m = map[string][]byte{}
	}
	v.m[name] = append([]byte(nil), b...)
	return nil
}

func (v *memVault) del(name string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.m, name)
	return nil
}
