package cloudsync

import (
	"crypto/cipher"
	"crypto/rand"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/internal/datakey"
	"github.com/kilnworks/kiln/station"
)

// KeyFile is the name of the data key file in the station's data
// directory.
const KeyFile = "cloudsync.key"

// Sealer encrypts cloudsync's secrets at rest with AES-256-GCM. Every
// sealed value is bound to what it is (its additional data), so a sealed
// value cannot be moved to another row. It is safe for concurrent use.
type Sealer struct{ aead cipher.AEAD }

// LoadSealer reads the 32-byte data key at path, creating it (readable by
// its owner only, 0600) when it does not exist. The key protects a copied
// database, not a copied data directory. Kinds: Unavailable (the file
// cannot be read or written), Invalid (not a 32-byte key).
func LoadSealer(path string) (*Sealer, error) {
	aead, err := datakey.Load(path, "cloudsync", "the targets and the signing key are lost")
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: aead}, nil
}

// Seal encrypts plain for the value named by aad.
func (s *Sealer) Seal(plain []byte, aad string) []byte {
	n := s.aead.NonceSize()
	nonce := make([]byte, n, n+len(plain)+s.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		panic(err) // crypto/rand does not fail
	}
	return s.aead.Seal(nonce, nonce, plain, []byte(aad))
}

// Open decrypts a value sealed by Seal for aad. Kinds: Unauthorized (a
// wrong data key, a tampered value or one sealed for something else).
func (s *Sealer) Open(sealed []byte, aad string) ([]byte, error) {
	op := "unseal " + aad
	n := s.aead.NonceSize()
	if len(sealed) < n+s.aead.Overhead() {
		return nil, station.Errorf(op, station.KindUnauthorized, "the sealed value is truncated: set it again")
	}
	plain, err := s.aead.Open(nil, sealed[:n], sealed[n:], []byte(aad))
	if err != nil {
		return nil, station.Errorf(op, station.KindUnauthorized,
			"the sealed value does not decrypt: %s is not the key it was sealed with, or it was changed; set it again", KeyFile)
	}
	return plain, nil
}

func targetAAD(name string) string { return "target:" + name }

// SealTarget checks the service connection string conn and seals it into
// t, setting t.HostName from it. Kinds: Invalid (not a service connection
// string: it needs HostName, SharedAccessKeyName and SharedAccessKey).
func (s *Sealer) SealTarget(t *station.Target, conn string) error {
	cs, err := dps.ParseConnectionString(conn)
	if err != nil {
		return err
	}
	if cs.SharedAccessKeyName == "" || cs.DeviceID != "" {
		return station.Errorf("set target "+t.Name, station.KindInvalid,
			"not a DPS service connection string: it needs HostName, SharedAccessKeyName and SharedAccessKey (the DPS's Shared access policies page shows it)")
	}
	t.HostName = cs.HostName
	t.SealedConnectionString = s.Seal([]byte(conn), targetAAD(t.Name))
	return nil
}

// ConnectionString unseals t's connection string. It holds a key: do not
// log it. Kinds: Unauthorized.
func (s *Sealer) ConnectionString(t *station.Target) (string, error) {
	b, err := s.Open(t.SealedConnectionString, targetAAD(t.Name))
	return string(b), err
}
