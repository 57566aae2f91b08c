// Package atomicfile writes files so that a crash never leaves one half
// written: the bytes go to a temporary file beside the target, which is
// synced and renamed over it, and the directory is synced so the rename
// lasts. Standard library only (the device agent uses it too).
package atomicfile

import (
	"os"
	"path/filepath"
)

// WriteFile writes b to path with mode (set before any byte is written,
// so a secret is never readable by others, not even for a moment).
func WriteFile(path string, b []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // fails harmlessly after the rename
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(b)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
