package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/crypto/scrypt"
	"golang.org/x/term"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// supervisorFile is the file in the data directory that holds the
// supervisor password's scrypt hash (never the password).
const supervisorFile = "supervisor.json"

// supervisorScryptN is the scrypt cost of new supervisor hashes: the
// parameters the scrypt package recommends for interactive logins (N=2^15,
// r=8, p=1).
const supervisorScryptN = 1 << 15

// passwordHash is the stored form of the supervisor password.
type passwordHash struct {
	KDF  string `json:"kdf"` // "scrypt"
	N    int    `json:"n"`
	R    int    `json:"r"`
	P    int    `json:"p"`
	Salt []byte `json:"salt"`
	Hash []byte `json:"hash"`
}

// minPassword is the shortest supervisor password accepted.
const minPassword = 8

// setSupervisorPassword stores the scrypt hash of password in path (mode
// 0600), replacing any earlier one. n is the scrypt cost (0: the default).
func setSupervisorPassword(path, password string, n int) error {
	const op = "set supervisor password"
	if len([]rune(password)) < minPassword {
		return station.Errorf(op, station.KindInvalid, "the supervisor password is shorter than %d characters: choose a longer one", minPassword)
	}
	if n == 0 {
		n = supervisorScryptN
	}
	h := passwordHash{KDF: "scrypt", N: n, R: 8, P: 1, Salt: make([]byte, 16)}
	if _, err := rand.Read(h.Salt); err != nil {
		return station.E(op, station.KindInternal, err)
	}
	var err error
	if h.Hash, err = scrypt.Key([]byte(password), h.Salt, h.N, h.R, h.P, 32); err != nil {
		return station.E(op, station.KindInternal, err)
	}
	data, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return station.E(op, station.KindInternal, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return station.Errorf(op, station.KindUnavailable, "%v: check the data directory", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return station.Errorf(op, station.KindUnavailable, "%v: check the data directory", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return station.Errorf(op, station.KindUnavailable, "%v: check the data directory", err)
	}
	return nil
}

// guiAuth checks the supervisor password against the hash in its file,
// read at each check so that a password set meanwhile takes effect.
type guiAuth struct {
	path string
	log  *slog.Logger
	mu   sync.Mutex // one check at a time: scrypt is memory-hungry
}

var _ ui.Auth = (*guiAuth)(nil)

func (a *guiAuth) Supervisor(ctx context.Context, name, password string) error {
	const op = "supervisor login"
	a.mu.Lock()
	defer a.mu.Unlock()
	data, err := os.ReadFile(a.path)
	if errors.Is(err, fs.ErrNotExist) {
		return station.Errorf(op, station.KindNotFound, "no supervisor password is set on this station: set one with kiln gui --set-supervisor-password")
	}
	if err != nil {
		return station.Errorf(op, station.KindUnavailable, "the supervisor password file %s cannot be read (%v): check the data directory", a.path, err)
	}
	var h passwordHash
	if err := json.Unmarshal(data, &h); err != nil || h.KDF != "scrypt" || len(h.Salt) == 0 || len(h.Hash) == 0 {
		return station.Errorf(op, station.KindInternal, "the supervisor password file %s is damaged: set the password again with kiln gui --set-supervisor-password", a.path)
	}
	if err := ctx.Err(); err != nil {
		return station.E(op, station.KindUnavailable, err)
	}
	got, err := scrypt.Key([]byte(password), h.Salt, h.N, h.R, h.P, len(h.Hash))
	if err != nil {
		return station.Errorf(op, station.KindInternal, "the supervisor password file %s has unusable parameters (%v): set the password again", a.path, err)
	}
	if subtle.ConstantTimeCompare(got, h.Hash) != 1 {
		a.log.Warn("supervisor login refused", "operator", name)
		return station.Errorf(op, station.KindUnauthorized, "wrong supervisor password")
	}
	a.log.Info("supervisor logged in", "operator", name)
	return nil
}

// readNewPassword reads a new supervisor password: twice without echo from
// a terminal, or the first line of anything else (a pipe, for scripts).
func readNewPassword(in *os.File, out io.Writer) (string, error) {
	fd := int(in.Fd())
	if !term.IsTerminal(fd) {
		line, err := bufio.NewReader(in).ReadString('\n')
		if err != nil && !(errors.Is(err, io.EOF) && line != "") {
			return "", fmt.Errorf("read the supervisor password from standard input: %w", err)
		}
		return strings.TrimRight(line, "\r\n"), nil
	}
	fmt.Fprint(out, "new supervisor password: ")
	a, err := term.ReadPassword(fd)
	fmt.Fprintln(out)
	if err != nil {
		return "", err
	}
	fmt.Fprint(out, "again: ")
	b, err := term.ReadPassword(fd)
	fmt.Fprintln(out)
	if err != nil {
		return "", err
	}
	if subtle.ConstantTimeCompare(a, b) != 1 {
		return "", station.Errorf("set supervisor password", station.KindInvalid, "the two passwords differ: run the command again")
	}
	return string(a), nil
}
