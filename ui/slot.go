package ui

import (
	"context"
	"fmt"
	"image/color"
	"slices"
	"strings"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/canvas"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/theme"
	"fyne.io/fyne/v2/widget"

	"github.com/kilnworks/kiln/station"
)

type slotState int

const (
	slotReady   slotState = iota // waiting for a scan
	slotRunning                  // a run is in progress
	slotPassed                   // showing a PASS; the next scan starts the next unit
	slotFailed                   // showing a FAIL until it is acknowledged
)

// Slot is one DUT slot's tile: port, scan field, result, steps.
type Slot struct {
	s     *Station
	index int
	state slotState

	// Port picks the slot's serial port: listed USB ports or a custom path.
	Port *widget.SelectEntry
	// Scan is the scan field: a barcode wedge types the serial and Enter.
	Scan *widget.Entry
	// Ack acknowledges a FAIL.
	Ack *widget.Button
	// Removed confirms that the unit was removed, for a slot whose port
	// presence cannot be watched (Unplug.Present nil).
	Removed *widget.Button
	// NewDUT replaces the simulated DUT (simulation mode, first slot only).
	NewDUT *widget.Button

	scanNote *widget.Label // a refused scan, or the simulation hint
	hint     string

	resultBG  *canvas.Rectangle
	verdict   *canvas.Text
	serial    *canvas.Text
	headline  *canvas.Text
	reason    *widget.Label
	reasonTh  *textTheme
	reasonBox *container.ThemeOverride

	current  *canvas.Text
	detail   *widget.Label
	progress *widget.ProgressBar
	rows     map[string]*stepRow
	order    []string
	stepsBox *fyne.Container

	runPort string
	unplug  *Unplug // the slot's removal policy; nil: no waiting
	// awaitRemoval is set from the end of a run until the unit is removed;
	// removal counts removals, so a stale poller stops.
	awaitRemoval bool
	removal      int
	run          *station.Run // the last finished run
	variant      string       // the product variant of the scanned serial
	portOptions  []string     // the ports the picker lists
	content      fyne.CanvasObject
}

type stepRow struct {
	icon *widget.Icon
	name *canvas.Text
	dur  *canvas.Text
	box  fyne.CanvasObject
}

