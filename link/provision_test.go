package link_test

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// fakeProvisioner is a link.Provisioner with a config in memory and a
// Provision run by fn, counting runs.
type fakeProvisioner struct {
	mu   sync.Mutex
	cfg  *station.DeviceConfig
	runs atomic.Int32
	fn   func(ctx context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error)
}

func (p *fakeProvisioner) WriteConfig(_ context.Context, cfg station.DeviceConfig) error {
	if cfg.IDScope == "" {
		return station.Errorf("write config", station.KindInvalid, "no ID scope: write one")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cfg = &cfg
	return nil
}

func (p *fakeProvisioner) ReadConfig(context.Context) (station.DeviceConfig, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cfg == nil {
		return station.DeviceConfig{}, station.Errorf("read config", station.KindNotFound, "none written yet")
	}
	return *p.cfg, nil
}

func (p *fakeProvisioner) Provision(ctx context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
	p.runs.Add(1)
	return p.fn(ctx, progress)
}

var assigned = station.ProvisionReport{
	Status: "assigned", AssignedHub: "hub.example", DeviceID: "dev-1",
	TelemetrySent: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), MessageID: "m-1",
}

// provisioningPair connects a Client to Serve answering with p.
func provisioningPair(t *testing.T, p *fakeProvisioner, ccfg link.Config, hookC, hookS func(n int, b []byte) []byte) *link.Client {
	t.Helper()
	var scfg link.ServeConfig
	link.AddProvisioning(&scfg, p)
	c, _ := pair(t, newFake(), ccfg, scfg, hookC, hookS)
	return c
}

// frameOf decodes one written frame (delimiters included), or reports false.
func frameOf(b []byte) (link.Frame, bool) {
	if len(b) < 2 {
		return link.Frame{}, false
	}
	f, err := link.DecodeFrame(b[1 : len(b)-1])
	return f, err == nil
}

// dropFirst returns a write hook that drops the first frame matching want.
func dropFirst(want func(link.Frame) bool) func(n int, b []byte) []byte {
	dropped := false
	return func(_ int, b []byte) []byte {
		if f, ok := frameOf(b); ok && !dropped && want(f) {
			dropped = true
			return nil
		}
		return b
	}
}

func stages(evs []station.ProvisionProgress) []string {
	var s []string
	for _, e := range evs {
		s = append(s, e.Stage)
	}
	return s
}

func TestConfigRoundTrip(t *testing.T) {
	p := &fakeProvisioner{}
	c := provisioningPair(t, p, link.Config{}, nil, nil)

	_, err := c.ReadConfig(t.Context())
	if k := station.KindOf(err); k != station.KindNotFound {
		t.Fatalf("ReadConfig before any write: kind %v (%v), want not found", k, err)
	}
	err = c.WriteConfig(t.Context(), station.DeviceConfig{RegistrationID: "x"})
	if k := station.KindOf(err); k != station.KindInvalid {
		t.Fatalf("WriteConfig of a refused config: kind %v (%v), want invalid", k, err)
	}
	want := station.DeviceConfig{
		IDScope:        "0ne00AB12CD",
		GlobalEndpoint: "127.0.0.1:8443",
		RegistrationID: "sn-0001",
		TrustBundle:    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
	}
	if err := c.WriteConfig(t.Context(), want); err != nil {
		t.Fatal(err)
	}
	got, err := c.ReadConfig(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("ReadConfig after WriteConfig (-want +got):\n%s", diff)
	}
}

func TestProvisionStreamsEventsBeforeTheReport(t *testing.T) {
	p := &fakeProvisioner{fn: func(_ context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
		for _, s := range []string{"register", "challenge", "activated", "assigned", "telemetry"} {
			progress(station.ProvisionProgress{Stage: s, Detail: "detail of " + s})
		}
		return assigned, nil
	}}
	c := provisioningPair(t, p, link.Config{}, nil, nil)
	var evs []station.ProvisionProgress
	rep, err := c.ProvisionNow(t.Context(), func(ev station.ProvisionProgress) { evs = append(evs, ev) })
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(assigned, rep); diff != "" {
		t.Errorf("report (-want +got):\n%s", diff)
	}
	want := []string{link.StageStart, "register", "challenge", "activated", "assigned", "telemetry"}
	if diff := cmp.Diff(want, stages(evs)); diff != "" {
		t.Errorf("stages (-want +got):\n%s", diff)
	}
	if len(evs) == len(want) && evs[2].Detail != "detail of challenge" {
		t.Errorf("event detail = %q", evs[2].Detail)
	}
	for i := 1; i < len(evs); i++ {
		if evs[i].After < evs[i-1].After {
			t.Errorf("event %d (%s) is at %v, before event %d at %v", i, evs[i].Stage, evs[i].After, i-1, evs[i-1].After)
		}
	}
	if n := p.runs.Load(); n != 1 {
		t.Errorf("provisioning ran %d times, want 1", n)
	}
}

