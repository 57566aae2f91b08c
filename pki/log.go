package pki

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/kilnworks/kiln/station"
)

// Issuance is one line of the issuance log: a leaf the station signed.
type Issuance struct {
	Serial          string    `json:"serial"`            // hex, lower case
	Subject         string    `json:"subject"`           // RFC 2253 form
	PublicKeySHA256 string    `json:"public_key_sha256"` // hex SHA-256 of the SubjectPublicKeyInfo
	KeyType         KeyType   `json:"key_type"`
	RegistrationID  string    `json:"registration_id"`
	Operator        string    `json:"operator"`
	Batch           string    `json:"batch,omitempty"`
	Shift           string    `json:"shift,omitempty"`
	Time            time.Time `json:"time"`
}

// IssuanceLog records every leaf and counts them for the caps. The station's
// store may implement it; FileLog is the default.
type IssuanceLog interface {
	// Counts returns how many leaves were recorded for batch and for shift.
	// It returns KindUnavailable when the log cannot be read.
	Counts(ctx context.Context, batch, shift string) (inBatch, inShift int, err error)
	// Record appends one issuance durably. It returns KindUnavailable when
	// the log cannot be written.
	Record(ctx context.Context, is Issuance) error
}

// FileLog is the default IssuanceLog: one JSON object a line in a file
// (mode 0600), synced after each record. Counts are kept in memory and
// rebuilt from the file when it is opened. It is safe for concurrent use.
type FileLog struct {
	path string

	mu      sync.Mutex
	f       *os.File
	batches map[string]int
	shifts  map[string]int
}

var _ IssuanceLog = (*FileLog)(nil)

// OpenFileLog opens (or creates) the log at path. Close it when done.
func OpenFileLog(path string) (*FileLog, error) {
	const op = "open issuance log"
	l := &FileLog{path: path, batches: map[string]int{}, shifts: map[string]int{}}
	err := l.each(func(is Issuance) {
		l.batches[is.Batch]++
		l.shifts[is.Shift]++
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, station.Errorf(op, station.KindUnavailable, "%w: check the CA directory's permissions", err)
	}
	l.f = f
	return l, nil
}

func (l *FileLog) each(fn func(Issuance)) error {
	f, err := os.Open(l.path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var is Issuance
		if err := json.Unmarshal(sc.Bytes(), &is); err != nil {
			return station.Errorf("read issuance log", station.KindInvalid, "%s line %d: %w: repair or move the file", l.path, line, err)
		}
		fn(is)
	}
	if err := sc.Err(); err != nil {
		return station.E("read issuance log", station.KindUnavailable, err)
	}
	return nil
}

// Counts implements IssuanceLog.
func (l *FileLog) Counts(ctx context.Context, batch, shift string) (int, int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.batches[batch], l.shifts[shift], nil
}

// Record implements IssuanceLog.
func (l *FileLog) Record(ctx context.Context, is Issuance) error {
	b, err := json.Marshal(is)
	if err != nil {
		return station.E("record issuance", station.KindInternal, err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return station.Errorf("record issuance", station.KindUnavailable, "issuance log %s is closed", l.path)
	}
	if _, err := l.f.Write(append(b, '\n')); err != nil {
		return station.E("record issuance", station.KindUnavailable, err)
	}
	if err := l.f.Sync(); err != nil {
		return station.E("record issuance", station.KindUnavailable, err)
	}
	l.batches[is.Batch]++
	l.shifts[is.Shift]++
	return nil
}

// Entries returns every recorded issuance, oldest first.
func (l *FileLog) Entries(ctx context.Context) ([]Issuance, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var all []Issuance
	err := l.each(func(is Issuance) { all = append(all, is) })
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	return all, err
}

// Close closes the file. It is safe to call more than once.
func (l *FileLog) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