// newSlot builds slot index of n. One slot shows its steps beside the
// result; several side by side show them under it, with smaller type.
func newSlot(s *Station, index, n int, port string) *Slot {
	u := s.u
	sl := &Slot{s: s, index: index}
	sl.Port = widget.NewSelectEntry(nil)
	sl.Port.SetPlaceHolder("serial port, e.g. /dev/ttyACM0")
	sl.Port.SetText(port)
	refresh := widget.NewButtonWithIcon("", theme.ViewRefreshIcon(), sl.listPorts)
	header := container.NewBorder(nil, nil, heading(fmt.Sprintf("Slot %d", index+1)), refresh, sl.Port)
	if u.cfg.Simulator != nil && index == 0 {
		sl.NewDUT = widget.NewButtonWithIcon("New simulated DUT", theme.ContentAddIcon(), sl.replaceDUT)
		header = container.NewBorder(nil, nil, heading(fmt.Sprintf("Slot %d", index+1)), container.NewHBox(refresh, sl.NewDUT), sl.Port)
		p, serial := u.cfg.Simulator.DUT()
		if sl.Port.Text == "" {
			sl.Port.SetText(p)
		}
		sl.hint = simHint(serial)
	}

	sl.Scan = widget.NewEntry()
	sl.Scan.OnSubmitted = sl.submit
	scanBox := container.NewThemeOverride(sl.Scan, &textTheme{fg: colorInk, size: 28})
	sl.scanNote = widget.NewLabel("")
	sl.scanNote.Wrapping = fyne.TextWrapWord
	sl.Ack = widget.NewButtonWithIcon("Acknowledge failure (Enter)", theme.ConfirmIcon(), sl.acknowledge)
	sl.Ack.Importance = widget.DangerImportance
	sl.Ack.Hide()
	sl.Removed = widget.NewButtonWithIcon("Unit removed", theme.ConfirmIcon(), sl.confirmRemoved)
	sl.Removed.Hide()
	if u.cfg.Unplug != nil {
		sl.unplug = u.cfg.Unplug(index)
	}
	scanRow := container.NewBorder(nil, nil, bigText("Scan", 22, colorInk, true), container.NewHBox(sl.Ack, sl.Removed), scanBox)

	sl.resultBG = canvas.NewRectangle(colorIdle)
	sl.resultBG.CornerRadius = 6
	verdictSize, serialSize := float32(96), float32(40)
	if n > 1 {
		verdictSize, serialSize = 64, 28
	}
	sl.verdict = bigText("", verdictSize, colorInk, true)
	sl.verdict.Alignment = fyne.TextAlignCenter
	sl.serial = bigText("", serialSize, colorInk, true)
	sl.serial.Alignment = fyne.TextAlignCenter
	sl.headline = bigText("", 24, colorInk, true)
	sl.headline.Alignment = fyne.TextAlignCenter
	sl.reason = widget.NewLabel("")
	sl.reason.Wrapping = fyne.TextWrapWord
	sl.reason.Alignment = fyne.TextAlignCenter
	sl.reasonTh = &textTheme{fg: colorInk, size: 20}
	sl.reasonBox = container.NewThemeOverride(sl.reason, sl.reasonTh)
	result := container.NewStack(sl.resultBG, container.NewPadded(container.NewVBox(
		sl.verdict, sl.serial, sl.headline, sl.reasonBox)))

	sl.current = bigText("", 28, colorInk, true)
	sl.detail = widget.NewLabel("")
	sl.detail.Truncation = fyne.TextTruncateEllipsis
	sl.progress = widget.NewProgressBar()
	sl.progress.TextFormatter = func() string {
		return fmt.Sprintf("%d of %d steps", int(sl.progress.Value), int(sl.progress.Max))
	}
	sl.stepsBox = container.NewVBox()
	sl.setSteps(u.cfg.Provisioner.Steps())
	steps := container.NewBorder(container.NewVBox(heading("Step"), sl.current, sl.detail, sl.progress), nil, nil, nil, container.NewVScroll(sl.stepsBox))

	top := container.NewVBox(header, scanRow, sl.scanNote)
	if n > 1 {
		split := container.NewVSplit(result, steps)
		split.Offset = 0.45
		sl.content = container.NewBorder(top, nil, nil, nil, split)
	} else {
		sl.content = container.NewBorder(top, nil, nil, sized(steps, 340), result)
	}
	sl.showReady()
	return sl
}

func simHint(serial string) string {
	return fmt.Sprintf("Simulation: the DUT on this slot is %s. Scan or type %s, or press Enter to use the serial the DUT reports.", serial, serial)
}

func (sl *Slot) start() { sl.listPorts() }

// listPorts fills the port picker off the UI goroutine.
func (sl *Slot) listPorts() {
	u := sl.s.u
	if u.cfg.ListPorts == nil {
		return
	}
	u.goUI(func(ctx context.Context) {
		ports, err := u.cfg.ListPorts()
		u.cfg.Do(func() {
			if err != nil {
				sl.note("Could not list the serial ports (" + err.Error() + "): type the port's path.")
				return
			}
			var opts []string
			for _, p := range ports {
				o := p.Path
				if p.Description != "" {
					o += "  (" + p.Description + ")"
				}
				opts = append(opts, o)
			}
			sl.portOptions = opts
			sl.Port.SetOptions(opts)
		})
	})
}

// port is the path of the picked port (without the description the picker
// lists beside it).
func (sl *Slot) port() string {
	p, _, _ := strings.Cut(strings.TrimSpace(sl.Port.Text), "  (")
	return p
}

func (sl *Slot) setSteps(names []string) {
	sl.order = names
	sl.rows = map[string]*stepRow{}
	var objs []fyne.CanvasObject
	for _, n := range names {
		r := &stepRow{icon: widget.NewIcon(theme.RadioButtonIcon()), name: bigText(StepTitle(n), 17, colorInk, false), dur: bigText("", 17, colorMuted, false)}
		r.box = container.NewBorder(nil, nil, r.icon, r.dur, r.name)
		sl.rows[n] = r
		objs = append(objs, r.box)
	}
	sl.stepsBox.Objects = objs
	sl.stepsBox.Refresh()
	sl.progress.Max = float64(len(names))
	sl.progress.SetValue(0)
}