func TestProvisionErrorKeepsItsKind(t *testing.T) {
	p := &fakeProvisioner{fn: func(context.Context, func(station.ProvisionProgress)) (station.ProvisionReport, error) {
		return station.ProvisionReport{}, station.Errorf("provision", station.KindUnauthorized, "DPS refused the attestation: enroll the device")
	}}
	c := provisioningPair(t, p, link.Config{}, nil, nil)
	var evs []station.ProvisionProgress
	_, err := c.ProvisionNow(t.Context(), func(ev station.ProvisionProgress) { evs = append(evs, ev) })
	if k := station.KindOf(err); k != station.KindUnauthorized {
		t.Fatalf("kind %v (%v), want unauthorized", k, err)
	}
	if got := stages(evs); !slices.Equal(got, []string{link.StageStart}) {
		t.Errorf("stages = %v, want only start", got)
	}
}

// TestProvisionRunsOnce checks that retransmitted PROVISION requests never
// run provisioning twice: neither when the answer was lost, nor when the
// station gave up waiting while the agent was still at work.
func TestProvisionRunsOnce(t *testing.T) {
	tests := []struct {
		name        string
		work        time.Duration // silent work after the start event
		hookS       func(n int, b []byte) []byte
		wantElapsed time.Duration
		wantRetries int
	}{
		{
			name: "answer lost",
			hookS: dropFirst(func(f link.Frame) bool {
				return f.Type == link.TypeResponse && f.Cmd == link.CmdProvision
			}),
			wantElapsed: 10 * time.Second, // one idle timeout, then the cached answer
			wantRetries: 1,
		},
		{
			name:        "duplicates while running",
			work:        25 * time.Second, // the station sends again at 10 s and 20 s
			wantElapsed: 25 * time.Second,
			wantRetries: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := &fakeProvisioner{fn: func(ctx context.Context, _ func(station.ProvisionProgress)) (station.ProvisionReport, error) {
					time.Sleep(tt.work)
					return assigned, nil
				}}
				c := provisioningPair(t, p, link.Config{ProvisionTimeout: 10 * time.Second}, nil, tt.hookS)
				if _, err := c.Info(t.Context()); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				rep, err := c.ProvisionNow(t.Context(), nil)
				if err != nil {
					t.Fatal(err)
				}
				if got := time.Since(start); got != tt.wantElapsed {
					t.Errorf("answered after %v, want %v", got, tt.wantElapsed)
				}
				if rep.MessageID != assigned.MessageID {
					t.Errorf("report = %+v", rep)
				}
				if n := p.runs.Load(); n != 1 {
					t.Errorf("provisioning ran %d times, want 1", n)
				}
				if st := c.Stats(); st.Retries != tt.wantRetries {
					t.Errorf("Stats = %+v, want %d retries", st, tt.wantRetries)
				}
				// The agent still answers afterwards (the duplicates were
				// drained from the line and answered from the cache).
				if err := c.WriteConfig(t.Context(), station.DeviceConfig{IDScope: "s"}); err != nil {
					t.Errorf("WriteConfig after PROVISION: %v", err)
				}
				if n := p.runs.Load(); n != 1 {
					t.Errorf("provisioning ran %d times after the next command, want 1", n)
				}
				c.Close()
			})
		})
	}
}

