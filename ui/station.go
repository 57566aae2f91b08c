package ui

import (
	"context"
	"fmt"
	"image/color"
	"slices"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/canvas"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/layout"
	"fyne.io/fyne/v2/widget"

	"github.com/kilnworks/kiln/station"
)

// lastKept is how many results the Station screen lists.
const lastKept = 10

// Station is the station screen: a tile per slot, the shift's counts, the
// health tiles and the last results.
type Station struct {
	u       *UI
	content fyne.CanvasObject

	// Slots are the DUT slots, side by side.
	Slots []*Slot

	shiftStart time.Time
	pass, fail int
	seen       map[string]bool // serials run this shift: first-pass yield counts first attempts
	counted    map[int64]bool  // run IDs counted this shift (live and read from the store)
	firstPass  int
	chart      *hourChart
	passText   *canvas.Text
	failText   *canvas.Text
	fpyText    *canvas.Text
	shiftLabel *widget.Label
	// Reset starts a new shift (supervisor only).
	Reset *widget.Button

	health      []*healthTile
	healthNote  *widget.Label
	last        []*station.Run
	lastBox     *fyne.Container
	historyRead bool
}

func newStation(u *UI) *Station {
	s := &Station{u: u, shiftStart: u.cfg.Now(), seen: map[string]bool{}, counted: map[int64]bool{}, chart: newHourChart()}
	if !u.cfg.ShiftStart.IsZero() {
		s.shiftStart = u.cfg.ShiftStart
	}
	ports := u.cfg.Ports
	if len(ports) == 0 {
		ports = []string{""}
	}
	var tiles []fyne.CanvasObject
	for i, p := range ports {
		sl := newSlot(s, i, len(ports), p)
		s.Slots = append(s.Slots, sl)
		tiles = append(tiles, sl.content)
	}

	s.passText = bigText("0", 36, colorInk, true)
	s.failText = bigText("0", 36, colorInk, true)
	s.fpyText = bigText("–", 36, colorInk, true)
	s.shiftLabel = widget.NewLabel("")
	s.Reset = widget.NewButton("Reset", s.resetShift)
	counts := container.NewGridWithColumns(3,
		counter("PASS", s.passText), counter("FAIL", s.failText), counter("First-pass yield", s.fpyText))
	shift := container.NewVBox(
		container.NewBorder(nil, nil, heading("Shift"), s.Reset, s.shiftLabel),
		counts, s.chart.content)

	var tilesH []fyne.CanvasObject
	for _, hc := range u.cfg.Health {
		t := newHealthTile(hc)
		s.health = append(s.health, t)
		tilesH = append(tilesH, t.content)
	}
	s.healthNote = widget.NewLabel("")
	s.healthNote.Wrapping = fyne.TextWrapWord
	s.healthNote.Hide()
	health := container.NewVBox(heading("Station health"), container.NewGridWithColumns(2, tilesH...), s.healthNote)

	s.lastBox = container.NewVBox()
	last := container.NewBorder(heading("Last results"), nil, nil, nil, container.NewVScroll(s.lastBox))

	side := container.NewBorder(container.NewVBox(shift, widget.NewSeparator(), health, widget.NewSeparator()), nil, nil, nil, last)
	s.content = container.NewBorder(nil, nil, nil, sized(side, 360), container.NewGridWithColumns(len(tiles), tiles...))
	s.showCounts()
	s.roleChanged()
	s.showLast()
	return s
}

// start reads the recent history and starts the health refresh.
func (s *Station) start() {
	u := s.u
	if u.cfg.Records != nil {
		u.goUI(func(ctx context.Context) {
			runs, err := u.cfg.Records.Runs(ctx, station.RunFilter{Limit: lastKept})
			u.cfg.Do(func() {
				if err == nil {
					// Runs finished meanwhile are newer than the history read.
					s.last = append(s.last, runs...)
					s.trimLast()
				}
				s.historyRead = true
				s.showLast()
			})
		})
	}
	if u.cfg.Records != nil && !u.cfg.ShiftStart.IsZero() {
		since := s.shiftStart
		u.goUI(func(ctx context.Context) {
			runs, err := u.cfg.Records.Runs(ctx, station.RunFilter{Since: since, Limit: 10000})
			if err != nil {
				return // the Records store tile reports a store that does not answer
			}
			u.cfg.Do(func() {
				if !s.shiftStart.Equal(since) {
					return // the shift was reset meanwhile
				}
				// Oldest first, so that first-pass yield sees first attempts first.
				for i := len(runs) - 1; i >= 0; i-- {
					r := runs[i]
					if r.Result == station.ResultRunning || r.Started.Before(since) {
						continue
					}
					at := r.Finished
					if at.IsZero() {
						at = r.Started
					}
					s.count(r, at)
				}
				s.showCounts()
			})
		})
	}
	s.refreshHealth()
	if u.cfg.HealthEvery > 0 && len(s.health) > 0 {
		u.goUI(func(ctx context.Context) {
			t := time.NewTicker(u.cfg.HealthEvery)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					s.probeHealth(ctx)
				}
			}
		})
	}
	for _, sl := range s.Slots {
		sl.start()
	}
}