// submit is Enter in the scan field: start a run, or acknowledge a FAIL.
func (sl *Slot) submit(text string) {
	text = strings.TrimSpace(text)
	u := sl.s.u
	switch sl.state {
	case slotRunning:
		sl.Scan.SetText("")
		sl.note("A unit is running on this slot: wait for its result.")
		return
	case slotFailed:
		sl.Scan.SetText("")
		if text != "" {
			sl.note("Acknowledge the failure first (press Enter on the empty scan field, or the button), then scan " + text + " again.")
			return
		}
		sl.acknowledge()
		return
	}
	if sl.awaitRemoval {
		sl.Scan.SetText("")
		sl.note(sl.removeText())
		return
	}
	switch {
	case strings.TrimSpace(u.OperatorName()) == "":
		sl.note("Enter your name under Operator first: it is written on every record.")
		return
	case sl.port() == "":
		sl.note("Pick the slot's serial port first.")
		return
	case text != "" && u.serialPattern != nil && !u.serialPattern.MatchString(text):
		sl.Scan.SetText("")
		sl.note(fmt.Sprintf("%q is not a serial number of this product (format %s): rescan the unit's label.", text, u.serialPattern))
		return
	case text != "" && len(u.cfg.Variants) > 0 && VariantOf(u.cfg.Variants, text) == "":
		sl.Scan.SetText("")
		sl.note(fmt.Sprintf("%q is no known variant's serial (prefixes %s): rescan the unit's label, or set the unit aside.", text, prefixes(u.cfg.Variants)))
		return
	}
	sl.startRun(station.Request{Port: sl.port(), Serial: text, Operator: strings.TrimSpace(u.OperatorName())})
}

// startRun starts a provisioning run off the UI goroutine.
func (sl *Slot) startRun(req station.Request) {
	u := sl.s.u
	sl.state = slotRunning
	sl.runPort = req.Port
	sl.Scan.SetText("")
	sl.Scan.Disable()
	sl.Port.Disable()
	if sl.NewDUT != nil {
		sl.NewDUT.Disable()
	}
	sl.setSteps(u.cfg.Provisioner.Steps())
	serial := req.Serial
	if serial == "" {
		serial = "(serial from the DUT)"
	}
	sl.variant = VariantOf(u.cfg.Variants, req.Serial)
	headline := "Leave the unit connected"
	if sl.variant != "" {
		headline = sl.variant + " · " + headline
	}
	sl.paint(colorRunning, colorWhite, "RUNNING", serial, headline, "")
	sl.current.Text = "Starting…"
	sl.current.Refresh()
	sl.detail.SetText("")
	sl.note("")
	u.goUI(func(ctx context.Context) {
		r, err := u.cfg.Provisioner.Provision(ctx, req)
		u.cfg.Do(func() { sl.finish(r, err) })
	})
}

// stepEvent shows a step starting or ending. On the UI goroutine.
func (sl *Slot) stepEvent(ev station.StepEvent) {
	if ev.Serial != "" {
		sl.serial.Text = ev.Serial
		sl.serial.Refresh()
	}
	row := sl.rows[ev.Step.Name]
	if !ev.Done {
		sl.current.Text = StepTitle(ev.Step.Name)
		sl.current.Refresh()
		sl.detail.SetText(strings.TrimSpace(ev.Step.Detail))
		if row != nil {
			row.icon.SetResource(theme.MediaPlayIcon())
			row.name.TextStyle.Bold = true
			row.name.Refresh()
			sl.stepsBox.Refresh()
		}
		return
	}
	if row == nil {
		return
	}
	sl.showStep(row, ev.Step)
	done := 0
	for _, n := range sl.order {
		if sl.rows[n].dur.Text != "" {
			done++
		}
	}
	sl.progress.SetValue(float64(done))
}

func (sl *Slot) showStep(row *stepRow, s station.Step) {
	row.name.TextStyle.Bold = false
	row.name.Refresh()
	switch s.Status {
	case station.StepOK:
		row.icon.SetResource(theme.ConfirmIcon())
	case station.StepWarn:
		row.icon.SetResource(theme.WarningIcon())
	case station.StepFail:
		row.icon.SetResource(theme.ErrorIcon())
	case station.StepSkip:
		row.icon.SetResource(theme.MediaSkipNextIcon())
	}
	if s.Status == station.StepSkip {
		row.dur.Text = "skipped"
	} else {
		row.dur.Text = duration(s.Duration)
	}
	row.dur.Refresh()
	sl.stepsBox.Refresh()
}