// TestProvisionIdleTimeoutRestartsOnEvents checks that each event gives the
// agent another ProvisionTimeout: a run much longer than the timeout
// succeeds without a retransmission as long as events keep coming.
func TestProvisionIdleTimeoutRestartsOnEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProvisioner{fn: func(_ context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
			for range 5 {
				time.Sleep(8 * time.Second)
				progress(station.ProvisionProgress{Stage: "assigning"})
			}
			time.Sleep(8 * time.Second)
			return assigned, nil
		}}
		c := provisioningPair(t, p, link.Config{ProvisionTimeout: 10 * time.Second, Attempts: 1}, nil, nil)
		start := time.Now()
		n := 0
		if _, err := c.ProvisionNow(t.Context(), func(station.ProvisionProgress) { n++ }); err != nil {
			t.Fatalf("after %v: %v", time.Since(start), err)
		}
		if got := time.Since(start); got != 48*time.Second {
			t.Errorf("answered after %v, want 48s", got)
		}
		if n != 6 {
			t.Errorf("%d events, want 6 (start and 5 assigning)", n)
		}
		if st := c.Stats(); st.Retries != 0 {
			t.Errorf("Stats = %+v, want no retry", st)
		}
		c.Close()
	})
}

// TestProvisionSilenceTimesOut is the converse: without events the run
// fails after Attempts idle timeouts.
func TestProvisionSilenceTimesOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		p := &fakeProvisioner{fn: func(context.Context, func(station.ProvisionProgress)) (station.ProvisionReport, error) {
			<-release
			return assigned, nil
		}}
		c := provisioningPair(t, p, link.Config{ProvisionTimeout: 10 * time.Second, Attempts: 2}, nil, nil)
		start := time.Now()
		_, err := c.ProvisionNow(t.Context(), nil)
		if k := station.KindOf(err); k != station.KindUnavailable {
			t.Errorf("kind %v (%v), want unavailable", k, err)
		}
		if got := time.Since(start); got != 20*time.Second {
			t.Errorf("gave up after %v, want 2 × 10s", got)
		}
		close(release)
		c.Close()
	})
}

// TestProvisionLostRequestIsSentAgainSoon checks that a PROVISION request
// lost on the line is sent again after ProvisionStartTimeout, not after the
// long idle timeout.
func TestProvisionLostRequestIsSentAgainSoon(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProvisioner{fn: func(context.Context, func(station.ProvisionProgress)) (station.ProvisionReport, error) {
			return assigned, nil
		}}
		hookC := dropFirst(func(f link.Frame) bool { return f.Type == link.TypeRequest && f.Cmd == link.CmdProvision })
		c := provisioningPair(t, p, link.Config{ProvisionStartTimeout: 3 * time.Second}, hookC, nil)
		if _, err := c.Info(t.Context()); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if _, err := c.ProvisionNow(t.Context(), nil); err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got != 3*time.Second {
			t.Errorf("answered after %v, want one 3s start timeout", got)
		}
		if n := p.runs.Load(); n != 1 {
			t.Errorf("provisioning ran %d times, want 1", n)
		}
		c.Close()
	})
}

// TestProvisionIgnoresEventsOfOtherRequests injects events with another
// sequence number and a malformed event: neither reaches the caller.
func TestProvisionIgnoresEventsOfOtherRequests(t *testing.T) {
	p := &fakeProvisioner{fn: func(_ context.Context, progress func(station.ProvisionProgress)) (station.ProvisionReport, error) {
		progress(station.ProvisionProgress{Stage: "register"})
		return assigned, nil
	}}
	hookS := func(_ int, b []byte) []byte {
		f, ok := frameOf(b)
		if !ok || f.Type != link.TypeEvent {
			return b
		}
		stale, _ := json.Marshal(station.ProvisionProgress{Stage: "stale"})
		out := link.AppendFrame(nil, link.Frame{Type: link.TypeEvent, Seq: f.Seq - 1, Cmd: link.CmdProvision, Payload: stale})
		out = link.AppendFrame(out, link.Frame{Type: link.TypeEvent, Seq: f.Seq, Cmd: link.CmdProvision, Payload: []byte(`{"stage":""}`)})
		return append(out, b...)
	}
	c := provisioningPair(t, p, link.Config{}, nil, hookS)
	var evs []station.ProvisionProgress
	if _, err := c.ProvisionNow(t.Context(), func(ev station.ProvisionProgress) { evs = append(evs, ev) }); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{link.StageStart, "register"}, stages(evs)); diff != "" {
		t.Errorf("stages (-want +got):\n%s", diff)
	}
}

