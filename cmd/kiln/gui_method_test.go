package main

import (
	"bytes"
	"testing"

	"github.com/kilnworks/kiln/station"
)

// Switching the method in Settings opens what it needs (the station CA, the
// group key), applies it to the next run and saves it to station.json.
func TestGUISettingsMethod(t *testing.T) {
	home := t.TempDir()
	e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(k string) string {
		if k == "KILN_HOME" {
			return home
		}
		return ""
	}}
	c, err := loadConfig(e)
	if err != nil {
		t.Fatal(err)
	}
	live := &liveProvisioner{p: station.Provisioner{Profile: c.profile()}}
	g := newGUISettings(e, c, live, nil)
	defer g.Close()
	pr := g.Profile()
	pr.Verify = "off"
	for _, m := range []station.Method{station.MethodX509, station.MethodSymKey} {
		pr.Method = m
		if err := g.Apply(t.Context(), pr); err != nil {
			t.Fatalf("apply %s: %v", m, err)
		}
		p := live.current()
		if p.Profile.Method != m {
			t.Errorf("provisioner method %s, want %s", p.Profile.Method, m)
		}
		if (m == station.MethodX509 && p.Issuer == nil) || (m == station.MethodSymKey && (p.SymKey == nil || len(p.SymKey.Key) != 32)) {
			t.Errorf("method %s: issuer %v, group key set %v", m, p.Issuer != nil, p.SymKey != nil)
		}
		saved, err := loadConfig(e)
		if err != nil {
			t.Fatal(err)
		}
		if saved.Method != m {
			t.Errorf("station.json method %s, want %s", saved.Method, m)
		}
	}
	pr.Method = "rfid"
	if err := g.Apply(t.Context(), pr); station.KindOf(err) != station.KindInvalid {
		t.Errorf("an unknown method: %v", err)
	}
}