func duration(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%d µs", d.Microseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%d ms", d.Milliseconds())
	default:
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
}

// finish shows a finished run. On the UI goroutine.
func (sl *Slot) finish(r *station.Run, err error) {
	u := sl.s.u
	sl.run = r
	sl.Port.Enable()
	sl.Scan.Enable()
	if sl.NewDUT != nil {
		sl.NewDUT.Enable()
	}
	if r != nil {
		// The run's steps are the record: show them as recorded.
		for _, s := range r.Steps {
			if row := sl.rows[s.Name]; row != nil {
				sl.showStep(row, s)
			}
		}
		sl.progress.SetValue(float64(len(r.Steps)))
	}
	v := VerdictOf(r, err)
	serial := ""
	if r != nil {
		serial = r.Serial
	}
	if v.Title == "PASS" {
		sl.state = slotPassed
		detail := fmt.Sprintf("%.1f s · run %d · registration ID %s", r.Duration().Seconds(), r.ID, r.RegistrationID)
		if sl.variant != "" {
			detail = sl.variant + " · " + detail
		}
		sl.paint(colorPass, colorWhite, "PASS", serial, v.Headline, detail)
		sl.current.Text = "Done: scan the next unit"
		if u.cfg.Simulator != nil && sl.index == 0 {
			sl.note("Simulation: this DUT is provisioned now, and a unit is provisioned once. Press New simulated DUT for another one.")
		}
	} else {
		sl.state = slotFailed
		bg, fg := color.Color(colorFail), color.Color(colorWhite)
		if v.Duplicate {
			bg, fg = colorDuplicate, colorInk
		}
		sl.paint(bg, fg, v.Title, serial, v.Headline, v.Reason)
		sl.current.Text = "Acknowledge the failure"
		sl.Ack.Show()
		sl.Scan.SetPlaceHolder("press Enter to acknowledge")
		if u.cfg.Alert != nil {
			go u.cfg.Alert()
		}
	}
	sl.current.Refresh()
	sl.detail.SetText("")
	sl.waitRemoval()
	sl.s.finished(r)
	sl.focus()
}

