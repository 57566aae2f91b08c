package ui_test

import (
	"context"
	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/test"
	"fyne.io/fyne/v2/widget"
	"regexp"
	"slices"
	"strconv"
	"sync"

	"github.com/kilnworks/kiln/station"
)

type contextT = context.Context

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func regexpMust(s string) *regexp.Regexp { return regexp.MustCompile(s) }

// memRecords keeps runs in memory, newest first, with the store's filter
// semantics for serial and result.
type memRecords struct {
	mu   sync.Mutex
	runs []*station.Run
}

func (m *memRecords) Run(_ context.Context, id int64) (*station.Run, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range m.runs {
		if r.ID == id {
			return r, nil
		}
	}
	return nil, station.Errorf("run", station.KindNotFound, "no run %d", id)
}

func (m *memRecords) Runs(_ context.Context, f station.RunFilter) ([]*station.Run, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*station.Run
	for _, r := range m.runs {
		if (f.Serial == "" || r.Serial == f.Serial) && (f.Result == "" || r.Result == f.Result) {
			out = append(out, r)
		}
	}
	return slices.Clone(out), nil
}

func (m *memRecords) UnitBySerial(_ context.Context, serial string) (*station.Unit, error) {
	return nil, station.Errorf("unit", station.KindNotFound, "no unit %s", serial)
}

// scan types s into e and presses Enter, as a barcode wedge does.
func scan(e *widget.Entry, s string) {
	if s != "" {
		test.Type(e, s)
	}
	e.TypedKey(&fyne.KeyEvent{Name: fyne.KeyReturn})
}

func enter() *fyne.KeyEvent { return &fyne.KeyEvent{Name: fyne.KeyReturn} }
