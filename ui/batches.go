package ui

import (
	"context"
	"errors"
	"fmt"
	"image/color"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/canvas"
	"fyne.io/fyne/v2/container"
	"fyne.io/fyne/v2/dialog"
	"fyne.io/fyne/v2/theme"
	"fyne.io/fyne/v2/widget"

	"github.com/kilnworks/kiln/station"
)

// BatchActions is what the Batches screen reads and does with batches. The
// listing and sealing are station.BatchStore's; pushing, exporting and
// enabling are the push engine's (cloudsync). cmd/kiln wires both.
//
// The long operations (Push, Export, Enable) report progress through their
// progress func, from the caller's goroutine, as often as they like: the
// screen coalesces the reports. They stop when ctx is cancelled and leave
// the batch where a later call resumes it.
type BatchActions interface {
	// Batches returns the batches matching f, newest first.
	Batches(ctx context.Context, f station.BatchFilter) ([]*station.Batch, error)
	// Batch returns batch id. Kinds: NotFound.
	Batch(ctx context.Context, id int64) (*station.Batch, error)
	// BatchUnits returns the units of batch id in the order they joined.
	// Kinds: NotFound.
	BatchUnits(ctx context.Context, id int64) ([]*station.Unit, error)
	// Seal closes the open batch id to new units. Kinds: NotFound;
	// Conflict when the batch is not open.
	Seal(ctx context.Context, id int64) error
	// Push enrolls the units of batch id in its DPS target, resuming where
	// an earlier push stopped. It returns nil when every unit is enrolled;
	// units that failed are listed by UnitErrors. Kinds: NotFound;
	// Conflict (the batch is not sealed or pushing); Unavailable (the
	// target did not answer: push again later); Unauthorized (the target
	// refused the station's credentials).
	Push(ctx context.Context, id int64, progress func(BatchProgress)) error
	// Export writes the units of batch id to the file at path in format
	// (one of ExportFormats). With handover, a sealed batch then becomes
	// exported: handed over as files instead of pushed. Kinds: NotFound;
	// Invalid (an unknown format or an unusable path); Conflict (the batch
	// cannot be exported in its state).
	Export(ctx context.Context, id int64, format string, path string, handover bool, progress func(BatchProgress)) error
	// Enable sets the enrollments of the pushed batch id to enabled in its
	// target, so its devices may register. Kinds as for Push.
	Enable(ctx context.Context, id int64, progress func(BatchProgress)) error
	// UnitErrors returns the units of batch id that the last push, export
	// or enable could not handle, with why. Kinds: NotFound.
	UnitErrors(ctx context.Context, id int64) ([]UnitError, error)
	// ExportFormats lists the export formats, the default first. It must
	// not block.
	ExportFormats() []ExportFormat
}

// ExportFormat is a file format a batch can be exported in.
type ExportFormat struct {
	ID    string // passed to Export, e.g. "dps-json"
	Label string // shown, e.g. "DPS bulk enrollment (JSON)"
	Ext   string // the file name's extension, e.g. ".json"
}

// BatchProgress is how far a long batch operation is.
type BatchProgress struct {
	// Phase names the part of the operation in progress when it has
	// several (e.g. "push", then "verify" for the read-back); the counts
	// are the phase's. "": the operation has one.
	Phase   string
	Done    int           // units handled successfully (this call and earlier ones)
	Failed  int           // units that failed in this call
	Total   int           // units in the batch
	Elapsed time.Duration // time spent by this call so far
}

// Remaining is how many units are neither done nor failed.
func (p BatchProgress) Remaining() int { return max(p.Total-p.Done-p.Failed, 0) }

// Rate is the units handled per second in this call so far (0 unknown).
func (p BatchProgress) Rate(startDone int) float64 {
	if p.Elapsed <= 0 {
		return 0
	}
	return float64(p.Done-startDone+p.Failed) / p.Elapsed.Seconds()
}

// UnitError is a unit of a batch that an operation could not handle.
type UnitError struct {
	Serial         string
	RegistrationID string
	Kind           station.Kind
	Message        string // what happened and what to do
	At             time.Time
}

