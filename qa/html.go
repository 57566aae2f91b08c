package qa

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// WriteHTML writes the report as one self-contained HTML page: a summary
// with the yield, per scenario a timing chart of every unit's steps (inline
// SVG, one row per unit, so parallel slots show side by side), step
// timings, and the raw evidence (each run as recorded, the station's
// counters).
func WriteHTML(w io.Writer, rep *Report) error {
	v := htmlView{Report: rep, Generated: rep.Started.Add(rep.Duration).UTC().Format(time.DateTime + " UTC")}
	c := rep.Count()
	v.Met, v.NotMet, v.NotAvailable = c[Met], c[NotMet], c[NotAvailable]
	for _, s := range rep.Scenarios {
		p, t := s.Yield()
		v.Passed += p
		v.Units += t
		v.Scenarios = append(v.Scenarios, scenarioView(s))
	}
	v.Yield = percent(v.Passed, v.Units)
	if err := page.Execute(w, v); err != nil {
		return fmt.Errorf("write HTML report: %w", err)
	}
	return nil
}

type htmlView struct {
	*Report
	Generated                 string
	Met, NotMet, NotAvailable int
	Passed, Units             int
	Yield                     string

	Scenarios []scView
}

type scView struct {
	*ScenarioResult
	Class    string
	Yield    string
	Faults   string
	Expect   string
	Chart    template.HTML
	Steps    []stepStat
	Evidence []Evidence
	Runs     string // the runs as recorded, JSON
}

type stepStat struct {
	Name           string
	Count, Failed  int
	Mean, Max, Sum string
}

func scenarioView(s *ScenarioResult) scView {
	v := scView{ScenarioResult: s, Class: strings.ReplaceAll(string(s.Outcome), " ", "-")}
	p, t := s.Yield()
	v.Yield = fmt.Sprintf("%d/%d (%s)", p, t, percent(p, t))
	if sc := s.Scenario; sc != nil {
		var f, e []string
		for _, x := range sc.Faults {
			f = append(f, x.String())
		}
		for _, x := range sc.Expect {
			e = append(e, x.String())
		}
		v.Faults, v.Expect = strings.Join(f, "; "), strings.Join(e, "; ")
	}
	v.Chart = chart(s)
	v.Steps = stepStats(s)
	v.Evidence = s.Evidence
	b, err := json.MarshalIndent(s.Units, "", "  ")
	if err == nil {
		v.Runs = string(b)
	}
	return v
}

func percent(p, t int) string {
	if t == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f %%", 100*float64(p)/float64(t))
}

func stepStats(s *ScenarioResult) []stepStat {
	type acc struct {
		n, failed int
		sum, max  time.Duration
		first     int
	}
	m := map[string]*acc{}
	order := 0
	for _, u := range s.Units {
		if u.Run == nil {
			continue
		}
		for _, st := range u.Run.Steps {
			a := m[st.Name]
			if a == nil {
				a = &acc{first: order}
				m[st.Name] = a
				order++
			}
			if st.Status == station.StepSkip {
				continue
			}
			a.n++
			a.sum += st.Duration
			a.max = max(a.max, st.Duration)
			if st.Status == station.StepFail {
				a.failed++
			}
		}
	}
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Slice(names, func(i, j int) bool { return m[names[i]].first < m[names[j]].first })
	var out []stepStat
	for _, n := range names {
		a := m[n]
		st := stepStat{Name: n, Count: a.n, Failed: a.failed, Sum: msString(a.sum), Max: msString(a.max)}
		if a.n > 0 {
			st.Mean = msString(a.sum / time.Duration(a.n))
		}
		out = append(out, st)
	}
	return out
}

