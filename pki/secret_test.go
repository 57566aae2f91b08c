package pki_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnworks/kiln/pki"
	"github.com/kilnworks/kiln/station"
)

func TestFileKeysSecret(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	keys := &pki.FileKeys{Dir: dir, Passphrase: []byte("line 4"), ScryptN: 1 << 10}
	s1, err := keys.Secret(ctx, "symkey-group", 32)
	if err != nil {
		t.Fatal(err)
	}
	if len(s1) != 32 || bytes.Equal(s1, make([]byte, 32)) {
		t.Fatalf("secret = %x: want 32 random bytes", s1)
	}
	s2, err := keys.Secret(ctx, "symkey-group", 32)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s1, s2) {
		t.Error("the secret changed when it was opened again")
	}
	raw, err := os.ReadFile(filepath.Join(dir, "symkey-group.key"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, s1) {
		t.Error("the secret is in the file in clear")
	}
	if fi, _ := os.Stat(filepath.Join(dir, "symkey-group.key")); fi.Mode().Perm() != 0o600 {
		t.Errorf("secret file mode %v, want 0600", fi.Mode().Perm())
	}
	wrong := &pki.FileKeys{Dir: dir, Passphrase: []byte("line 5")}
	if _, err := wrong.Secret(ctx, "symkey-group", 32); station.KindOf(err) != station.KindUnauthorized {
		t.Errorf("wrong passphrase: err = %v, want Unauthorized", err)
	}
	none := &pki.FileKeys{Dir: dir}
	if _, err := none.Secret(ctx, "other", 32); station.KindOf(err) != station.KindInvalid {
		t.Errorf("no passphrase: err = %v, want Invalid", err)
	}
	if _, err := keys.CreateKey(ctx, "root", pki.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.Secret(ctx, "root", 32); station.KindOf(err) != station.KindInvalid {
		t.Errorf("a signing key opened as a secret: err = %v, want Invalid", err)
	}
}