// batchJob is the long operation in progress on the Batches screen.
type batchJob struct {
	op     string // "Push", "Export", "Enable"
	batch  *station.Batch
	cancel context.CancelFunc

	mu sync.Mutex
	// phase is the phase reported last; startDone, startFailed and
	// startElapsed are the counts at its first report, for the rate.
	phase        string
	startDone    int
	startFailed  int
	startElapsed time.Duration
	latest       BatchProgress
	// phases lists the phases reported, in order; last holds the last
	// report of each.
	phases  []string
	last    map[string]BatchProgress
	pending bool // a UI update is queued
	reports int
}

// BatchesScreen lists the batches and seals, pushes, exports and enables
// them. Everyone sees the batches; only a supervisor acts on them.
type BatchesScreen struct {
	u       *UI
	content fyne.CanvasObject

	// State filters the list: "all" or a batch state.
	State *widget.Select
	// The actions on the selected batch.
	Seal, Push, Export, Enable *widget.Button
	// Stop cancels the operation in progress; the batch can be resumed.
	Stop *widget.Button
	// ExportFormat and ExportPath say what Export writes where; Browse
	// picks the path with a save dialog.
	ExportFormat *widget.Select
	ExportPath   *widget.Entry
	Browse       *widget.Button
	// Handover marks a sealed batch exported once the file is written:
	// handed over as files instead of pushed.
	Handover *widget.Check
	// Progress shows the operation in progress.
	Progress *widget.ProgressBar

	list     *widget.List
	batches  []*station.Batch
	selected *station.Batch
	units    []*station.Unit
	errs     []UnitError

	title     *canvas.Text
	info      *widget.Label
	locked    *widget.Label
	status    *widget.Label
	count     *widget.Label
	jobTitle  *canvas.Text
	jobCounts *widget.Label
	jobBox    *fyne.Container
	errBox    *fyne.Container
	unitList  *widget.List
	unitHead  *canvas.Text
	job       *batchJob
	want      int64 // the batch picked last; 0: none yet
	formats   []ExportFormat
	// suggestion is the export path the screen suggested last, so that a
	// path the operator typed is kept.
	suggestion string
}

var batchStateFilter = []string{"all", "open", "sealed", "pushing", "pushed", "exported"}

