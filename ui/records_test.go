package ui_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"fyne.io/fyne/v2/storage"
	"fyne.io/fyne/v2/test"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// TestRecordsSearchShowExport: the runs of the station's session are
// found by serial and by registration ID, shown, and exported as JSON.
func TestRecordsSearchShowExport(t *testing.T) {
	recs := &memRecords{}
	var mu sync.Mutex
	saved := map[string][]byte{}
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Records = recs
		c.Save = func(name string, data []byte) (string, error) {
			mu.Lock()
			defer mu.Unlock()
			saved[name] = data
			return "/exports/" + name, nil
		}
	})
	for i, serial := range []string{"SN-000401", "SN-000402"} {
		r, _ := p.Provision(context.Background(), station.Request{Port: "/dev/ttyACM0", Serial: serial, Operator: "alice"})
		r.ID = int64(i + 1)
		recs.mu.Lock()
		recs.runs = append([]*station.Run{r}, recs.runs...)
		recs.mu.Unlock()
	}
	l.settle()
	rs := u.Records
	u.Tabs.SelectIndex(1)
	l.until(t, 5*time.Second, "two runs listed", func() bool { return len(rs.Runs()) == 2 })

	rs.Serial.SetText("SN-000402")
	rs.Search()
	l.until(t, 5*time.Second, "the serial's run", func() bool { return len(rs.Runs()) == 1 && rs.Runs()[0].Serial == "SN-000402" })

	rs.Serial.SetText("")
	test.Type(rs.RegID, "regid-sn-000401")
	rs.Search()
	l.until(t, 5*time.Second, "the registration ID's run", func() bool { return len(rs.Runs()) == 1 && rs.Runs()[0].Serial == "SN-000401" })

	rs.Show(rs.Runs()[0].ID)
	l.until(t, 5*time.Second, "the run's evidence", func() bool { return rs.Selected() != nil })
	test.Tap(rs.Export)
	l.until(t, 5*time.Second, "the export", func() bool { return strings.Contains(rs.Status(), "saved to /exports/") })
	mu.Lock()
	data := saved["kiln-run-1-SN-000401.json"]
	mu.Unlock()
	var ev ui.Evidence
	if err := json.Unmarshal(data, &ev); err != nil {
		t.Fatalf("exported evidence: %v\n%s", err, data)
	}
	if ev.Run.Serial != "SN-000401" || len(ev.Run.Steps) != len(station.TPMSteps) {
		t.Errorf("exported run %+v", ev.Run)
	}

	rs.From.SetText("yesterday")
	rs.Search()
	if !strings.Contains(rs.Status(), "2006-01-02") {
		t.Errorf("a bad date: status %q", rs.Status())
	}
}

type fakeDPS struct{ st ui.DevserverStatus }

func (f fakeDPS) Status(context.Context) (ui.DevserverStatus, error) { return f.st, nil }

// TestDevserverMasksKey: the connection string's key shows only when
// revealed.
func TestDevserverMasksKey(t *testing.T) {
	cs := "HostName=127.0.0.1:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=c2VjcmV0a2V5"
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, _, l := newStation(t, p, func(c *ui.Config) {
		c.Devserver = fakeDPS{ui.DevserverStatus{GlobalEndpoint: "127.0.0.1:8443", IDScope: "0ne00000001", ConnectionString: cs, Telemetry: 3}}
	})
	u.Tabs.SelectIndex(1)
	d := u.Devserver
	l.until(t, 5*time.Second, "the status", func() bool { return d.ConnectionString() != "" })
	if got := d.ConnectionString(); strings.Contains(got, "c2VjcmV0a2V5") || !strings.Contains(got, "SharedAccessKeyName=provisioningserviceowner") {
		t.Errorf("masked: %q", got)
	}
	test.Tap(d.Reveal)
	if got := d.ConnectionString(); got != cs {
		t.Errorf("revealed: %q", got)
	}
}

// TestRecordsSaveAs: Save as… opens a save dialog over the window, and the
// file picked there receives the run's evidence.
func TestRecordsSaveAs(t *testing.T) {
	recs := &memRecords{}
	p := &scripted{steps: station.TPMSteps, base: base()}
	u, w, l := newStation(t, p, func(c *ui.Config) { c.Records = recs })
	r, _ := p.Provision(context.Background(), station.Request{Port: "/dev/ttyACM0", Serial: "SN-000411", Operator: "alice"})
	r.ID = 7
	recs.mu.Lock()
	recs.runs = []*station.Run{r}
	recs.mu.Unlock()
	rs := u.Records
	u.Tabs.SelectIndex(1)
	if !rs.SaveAs.Disabled() {
		t.Error("Save as… is enabled with no run shown")
	}
	rs.Show(7)
	l.until(t, 5*time.Second, "the run's evidence", func() bool { return rs.Selected() != nil && !rs.SaveAs.Disabled() })
	test.Tap(rs.SaveAs)
	if w.Canvas().Overlays().Top() == nil {
		t.Fatal("Save as… opened no dialog")
	}

	path := filepath.Join(t.TempDir(), "evidence.json")
	wc, err := storage.Writer(storage.NewFileURI(path))
	if err != nil {
		t.Fatal(err)
	}
	rs.SaveTo(wc) // what the dialog does with the file picked
	l.until(t, 5*time.Second, "saved", func() bool { return strings.Contains(rs.Status(), "saved to "+path) })
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var ev ui.Evidence
	if err := json.Unmarshal(data, &ev); err != nil || ev.Run.Serial != "SN-000411" || ev.Run.ID != 7 {
		t.Errorf("saved evidence %v: %s", err, data)
	}
}