func TestDecodeProvisioningPayloads(t *testing.T) {
	tests := []struct {
		name, in string
		decode   func([]byte) error
		ok       bool
	}{
		{"config", `{"id_scope":"s","global_endpoint":"h","registration_id":"r"}`, decodeConfig, true},
		{"config with unknown field", `{"id_scope":"s","new_field":1}`, decodeConfig, true},
		{"config not an object", `["s"]`, decodeConfig, false},
		{"config trailing data", `{"id_scope":"s"}{}`, decodeConfig, false},
		{"config empty", ``, decodeConfig, false},
		{"config not UTF-8", "{\"id_scope\":\"\xff\"}", decodeConfig, false},
		{"progress", `{"stage":"register","after_ns":5}`, decodeProgress, true},
		{"progress without stage", `{"after_ns":5}`, decodeProgress, false},
		{"progress negative time", `{"stage":"x","after_ns":-1}`, decodeProgress, false},
		{"progress wrong type", `{"stage":1}`, decodeProgress, false},
		{"report", `{"status":"failed","error_code":401002}`, decodeReport, true},
		{"report without status", `{"device_id":"d"}`, decodeReport, false},
		{"report bad time", `{"status":"assigned","telemetry_sent":"yesterday"}`, decodeReport, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.decode([]byte(tt.in))
			if (err == nil) != tt.ok {
				t.Errorf("decode(%q) = %v, want ok=%v", tt.in, err, tt.ok)
			}
		})
	}
}

func decodeConfig(b []byte) error   { _, err := link.DecodeConfig(b); return err }
func decodeProgress(b []byte) error { _, err := link.DecodeProgress(b); return err }
func decodeReport(b []byte) error   { _, err := link.DecodeReport(b); return err }

// FuzzDecodeConfig checks that any payload decodes without panicking and
// that a decoded config survives an encode/decode round trip.
func FuzzDecodeConfig(f *testing.F) {
	f.Add([]byte(`{"id_scope":"0ne00AB12CD","global_endpoint":"127.0.0.1:8443","registration_id":"sn-1","trust_bundle":"-----BEGIN CERTIFICATE-----\n"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := link.DecodeConfig(b)
		if err != nil {
			return
		}
		again, _ := json.Marshal(cfg)
		cfg2, err := link.DecodeConfig(again)
		if err != nil {
			t.Fatalf("re-encoded config %s does not decode: %v", again, err)
		}
		if cfg != cfg2 {
			t.Fatalf("round trip changed %+v into %+v", cfg, cfg2)
		}
	})
}

// FuzzDecodeProgress is FuzzDecodeConfig for progress events.
func FuzzDecodeProgress(f *testing.F) {
	f.Add([]byte(`{"stage":"assigning","detail":"waiting 3s","after_ns":1500000000}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := link.DecodeProgress(b)
		if err != nil {
			return
		}
		if ev.Stage == "" || ev.After < 0 {
			t.Fatalf("decoded an event the decoder must refuse: %+v", ev)
		}
		again, _ := json.Marshal(ev)
		ev2, err := link.DecodeProgress(again)
		if err != nil || ev2 != ev {
			t.Fatalf("round trip of %+v: %+v, %v", ev, ev2, err)
		}
	})
}

// FuzzDecodeReport is FuzzDecodeConfig for provisioning reports.
func FuzzDecodeReport(f *testing.F) {
	f.Add([]byte(`{"status":"assigned","assigned_hub":"127.0.0.1:8883","device_id":"sn-1","telemetry_sent":"2026-01-02T03:04:05Z","message_id":"m"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := link.DecodeReport(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(r)
		if err != nil {
			return // a time outside what JSON can hold; nothing to round-trip
		}
		r2, err := link.DecodeReport(again)
		if err != nil {
			t.Fatalf("re-encoded report %s does not decode: %v", again, err)
		}
		if !r2.TelemetrySent.Equal(r.TelemetrySent) {
			t.Fatalf("round trip changed the time %v into %v", r.TelemetrySent, r2.TelemetrySent)
		}
		r2.TelemetrySent = r.TelemetrySent
		if r2 != r {
			t.Fatalf("round trip changed %+v into %+v", r, r2)
		}
	})
}