func newBatches(u *UI) *BatchesScreen {
	b := &BatchesScreen{u: u, formats: u.cfg.Batches.ExportFormats()}
	b.State = widget.NewSelect(batchStateFilter, func(string) { b.Refresh() })
	b.State.Selected = "all"
	refresh := widget.NewButtonWithIcon("Refresh", theme.ViewRefreshIcon(), b.Refresh)
	b.status = widget.NewLabel("")
	b.status.Wrapping = fyne.TextWrapWord
	b.count = widget.NewLabel("")

	b.list = widget.NewList(
		func() int { return len(b.batches) },
		func() fyne.CanvasObject {
			return container.NewBorder(nil, nil, sized(bigText("EXPORTED", 14, colorInk, true), 96), widget.NewLabel("00000 units"), widget.NewLabel("batch 000  2006-01-02 customer"))
		},
		func(i widget.ListItemID, o fyne.CanvasObject) {
			bt := b.batches[i]
			row := o.(*fyne.Container)
			row.Objects[0].(*widget.Label).SetText(fmt.Sprintf("batch %d  %s", bt.ID, bt.Name))
			badge := row.Objects[1].(*fyne.Container).Objects[0].(*canvas.Text)
			badge.Text, badge.Color = strings.ToUpper(string(bt.State)), stateColor(bt.State)
			badge.Refresh()
			row.Objects[2].(*widget.Label).SetText(units(bt.Units))
		})
	b.list.OnSelected = func(i widget.ListItemID) {
		if i < 0 || i >= len(b.batches) {
			return
		}
		if id := b.batches[i].ID; id != b.want || b.selected == nil || b.selected.ID != id {
			b.Select(id)
		}
	}

	b.title = bigText("", 22, colorInk, true)
	b.info = widget.NewLabel("")
	b.info.Wrapping = fyne.TextWrapWord
	b.locked = widget.NewLabel("Sealing, pushing, exporting and enabling batches are for supervisors: ask a supervisor to log in.")
	b.locked.Wrapping = fyne.TextWrapWord

	b.Seal = widget.NewButtonWithIcon("Seal", theme.ConfirmIcon(), b.seal)
	b.Push = widget.NewButtonWithIcon("Push to DPS", theme.UploadIcon(), b.push)
	b.Push.Importance = widget.HighImportance
	b.Enable = widget.NewButtonWithIcon("Enable enrollments", theme.MediaPlayIcon(), b.enable)
	b.Export = widget.NewButtonWithIcon("Export", theme.DocumentSaveIcon(), b.export)
	var labels []string
	for _, f := range b.formats {
		labels = append(labels, f.Label)
	}
	b.ExportFormat = widget.NewSelect(labels, func(string) { b.suggestPath() })
	if len(labels) > 0 {
		b.ExportFormat.Selected = labels[0]
	}
	b.ExportPath = widget.NewEntry()
	b.ExportPath.SetPlaceHolder("file to write, e.g. /media/usb/batch-3.json")
	b.Browse = widget.NewButtonWithIcon("Browse…", theme.FolderOpenIcon(), b.browse)
	b.Handover = widget.NewCheck("Hand over: the batch is delivered as this file and will not be pushed", nil)
	actions := container.NewHBox(b.Seal, b.Push, b.Enable)
	exportRow := container.NewVBox(container.NewBorder(nil, nil, container.NewHBox(b.Export, sized(b.ExportFormat, 190)), b.Browse, b.ExportPath), b.Handover)

	b.Progress = widget.NewProgressBar()
	b.jobTitle = bigText("", 18, colorInk, true)
	b.jobCounts = widget.NewLabel("")
	b.jobCounts.Wrapping = fyne.TextWrapWord
	b.Stop = widget.NewButtonWithIcon("Stop", theme.MediaStopIcon(), b.stop)
	b.Stop.Importance = widget.WarningImportance
	b.jobBox = container.NewVBox(widget.NewSeparator(), container.NewBorder(nil, nil, nil, b.Stop, b.jobTitle), b.Progress, b.jobCounts)
	b.jobBox.Hide()

	b.errBox = container.NewVBox()
	b.unitHead = bigText("Units", 18, colorInk, true)
	b.unitList = widget.NewList(
		func() int { return len(b.units) },
		func() fyne.CanvasObject {
			l := widget.NewLabel("SN-000000  registration-id  2006-01-02 15:04:05")
			l.Truncation = fyne.TextTruncateEllipsis
			return l
		},
		func(i widget.ListItemID, o fyne.CanvasObject) {
			un := b.units[i]
			o.(*widget.Label).SetText(fmt.Sprintf("%s  %s  %s", un.Serial, un.RegistrationID, un.Created.Local().Format(time.DateTime)))
		})
	lists := container.NewVSplit(
		container.NewBorder(heading("Unit errors"), nil, nil, nil, container.NewVScroll(b.errBox)),
		container.NewBorder(b.unitHead, nil, nil, nil, b.unitList))
	lists.Offset = 0.3
	detail := container.NewBorder(
		container.NewVBox(b.title, b.info, b.locked, actions, exportRow, b.jobBox, b.status),
		nil, nil, nil, lists)

	left := container.NewBorder(
		container.NewBorder(nil, nil, heading("Batches"), container.NewHBox(b.State, refresh)),
		b.count, nil, nil, b.list)
	split := container.NewHSplit(left, container.NewPadded(detail))
	split.Offset = 0.4
	b.content = split
	b.show()
	return b
}

func units(n int) string {
	if n == 1 {
		return "1 unit"
	}
	return fmt.Sprintf("%d units", n)
}