func msString(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

// stepColors gives each step of the flows its colour in the chart; steps
// not listed get grey.
var stepColors = map[string]string{
	station.StepConnect:    "#8da0cb",
	station.StepIdentify:   "#66c2a5",
	station.StepReadEK:     "#fc8d62",
	station.StepValidateEK: "#e78ac3",
	station.StepDuplicates: "#a6d854",
	station.StepEnroll:     "#ffd92f",
	station.StepConfigure:  "#e5c494",
	station.StepRegister:   "#1f78b4",
	station.StepHub:        "#33a02c",
	station.StepProduction: "#b15928",
	station.StepRecord:     "#6a3d9a",
	// The X.509 and symmetric-key methods' own steps stand where read-ek
	// and validate-ek-cert stand for TPM units.
	station.StepGenerateKey: "#fb9a99",
	station.StepIssue:       "#17becf",
	station.StepWriteChain:  "#cab2d6",
	station.StepWriteKey:    "#fdbf6f",
}

// chart draws one row per unit: its steps as bars on a time axis from the
// scenario's start. A failed step is outlined in red.
func chart(s *ScenarioResult) template.HTML {
	const (
		left, width, row, top = 90, 760, 18, 22
	)
	end := time.Duration(0)
	var units []*UnitResult
	for _, u := range s.Units {
		if u.Run == nil || len(u.Run.Steps) == 0 {
			continue
		}
		units = append(units, u)
		for _, st := range u.Run.Steps {
			end = max(end, st.Started.Add(st.Duration).Sub(s.Started))
		}
	}
	if len(units) == 0 {
		return template.HTML(`<p class="muted">No unit ran a step.</p>`)
	}
	if end <= 0 {
		end = time.Millisecond
	}
	x := func(t time.Time) float64 {
		return left + float64(width)*float64(t.Sub(s.Started))/float64(end)
	}
	height := top + row*len(units) + 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" role="img" aria-label="step timing of %s">`,
		left+width+20, height, left+width+20, height, template.HTMLEscapeString(s.Name))
	// Time axis: about six ticks at round values.
	tick := niceTick(end / 6)
	for t := time.Duration(0); t <= end; t += tick {
		px := left + float64(width)*float64(t)/float64(end)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`, px, top-4, px, top+row*len(units))
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="10" text-anchor="middle" fill="#555">%s</text>`, px, top-8, axisLabel(t))
	}
	for i, u := range units {
		y := top + i*row
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="11" text-anchor="end">%s s%d</text>`, left-6, y+12, template.HTMLEscapeString(u.Name()), u.Slot)
		for _, st := range u.Run.Steps {
			if st.Status == station.StepSkip {
				continue
			}
			x0 := x(st.Started)
			w := max(x(st.Started.Add(st.Duration))-x0, 1)
			color := stepColors[st.Name]
			if color == "" {
				color = "#999"
			}
			stroke := ""
			if st.Status == station.StepFail {
				stroke = ` stroke="#d00" stroke-width="2"`
			}
			fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"%s><title>%s %s: %s %s</title></rect>`,
				x0, y+2, w, row-4, color, stroke, template.HTMLEscapeString(u.Name()), template.HTMLEscapeString(st.Name), st.Status, msString(st.Duration))
		}
	}
	// Legend of the steps that appear.
	var seen []string
	for _, u := range units {
		for _, st := range u.Run.Steps {
			if st.Status != station.StepSkip && !slices.Contains(seen, st.Name) {
				seen = append(seen, st.Name)
			}
		}
	}
	lx, ly := float64(left), top+row*len(units)+16
	for _, name := range seen {
		color := stepColors[name]
		if color == "" {
			color = "#999"
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="10" height="10" fill="%s"/><text x="%.1f" y="%d" font-size="10">%s</text>`,
			lx, ly, color, lx+13, ly+9, template.HTMLEscapeString(name))
		lx += 20 + 6.2*float64(len(name))
		if lx > left+width-60 {
			lx, ly = left, ly+14
		}
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

func niceTick(d time.Duration) time.Duration {
	for _, t := range []time.Duration{
		time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond,
		100 * time.Millisecond, 200 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 5 * time.Second,
		10 * time.Second, 20 * time.Second, 30 * time.Second, time.Minute, 2 * time.Minute, 5 * time.Minute, 10 * time.Minute,
	} {
		if t >= d {
			return t
		}
	}
	return 30 * time.Minute
}

func axisLabel(d time.Duration) string {
	if d < time.Second && d > 0 {
		return fmt.Sprintf("%d ms", d.Milliseconds())
	}
	return fmt.Sprintf("%g s", d.Seconds())
}

var page = template.Must(template.New("report").Funcs(template.FuncMap{
	"secs":  func(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) },
	"class": func(o Outcome) string { return strings.ReplaceAll(string(o), " ", "-") },
}).Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Kiln QA report – {{.Station}}</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px} th{background:#f4f4f4}
.met{color:#187a2f;font-weight:600} .not-met{color:#c00;font-weight:600} .not-available{color:#a66b00;font-weight:600}
.badge{display:inline-block;padding:4px 12px;border-radius:4px;color:#fff;font-weight:700} .ok{background:#187a2f} .bad{background:#c00} .na{background:#a66b00}
td{white-space:nowrap} td.w{white-space:normal}
.muted{color:#777} pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:400px;font-size:12px}
.tiles{display:flex;gap:12px;margin:12px 0} .tile{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.tile b{display:block;font-size:22px}
</style></head><body>
<h1>Kiln QA report</h1>
<p class="muted">Station {{.Station}} · started {{.Started.UTC.Format "2006-01-02 15:04:05"}} UTC · {{secs .Duration}} · written {{.Generated}}</p>
<p>{{if .NotMet}}<span class="badge bad">EXPECTATIONS NOT MET</span>{{else if .NotAvailable}}<span class="badge na">EVERY SCENARIO RUN MET ITS EXPECTATIONS · {{.NotAvailable}} NOT AVAILABLE</span>{{else}}<span class="badge ok">ALL EXPECTATIONS MET</span>{{end}}</p>
<div class="tiles">
<div class="tile"><b>{{len .Scenarios}}</b>scenarios</div>
<div class="tile"><b class="met">{{.Met}}</b>met</div>
<div class="tile"><b class="not-met">{{.NotMet}}</b>not met</div>
<div class="tile"><b class="not-available">{{.NotAvailable}}</b>not available</div>
<div class="tile"><b>{{.Passed}}/{{.Units}}</b>units passed</div>
<div class="tile"><b>{{.Yield}}</b>yield (negative cases included)</div>
</div>
<table><tr><th>scenario</th><th>method</th><th>slots</th><th>units</th><th>yield</th><th>time</th><th>outcome</th><th>reason</th></tr>
{{range .Scenarios}}<tr><td><a href="#{{.Name}}">{{.Name}}</a></td><td>{{.Method}}</td><td>{{.Slots}}</td><td>{{len .Units}}</td><td>{{.Yield}}</td><td>{{secs .Duration}}</td><td class="{{.Class}}">{{.Outcome}}</td><td class="w">{{.Reason}}</td></tr>
{{end}}</table>
{{range .Scenarios}}
<h2 id="{{.Name}}">{{.Name}} <span class="{{.Class}}">{{.Outcome}}</span></h2>
{{with .Scenario}}{{if .Description}}<p>{{.Description}}</p>{{end}}{{end}}
<p class="muted">method {{.Method}} · {{.Slots}} slot(s) · yield {{.Yield}} · {{secs .Duration}}{{if .Faults}} · faults: {{.Faults}}{{end}}{{if .Expect}} · expect: {{.Expect}}{{end}}</p>
{{if .Reason}}<p class="{{.Class}}">{{.Reason}}</p>{{end}}
{{.Chart}}
{{if .Steps}}<table><tr><th>step</th><th>runs</th><th>failed</th><th>mean</th><th>max</th><th>total</th></tr>
{{range .Steps}}<tr><td>{{.Name}}</td><td>{{.Count}}</td><td>{{.Failed}}</td><td>{{.Mean}}</td><td>{{.Max}}</td><td>{{.Sum}}</td></tr>
{{end}}</table>{{end}}
<table><tr><th>unit</th><th>slot</th><th>serial</th><th>port</th><th>run</th><th>time</th><th>expected</th><th>got</th><th>outcome</th></tr>
{{range .Units}}<tr><td>{{.Name}}</td><td>{{if .Slot}}{{.Slot}}{{else}}–{{end}}</td><td>{{.Serial}}</td><td>{{.Port}}</td><td>{{if .Run}}{{.Run.ID}}{{end}}</td><td>{{secs .Duration}}</td><td class="w">{{.Expect}}</td>
<td class="w">{{if .Passed}}pass{{else if .Error}}fail at {{.Step}} ({{.Kind}}): {{.Error}}{{end}}</td><td class="w {{class .Outcome}}">{{.Outcome}}{{if .Why}}: {{.Why}}{{end}}</td></tr>
{{end}}</table>
<details><summary>Raw evidence</summary>
{{range .Evidence}}<h3>{{.Name}}</h3><pre>{{.Text}}</pre>{{end}}
<h3>Runs as recorded</h3><pre>{{.Runs}}</pre>
</details>
{{end}}
</body></html>
`))
