// Package datakey keeps a store's data key: 32 random bytes in a file of
// the data directory (readable by its owner only), used with AES-256-GCM to
// seal the secrets a Kiln store keeps in its database. The key protects a
// copied database, not a copied data directory.
package datakey

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"io/fs"
	"os"

	"github.com/kilnworks/kiln/station"
)

// Load reads the data key at path, creating it (mode 0600) when it does not
// exist, and returns its AES-256-GCM AEAD. owner names the store in errors
// ("devserver", "cloudsync") and lost says what is lost without the key.
// Kinds: Unavailable (the file cannot be read or written), Invalid (not a
// 32-byte key).
func Load(path, owner, lost string) (cipher.AEAD, error) {
	op := "load " + owner + " data key"
	key, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, station.E(op, station.KindInternal, err)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, station.Errorf(op, station.KindUnavailable, "create %s: %w", path, err)
		}
		_, werr := f.Write(key)
		if err := errors.Join(werr, f.Sync(), f.Close()); err != nil {
			os.Remove(path)
			return nil, station.Errorf(op, station.KindUnavailable, "write %s: %w", path, err)
		}
	} else if err != nil {
		return nil, station.Errorf(op, station.KindUnavailable, "read %s: %w", path, err)
	}
	if len(key) != 32 {
		return nil, station.Errorf(op, station.KindInvalid,
			"%s holds %d bytes, not a 32-byte key: restore it from a backup (without it %s)", path, len(key), lost)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, station.E(op, station.KindInternal, err)
	}
	return cipher.NewGCM(block)
}