// stateColor is the colour of a batch state's badge: grey while the batch
// fills or waits, slate while it is pushed, green once it has left.
func stateColor(s station.BatchState) color.Color {
	switch s {
	case station.BatchPushing:
		return colorRunning
	case station.BatchPushed, station.BatchExported:
		return colorPass
	}
	return colorMuted
}

// Refresh reads the batches off the UI goroutine, and the selected batch
// again.
func (b *BatchesScreen) Refresh() {
	u := b.u
	f := station.BatchFilter{Limit: 500}
	if s := b.State.Selected; s != "" && s != "all" {
		f.State = station.BatchState(s)
	}
	sel := b.want
	u.goUI(func(ctx context.Context) {
		list, err := u.cfg.Batches.Batches(ctx, f)
		u.cfg.Do(func() {
			if err != nil {
				b.count.SetText("The batches could not be read (" + err.Error() + "): check the Records store tile on the Station screen.")
				return
			}
			b.batches = list
			b.list.Refresh()
			switch n := len(list); n {
			case 0:
				b.count.SetText("No batches. A batch opens when the first unit passes.")
			case 1:
				b.count.SetText("1 batch")
			default:
				b.count.SetText(fmt.Sprintf("%d batches", n))
			}
			if b.want != sel {
				return // another batch was picked meanwhile
			}
			if sel == 0 && len(list) > 0 {
				sel = list[0].ID // the newest: usually the open one
			}
			if sel != 0 {
				b.Select(sel)
			}
		})
	})
}

// Select reads batch id's units and errors off the UI goroutine and shows
// them.
func (b *BatchesScreen) Select(id int64) {
	u := b.u
	b.want = id
	u.goUI(func(ctx context.Context) {
		bt, err := u.cfg.Batches.Batch(ctx, id)
		var us []*station.Unit
		var errs []UnitError
		if err == nil {
			us, err = u.cfg.Batches.BatchUnits(ctx, id)
		}
		if err == nil {
			errs, err = u.cfg.Batches.UnitErrors(ctx, id)
		}
		u.cfg.Do(func() {
			if b.want != id {
				return // another batch was picked meanwhile
			}
			if err != nil {
				b.status.SetText(fmt.Sprintf("Batch %d could not be read (%v).", id, err))
				return
			}
			b.selected, b.units, b.errs = bt, us, errs
			for i, x := range b.batches {
				if x.ID == bt.ID {
					b.batches[i] = bt
					b.list.RefreshItem(i)
					b.list.Select(i) // highlighted, also when picked by the program
				}
			}
			b.show()
		})
	})
}

// roleChanged shows or hides what only a supervisor may do.
func (b *BatchesScreen) roleChanged() { b.show() }