// step routes a step event to the slot running on its port.
func (s *Station) step(ev station.StepEvent) {
	s.u.cfg.Do(func() {
		for _, sl := range s.Slots {
			if sl.state == slotRunning && sl.runPort == ev.Port {
				sl.stepEvent(ev)
				return
			}
		}
	})
}

// finished counts a finished run for the shift and lists it. On the UI
// goroutine.
func (s *Station) finished(r *station.Run) {
	if r == nil {
		return
	}
	s.count(r, s.u.cfg.Now())
	s.last = append([]*station.Run{r}, s.last...)
	s.trimLast()
	s.showCounts()
	s.showLast()
	s.refreshHealth()
}

// count counts a finished run that ended at t, once. On the UI goroutine.
func (s *Station) count(r *station.Run, t time.Time) {
	if r.ID != 0 {
		if s.counted[r.ID] {
			return
		}
		s.counted[r.ID] = true
	}
	if r.Result == station.ResultPass {
		s.pass++
	} else {
		s.fail++
	}
	if r.Serial != "" && !s.seen[r.Serial] {
		s.seen[r.Serial] = true
		if r.Result == station.ResultPass {
			s.firstPass++
		}
	}
	s.chart.add(t, r.Result == station.ResultPass)
}

func (s *Station) trimLast() {
	if len(s.last) > lastKept {
		s.last = s.last[:lastKept]
	}
}

func (s *Station) resetShift() {
	if s.u.role() != RoleSupervisor {
		return
	}
	s.shiftStart = s.u.cfg.Now()
	s.pass, s.fail, s.firstPass = 0, 0, 0
	s.seen = map[string]bool{}
	s.counted = map[int64]bool{}
	s.chart.reset()
	s.showCounts()
}

func (s *Station) roleChanged() {
	if s.u.role() == RoleSupervisor {
		s.Reset.Enable()
	} else {
		s.Reset.Disable()
	}
}

func (s *Station) showCounts() {
	s.passText.Text = fmt.Sprint(s.pass)
	s.failText.Text = fmt.Sprint(s.fail)
	if n := len(s.seen); n > 0 {
		s.fpyText.Text = fmt.Sprintf("%.0f%%", 100*float64(s.firstPass)/float64(n))
	} else {
		s.fpyText.Text = "–"
	}
	s.passText.Refresh()
	s.failText.Refresh()
	s.fpyText.Refresh()
	s.shiftLabel.SetText("since " + s.shiftStart.Format("15:04"))
	s.chart.show(s.shiftStart, s.u.cfg.Now())
}

// UnitsPerHour returns the bars of the units-per-hour chart, oldest first:
// the shift's hours up to the current one (at most 12).
func (s *Station) UnitsPerHour() []HourCount { return slices.Clone(s.chart.shown) }

// FirstPassYield returns the shift's first-pass yield (units that passed at
// their first run, over units run) and the number of units run.
func (s *Station) FirstPassYield() (float64, int) {
	if len(s.seen) == 0 {
		return 0, 0
	}
	return float64(s.firstPass) / float64(len(s.seen)), len(s.seen)
}

// Counts returns the shift's PASS and FAIL counts.
func (s *Station) Counts() (pass, fail int) { return s.pass, s.fail }

func (s *Station) showLast() {
	var rows []fyne.CanvasObject
	for _, r := range s.last {
		rows = append(rows, resultRow(r))
	}
	if len(rows) == 0 {
		msg := "No units yet this shift."
		if s.u.cfg.Records != nil && !s.historyRead {
			msg = "Reading the records…"
		}
		rows = append(rows, widget.NewLabel(msg))
	}
	s.lastBox.Objects = rows
	s.lastBox.Refresh()
}

// LastResults returns the serials and results listed under Last results,
// newest first.
func (s *Station) LastResults() []string {
	var out []string
	for _, r := range s.last {
		out = append(out, r.Serial+" "+string(r.Result))
	}
	return out
}

