package ui

import (
	"fmt"
	"time"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/canvas"
	"fyne.io/fyne/v2/container"
)

// chartHours is how many hours the units-per-hour chart shows at most.
const chartHours = 12

// HourCount is one bar of the units-per-hour chart: the runs that ended in
// the hour starting at Hour.
type HourCount struct {
	Hour       time.Time
	Pass, Fail int
}

// hourChart draws units per hour as stacked bars with canvas primitives:
// grey for passed units, red only for failures (ISA-101).
type hourChart struct {
	hours   map[time.Time]*HourCount
	bars    *fyne.Container
	caption *canvas.Text
	content fyne.CanvasObject
	shown   []HourCount
}

func newHourChart() *hourChart {
	c := &hourChart{hours: map[time.Time]*HourCount{}}
	c.bars = container.New(&barsLayout{c: c})
	c.caption = bigText("", 13, colorMuted, false)
	c.content = container.NewBorder(nil, c.caption, nil, nil, c.bars)
	return c
}

func (c *hourChart) reset() { c.hours = map[time.Time]*HourCount{} }

// add counts a run that ended at t.
func (c *hourChart) add(t time.Time, pass bool) {
	h := t.Truncate(time.Hour)
	hc := c.hours[h]
	if hc == nil {
		hc = &HourCount{Hour: h}
		c.hours[h] = hc
	}
	if pass {
		hc.Pass++
	} else {
		hc.Fail++
	}
}

// show redraws the bars for the hours from start to now.
func (c *hourChart) show(start, now time.Time) {
	first, last := start.Truncate(time.Hour), now.Truncate(time.Hour)
	if last.Before(first) {
		last = first
	}
	if n := int(last.Sub(first)/time.Hour) + 1; n > chartHours {
		first = last.Add(-(chartHours - 1) * time.Hour)
	}
	c.shown = c.shown[:0]
	for h := first; !h.After(last); h = h.Add(time.Hour) {
		hc := HourCount{Hour: h}
		if x := c.hours[h]; x != nil {
			hc = *x
		}
		c.shown = append(c.shown, hc)
	}
	var objs []fyne.CanvasObject
	for _, hc := range c.shown {
		pass := canvas.NewRectangle(colorTile)
		fail := canvas.NewRectangle(colorFail)
		label := bigText(fmt.Sprint(hc.Pass+hc.Fail), 12, colorInk, false)
		label.Alignment = fyne.TextAlignCenter
		hour := bigText(hc.Hour.Format("15"), 12, colorMuted, false)
		hour.Alignment = fyne.TextAlignCenter
		objs = append(objs, pass, fail, label, hour)
	}
	c.bars.Objects = objs
	c.bars.Refresh()
	cur := c.shown[len(c.shown)-1]
	c.caption.Text = fmt.Sprintf("Units per hour · this hour %d (%d fail)", cur.Pass+cur.Fail, cur.Fail)
	c.caption.Refresh()
}

// barsLayout lays out four objects per bar: pass rectangle, fail rectangle
// (stacked on top), the count above and the hour below.
type barsLayout struct{ c *hourChart }

const chartHeight = 96

func (l *barsLayout) MinSize([]fyne.CanvasObject) fyne.Size { return fyne.NewSize(200, chartHeight) }

func (l *barsLayout) Layout(objs []fyne.CanvasObject, size fyne.Size) {
	n := len(l.c.shown)
	if n == 0 || len(objs) != 4*n {
		return
	}
	peak := 1
	for _, hc := range l.c.shown {
		peak = max(peak, hc.Pass+hc.Fail)
	}
	const text = 16
	slot := size.Width / float32(n)
	barW := slot * 0.7
	plot := size.Height - 2*text
	for i, hc := range l.c.shown {
		x := float32(i)*slot + (slot-barW)/2
		base := text + plot
		ph := plot * float32(hc.Pass) / float32(peak)
		fh := plot * float32(hc.Fail) / float32(peak)
		objs[4*i].Move(fyne.NewPos(x, base-ph))
		objs[4*i].Resize(fyne.NewSize(barW, ph))
		objs[4*i+1].Move(fyne.NewPos(x, base-ph-fh))
		objs[4*i+1].Resize(fyne.NewSize(barW, fh))
		objs[4*i+2].Move(fyne.NewPos(float32(i)*slot, base-ph-fh-text))
		objs[4*i+2].Resize(fyne.NewSize(slot, text))
		objs[4*i+3].Move(fyne.NewPos(float32(i)*slot, base))
		objs[4*i+3].Resize(fyne.NewSize(slot, text))
	}
}