// show shows the selected batch and enables what its state allows. On the
// UI goroutine.
func (b *BatchesScreen) show() {
	bt := b.selected
	super := b.u.role() == RoleSupervisor
	if super {
		b.locked.Hide()
	} else {
		b.locked.Show()
	}
	for _, w := range []fyne.Disableable{b.Seal, b.Push, b.Export, b.Enable, b.ExportFormat, b.ExportPath, b.Browse, b.Handover} {
		w.Disable()
	}
	if bt == nil {
		b.title.Text = "No batch selected"
		b.title.Refresh()
		b.info.SetText("Pick a batch to see its units.")
		b.errBox.Objects, b.units = nil, nil
		b.errBox.Refresh()
		b.unitList.Refresh()
		return
	}
	b.title.Text = fmt.Sprintf("Batch %d · %s · %s", bt.ID, bt.Name, strings.ToUpper(string(bt.State)))
	b.title.Refresh()
	var info []string
	info = append(info, units(bt.Units)+", opened "+bt.Created.Local().Format(time.DateTime))
	if !bt.Sealed.IsZero() {
		info = append(info, "sealed "+bt.Sealed.Local().Format(time.DateTime))
	}
	if !bt.Pushed.IsZero() {
		word := "pushed"
		if bt.State == station.BatchExported {
			word = "exported"
		}
		info = append(info, word+" "+bt.Pushed.Local().Format(time.DateTime))
	}
	target := bt.TargetID
	if target == "" {
		target = "none set"
	}
	info = append(info, "DPS target "+target)
	next := map[station.BatchState]string{
		station.BatchOpen:     "Passing units join it. Seal it to close it and push or export it.",
		station.BatchSealed:   "Closed to new units: push it to its DPS target, or export it.",
		station.BatchPushing:  "A push was started and not finished: push again to resume it.",
		station.BatchPushed:   "Every unit is enrolled in the target. Enable the enrollments when the devices may register.",
		station.BatchExported: "Handed over as a file.",
	}[bt.State]
	b.info.SetText(strings.Join(info, ", ") + ".\n" + next)

	busy := b.job != nil
	if super && !busy {
		switch bt.State {
		case station.BatchOpen:
			b.Seal.Enable()
		case station.BatchSealed, station.BatchPushing:
			b.Push.Enable()
		case station.BatchPushed:
			b.Enable.Enable()
		}
		if bt.State != station.BatchOpen && bt.State != station.BatchPushing && len(b.formats) > 0 {
			for _, w := range []fyne.Disableable{b.Export, b.ExportFormat, b.ExportPath, b.Browse} {
				w.Enable()
			}
		}
		if bt.State == station.BatchSealed {
			b.Handover.Enable()
		}
	}
	if bt.State == station.BatchPushing {
		b.Push.SetText("Resume push")
	} else {
		b.Push.SetText("Push to DPS")
	}
	if b.ExportPath.Text == "" || b.exportSuggested() {
		b.suggestPath()
	}

	var rows []fyne.CanvasObject
	for _, e := range b.errs {
		l := widget.NewLabel(fmt.Sprintf("%s (%s): %s", orNone(e.Serial), e.RegistrationID, e.Message))
		l.Wrapping = fyne.TextWrapWord
		l.Importance = widget.DangerImportance
		rows = append(rows, l)
	}
	if len(rows) == 0 {
		rows = append(rows, widget.NewLabel("None."))
	}
	b.errBox.Objects = rows
	b.errBox.Refresh()
	b.unitHead.Text = "Units (" + fmt.Sprint(len(b.units)) + ")"
	b.unitHead.Refresh()
	b.unitList.Refresh()
}

func (b *BatchesScreen) exportSuggested() bool {
	return b.ExportPath.Text == b.suggestion
}

func (b *BatchesScreen) format() (ExportFormat, bool) {
	for _, f := range b.formats {
		if f.Label == b.ExportFormat.Selected {
			return f, true
		}
	}
	return ExportFormat{}, false
}

func (b *BatchesScreen) suggestPath() {
	bt := b.selected
	f, ok := b.format()
	if bt == nil || !ok {
		return
	}
	if b.ExportPath.Text != "" && !b.exportSuggested() {
		return
	}
	name := fmt.Sprintf("kiln-batch-%d-%s%s", bt.ID, fileSafe(bt.Name), f.Ext)
	if b.u.cfg.ExportDir != "" {
		name = filepath.Join(b.u.cfg.ExportDir, name)
	}
	b.suggestion = name
	b.ExportPath.SetText(name)
}

// Selected returns the batch shown.
func (b *BatchesScreen) Selected() *station.Batch { return b.selected }

// Listed returns the batches the list shows.
func (b *BatchesScreen) Listed() []*station.Batch { return b.batches }

// Status returns the message of the last action: what was done, or why
// not.
func (b *BatchesScreen) Status() string { return b.status.Text }

// UnitErrors returns the unit errors shown for the selected batch.
func (b *BatchesScreen) UnitErrors() []UnitError { return b.errs }

// JobText returns the title and the counts of the operation in progress
// (or of the last one).
func (b *BatchesScreen) JobText() (title, counts string) { return b.jobTitle.Text, b.jobCounts.Text }

// Busy reports whether an operation is in progress.
func (b *BatchesScreen) Busy() bool { return b.job != nil }