func resultRow(r *station.Run) fyne.CanvasObject {
	badge := "PASS"
	c := colorPass
	switch r.Result {
	case station.ResultFail:
		badge, c = "FAIL", colorFail
	case station.ResultRunning:
		badge, c = "…", colorMuted
	}
	b := bigText(badge, 16, c, true)
	serial := r.Serial
	if serial == "" {
		serial = "(no serial)"
	}
	when := r.Started.Local().Format("15:04:05")
	info := widget.NewLabel(fmt.Sprintf("%s  %s", when, serial))
	info.Truncation = fyne.TextTruncateEllipsis
	dur := widget.NewLabel(fmt.Sprintf("%.1f s", r.Duration().Seconds()))
	return container.NewBorder(nil, nil, sized(b, 52), dur, info)
}

func (s *Station) focusScan() {
	for _, sl := range s.Slots {
		if sl.state != slotRunning {
			sl.focus()
			return
		}
	}
}

// refreshHealth probes the health tiles off the UI goroutine.
func (s *Station) refreshHealth() {
	if len(s.health) == 0 {
		return
	}
	s.u.goUI(s.probeHealth)
}

func (s *Station) probeHealth(ctx context.Context) {
	errs := make([]error, len(s.health))
	texts := make([]string, len(s.health))
	for i, t := range s.health {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		switch {
		case t.check.Status != nil:
			texts[i], errs[i] = t.check.Status(cctx)
		case t.check.Check != nil:
			errs[i] = t.check.Check(cctx)
		}
		cancel()
	}
	if ctx.Err() != nil {
		return
	}
	s.u.cfg.Do(func() {
		var notes string
		for i, t := range s.health {
			t.show(texts[i], errs[i])
			if errs[i] != nil {
				notes += t.check.Name + ": " + errs[i].Error() + "\n"
			}
		}
		if notes == "" {
			s.healthNote.Hide()
		} else {
			s.healthNote.SetText(notes[:len(notes)-1])
			s.healthNote.Show()
		}
	})
}

// HealthAbnormal returns the names of the health tiles that show a problem.
func (s *Station) HealthAbnormal() []string {
	var out []string
	for _, t := range s.health {
		if t.err != nil {
			out = append(out, t.check.Name)
		}
	}
	return out
}

// HealthText returns what the health tile named name shows ("normal",
// "PROBLEM", or its status text), and whether there is such a tile.
func (s *Station) HealthText(name string) (string, bool) {
	for _, t := range s.health {
		if t.check.Name == name {
			return t.state.Text, true
		}
	}
	return "", false
}

// healthTile is grey when its part is normal and coloured when it is not.
type healthTile struct {
	check   HealthCheck
	bg      *canvas.Rectangle
	name    *canvas.Text
	state   *canvas.Text
	err     error
	text    string
	content fyne.CanvasObject
}

func newHealthTile(hc HealthCheck) *healthTile {
	t := &healthTile{check: hc, bg: canvas.NewRectangle(colorTile)}
	t.bg.CornerRadius = 4
	t.name = bigText(hc.Name, 14, colorInk, true)
	t.state = bigText("checking…", 13, colorMuted, false)
	t.content = container.NewStack(t.bg, container.NewPadded(container.NewVBox(t.name, t.state)))
	return t
}

func (t *healthTile) show(text string, err error) {
	t.err = err
	t.text = text
	var bg, fg color.Color = colorTile, colorInk
	state := "normal"
	if text != "" {
		state = text
	}
	if err != nil {
		bg, fg, state = colorWarn, colorInk, "PROBLEM"
		if station.KindOf(err) != station.KindUnavailable {
			bg, fg = colorFail, colorWhite
		}
	}
	t.bg.FillColor = bg
	t.name.Color, t.state.Color = fg, fg
	t.state.Text = state
	t.state.TextStyle.Bold = err != nil
	t.bg.Refresh()
	t.name.Refresh()
	t.state.Refresh()
}

func heading(s string) fyne.CanvasObject { return bigText(s, 18, colorInk, true) }

func counter(label string, value *canvas.Text) fyne.CanvasObject {
	l := bigText(label, 13, colorMuted, false)
	return container.NewVBox(l, value)
}

// sized gives o a fixed minimum width.
func sized(o fyne.CanvasObject, width float32) fyne.CanvasObject {
	return container.New(&minWidth{w: width}, o)
}

type minWidth struct{ w float32 }

func (m *minWidth) MinSize(objs []fyne.CanvasObject) fyne.Size {
	s := layout.NewStackLayout().MinSize(objs)
	return fyne.NewSize(max(s.Width, m.w), s.Height)
}

func (m *minWidth) Layout(objs []fyne.CanvasObject, size fyne.Size) {
	layout.NewStackLayout().Layout(objs, size)
}