// waitRemoval makes the slot refuse scans until the finished unit is
// removed: the port disappears, or the operator confirms. On the UI
// goroutine.
func (sl *Slot) waitRemoval() {
	if sl.unplug == nil {
		return
	}
	u := sl.s.u
	sl.awaitRemoval = true
	sl.removal++
	gen, port := sl.removal, sl.runPort
	if sl.state == slotPassed {
		sl.current.Text = "Remove the unit"
		sl.current.Refresh()
	}
	sl.note(sl.removeText())
	present := sl.unplug.Present
	if present == nil {
		sl.Removed.Show()
		return
	}
	u.goUI(func(ctx context.Context) {
		t := time.NewTicker(u.cfg.UnplugEvery)
		defer t.Stop()
		for present(port) {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		u.cfg.Do(func() {
			if sl.removal == gen {
				sl.removed()
			}
		})
	})
}

func (sl *Slot) removeText() string {
	if sl.unplug != nil && sl.unplug.Present == nil {
		if sl.NewDUT != nil {
			return "Remove the unit: press New simulated DUT for the next one (or Unit removed to run this one again)."
		}
		return "Remove the unit, then press Unit removed: the next scan waits for it."
	}
	return "Remove the unit: the next scan waits until its port " + sl.runPort + " disappears."
}

// confirmRemoved is the Unit removed button.
func (sl *Slot) confirmRemoved() {
	if !sl.awaitRemoval {
		return
	}
	sl.removal++
	sl.removed()
}

// removed ends the wait for the unit's removal. On the UI goroutine.
func (sl *Slot) removed() {
	sl.awaitRemoval = false
	sl.Removed.Hide()
	switch sl.state {
	case slotPassed:
		sl.current.Text = "Scan the next unit"
		sl.current.Refresh()
		sl.note("")
	case slotFailed:
		sl.note("")
	case slotReady:
		sl.showReady()
	}
	sl.focus()
}

// AwaitingRemoval reports whether the slot waits for the finished unit to
// be removed before it accepts the next scan.
func (sl *Slot) AwaitingRemoval() bool { return sl.awaitRemoval }

// acknowledge clears a FAIL so the next unit can be scanned.
func (sl *Slot) acknowledge() {
	if sl.state != slotFailed {
		return
	}
	sl.Ack.Hide()
	sl.showReady()
	sl.focus()
}

func (sl *Slot) showReady() {
	sl.state = slotReady
	sl.Scan.SetPlaceHolder("scan the unit's serial number")
	sl.paint(colorIdle, colorInk, "READY", "", "Scan a unit's label to start", "")
	sl.current.Text = ""
	sl.note("")
	if sl.awaitRemoval {
		sl.current.Text = "Remove the unit"
		sl.note(sl.removeText())
	}
	sl.current.Refresh()
}

// paint sets the result area.
func (sl *Slot) paint(bg, fg color.Color, verdict, serial, headline, reason string) {
	sl.resultBG.FillColor = bg
	sl.resultBG.Refresh()
	for _, t := range []*canvas.Text{sl.verdict, sl.serial, sl.headline} {
		t.Color = fg
	}
	sl.verdict.Text, sl.serial.Text, sl.headline.Text = verdict, serial, headline
	sl.verdict.Refresh()
	sl.serial.Refresh()
	sl.headline.Refresh()
	sl.reasonTh.fg = fg
	sl.reason.SetText(reason)
	sl.reasonBox.Refresh()
}

// note shows a message under the scan field; empty restores the hint.
func (sl *Slot) note(msg string) {
	if msg == "" {
		msg = sl.hint
	}
	sl.scanNote.SetText(msg)
}

func (sl *Slot) focus() {
	if c := fyne.CurrentApp().Driver().CanvasForObject(sl.Scan); c != nil {
		c.Focus(sl.Scan)
	}
}

// replaceDUT starts a fresh simulated DUT in place of the current one.
func (sl *Slot) replaceDUT() {
	u := sl.s.u
	if sl.state == slotRunning || u.cfg.Simulator == nil {
		return
	}
	sl.NewDUT.Disable()
	sl.Scan.Disable()
	sl.note("Starting a new simulated DUT…")
	u.goUI(func(ctx context.Context) {
		port, serial, err := u.cfg.Simulator.Replace(ctx)
		u.cfg.Do(func() {
			sl.NewDUT.Enable()
			sl.Scan.Enable()
			if err != nil {
				sl.hint = ""
				sl.note("The simulated DUT could not be started (" + err.Error() + "): restart kiln gui.")
				return
			}
			sl.Port.SetText(port)
			sl.hint = simHint(serial)
			if sl.awaitRemoval {
				sl.removal++
				sl.awaitRemoval = false
				sl.Removed.Hide()
			}
			if sl.state == slotPassed {
				sl.showReady()
			}
			sl.note("")
			sl.focus()
		})
	})
}

// Verdict returns what the result area shows: READY, RUNNING, PASS, FAIL,
// DUPLICATE or WRONG UNIT, and the serial.
func (sl *Slot) Verdict() (verdict, serial string) { return sl.verdict.Text, sl.serial.Text }

// Reason returns the headline and the reason the result area shows.
func (sl *Slot) Reason() (headline, reason string) { return sl.headline.Text, sl.reason.Text }

// CurrentStep returns the step the slot shows as current.
func (sl *Slot) CurrentStep() string { return sl.current.Text }

// Note returns the message under the scan field.
func (sl *Slot) Note() string { return sl.scanNote.Text }

// StepDurations returns the shown duration of each step ("" while pending).
func (sl *Slot) StepDurations() map[string]string {
	m := map[string]string{}
	for n, r := range sl.rows {
		m[n] = r.dur.Text
	}
	return m
}

// Variant returns the product variant of the slot's last scanned serial
// ("" when none is configured or nothing was scanned).
func (sl *Slot) Variant() string { return sl.variant }

// VariantOf returns the model of the variant whose prefix serial has (the
// longest such prefix), or "".
func VariantOf(vs []Variant, serial string) string {
	best, model := -1, ""
	for _, v := range vs {
		if strings.HasPrefix(serial, v.Prefix) && len(v.Prefix) > best {
			best, model = len(v.Prefix), v.Model
		}
	}
	return model
}

func prefixes(vs []Variant) string {
	var p []string
	for _, v := range vs {
		p = append(p, v.Prefix)
	}
	return strings.Join(p, ", ")
}

// PortOptions returns the ports the picker lists, each with its
// description.
func (sl *Slot) PortOptions() []string { return slices.Clone(sl.portOptions) }