func (b *BatchesScreen) supervisor() bool {
	if b.u.role() != RoleSupervisor {
		b.status.SetText("Only a supervisor may do that: ask a supervisor to log in.")
		return false
	}
	return true
}

func (b *BatchesScreen) seal() {
	bt := b.selected
	if bt == nil || b.job != nil || !b.supervisor() {
		return
	}
	u := b.u
	b.Seal.Disable()
	b.status.SetText(fmt.Sprintf("Sealing batch %d…", bt.ID))
	u.goUI(func(ctx context.Context) {
		err := u.cfg.Batches.Seal(ctx, bt.ID)
		u.cfg.Do(func() {
			if err != nil {
				b.status.SetText(fmt.Sprintf("Batch %d was not sealed: %v", bt.ID, err))
			} else {
				b.status.SetText(fmt.Sprintf("Batch %d sealed by %s: push or export it.", bt.ID, u.OperatorName()))
			}
			b.Refresh()
		})
	})
}

func (b *BatchesScreen) push() {
	b.run("Push", func(ctx context.Context, id int64, p func(BatchProgress)) error {
		return b.u.cfg.Batches.Push(ctx, id, p)
	})
}

func (b *BatchesScreen) enable() {
	b.run("Enable", func(ctx context.Context, id int64, p func(BatchProgress)) error {
		return b.u.cfg.Batches.Enable(ctx, id, p)
	})
}

func (b *BatchesScreen) export() {
	f, ok := b.format()
	path := strings.TrimSpace(b.ExportPath.Text)
	switch {
	case !ok:
		b.status.SetText("Pick an export format first.")
		return
	case path == "":
		b.status.SetText("Give the file to export to (Browse… picks one).")
		return
	}
	handover := b.Handover.Checked && !b.Handover.Disabled()
	b.run("Export", func(ctx context.Context, id int64, p func(BatchProgress)) error {
		return b.u.cfg.Batches.Export(ctx, id, f.ID, path, handover, p)
	})
}

var verbs = map[string][2]string{
	"Push":   {"Pushing", "pushed"},
	"Export": {"Exporting", "exported"},
	"Enable": {"Enabling", "enabled"},
}

// run starts a long operation on the selected batch off the UI goroutine,
// with its progress in the job panel.
func (b *BatchesScreen) run(op string, f func(ctx context.Context, id int64, p func(BatchProgress)) error) {
	bt := b.selected
	if bt == nil || b.job != nil || !b.supervisor() {
		return
	}
	u := b.u
	ctx, cancel := context.WithCancel(u.ctx)
	job := &batchJob{op: op, batch: bt, cancel: cancel, last: map[string]BatchProgress{}}
	b.job = job
	b.show()
	b.jobBox.Show()
	b.Stop.Enable()
	b.jobTitle.Text = fmt.Sprintf("%s batch %d (%s)…", verbs[op][0], bt.ID, bt.Name)
	b.jobTitle.Refresh()
	b.Progress.Max = float64(max(bt.Units, 1))
	b.Progress.SetValue(0)
	b.jobCounts.SetText(fmt.Sprintf("0 of %d done · starting…", bt.Units))
	b.status.SetText("")
	report := func(p BatchProgress) {
		job.mu.Lock()
		if job.reports == 0 || p.Phase != job.phase {
			job.phase, job.startDone, job.startFailed, job.startElapsed = p.Phase, p.Done, p.Failed, p.Elapsed
			if _, ok := job.last[p.Phase]; !ok {
				job.phases = append(job.phases, p.Phase)
			}
		}
		job.last[p.Phase] = p
		job.latest = p
		job.reports++
		queue := !job.pending
		job.pending = true
		job.mu.Unlock()
		if queue {
			u.cfg.Do(func() {
				job.mu.Lock()
				p := job.latest
				job.pending = false
				job.mu.Unlock()
				b.showProgress(job, p)
			})
		}
	}
	u.goUI(func(_ context.Context) {
		defer cancel()
		err := f(ctx, bt.ID, report)
		stopped := ctx.Err() != nil
		u.cfg.Do(func() {
			job.mu.Lock()
			p, seen := job.latest, job.reports > 0
			var phases []string
			if len(job.phases) > 1 {
				// The counts of the first (main) phase, and the others'.
				p = job.last[job.phases[0]]
				for _, ph := range job.phases {
					q := job.last[ph]
					phases = append(phases, fmt.Sprintf("%s: %d of %d done, %d failed", ph, q.Done, q.Total, q.Failed))
				}
			}
			job.mu.Unlock()
			if seen {
				b.showProgress(job, job.latest)
			}
			if len(phases) > 0 {
				b.jobCounts.SetText(strings.Join(phases, " · "))
			}
			b.job = nil
			b.Stop.Disable()
			verb := verbs[op]
			switch {
			case stopped && (err == nil || errors.Is(err, context.Canceled)):
				b.jobTitle.Text = fmt.Sprintf("%s of batch %d stopped", op, bt.ID)
				b.status.SetText(fmt.Sprintf("Stopped: %d of %d done. Press %s again to resume.", p.Done, p.Total, op))
			case err != nil:
				b.jobTitle.Text = fmt.Sprintf("%s of batch %d did not finish", op, bt.ID)
				b.status.SetText(fmt.Sprintf("Batch %d was not %s: %v", bt.ID, verb[1], err))
			default:
				b.jobTitle.Text = fmt.Sprintf("Batch %d %s", bt.ID, verb[1])
				b.status.SetText(fmt.Sprintf("Batch %d %s by %s: %s.", bt.ID, verb[1], u.OperatorName(), units(bt.Units)))
			}
			b.jobTitle.Refresh()
			b.Refresh()
		})
	})
}

// showProgress shows a progress report of job. On the UI goroutine.
func (b *BatchesScreen) showProgress(job *batchJob, p BatchProgress) {
	job.mu.Lock()
	var r float64
	if job.phase == p.Phase {
		if el := p.Elapsed - job.startElapsed; el > 0 {
			r = float64(p.Done-job.startDone+p.Failed-job.startFailed) / el.Seconds()
		}
	}
	job.mu.Unlock()
	if p.Total > 0 {
		b.Progress.Max = float64(p.Total)
	}
	b.Progress.SetValue(float64(p.Done + p.Failed))
	s := fmt.Sprintf("%d of %d done · %d failed · %d remaining", p.Done, p.Total, p.Failed, p.Remaining())
	if p.Phase != "" {
		s = p.Phase + ": " + s
	}
	if r > 0 {
		s += fmt.Sprintf(" · %.1f units/s", r)
		if rem := p.Remaining(); rem > 0 {
			left := time.Duration(float64(rem) / r * float64(time.Second))
			if left < time.Second {
				s += " · less than a second left"
			} else {
				s += " · about " + left.Round(time.Second).String() + " left"
			}
		}
	}
	b.jobCounts.SetText(s)
}

// stop cancels the operation in progress.
func (b *BatchesScreen) stop() {
	if b.job == nil {
		return
	}
	b.job.cancel()
	b.Stop.Disable()
	b.jobTitle.Text = "Stopping…"
	b.jobTitle.Refresh()
}

// browse picks the export file with a save dialog.
func (b *BatchesScreen) browse() {
	w := windowOf(b.content)
	if w == nil {
		return
	}
	d := dialog.NewFileSave(func(wc fyne.URIWriteCloser, err error) {
		if err != nil || wc == nil {
			return
		}
		path := wc.URI().Path()
		wc.Close()
		b.ExportPath.SetText(path)
	}, w)
	d.SetFileName(filepath.Base(b.ExportPath.Text))
	d.Show()
}

// windowOf finds the window showing o.
func windowOf(o fyne.CanvasObject) fyne.Window {
	app := fyne.CurrentApp()
	if app == nil {
		return nil
	}
	c := app.Driver().CanvasForObject(o)
	if c == nil {
		return nil
	}
	for _, w := range app.Driver().AllWindows() {
		if w.Canvas() == c {
			return w
		}
	}
	return nil
}
