package devserver_test

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// TestEmbeddedSeveralHubs links three hubs served by the one embedded hub
// endpoint by host name: devices registering over HTTPS are spread over
// the hubs that apply the allocation policy by hashing, sent to the
// nearest by geoLatency, to the named one by static allocation and to the
// webhook's choice by custom allocation; each device then reaches its hub
// by the hub's name (dialling the endpoint's address, the name in the
// TLS server name and the MQTT user name), the TLS certificate made at
// start covering every name, and no other hub takes it.
func TestEmbeddedSeveralHubs(t *testing.T) {
	const hubA, hubB, hubC = "hub-a.localhost", "hub-b.localhost", "hub-c.localhost"
	hook := newWebhook(t, func(req devserver.AllocationRequest) (int, string) {
		for _, h := range req.LinkedHubs {
			if strings.HasPrefix(h, hubC+":") {
				return 200, `{"iotHubHostName":"` + h + `"}`
			}
		}
		return 500, `{}`
	})
	emb, err := devserver.StartEmbedded(t.Context(), devserver.EmbeddedConfig{
		DataDir:    t.TempDir(),
		RetryAfter: time.Second,
		Hubs: []devserver.LinkedHub{
			{Name: hubA, Weight: 1, ApplyAllocationPolicy: true},
			{Name: hubB, Weight: 1, ApplyAllocationPolicy: true},
			{Name: hubC, Weight: 1000}, // only for enrollments that name it
		},
		Latencies: devserver.Latencies{
			{Network: netip.MustParsePrefix("127.0.0.0/8"), Hub: hubA, Latency: 40 * time.Millisecond},
			{Network: netip.MustParsePrefix("127.0.0.1/32"), Hub: hubB, Latency: 2 * time.Millisecond},
		},
		WebhookClient: hook.srv.Client(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	_, port, _ := net.SplitHostPort(emb.Hub.Addr())
	name := func(host string) string { return host + ":" + port }
	if got, want := strings.Join(emb.HubNames, ","), name(hubA)+","+name(hubB)+","+name(hubC); got != want {
		t.Fatalf("HubNames %s, want %s", got, want)
	}

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(emb.TrustPEM)
	dev := &dps.DeviceClient{Endpoint: emb.DPS.Addr(), IDScope: emb.DPS.IDScope(),
		HTTP: &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}}
	svc, err := emb.ServiceClient()
	if err != nil {
		t.Fatal(err)
	}
	// enroll makes a symmetric-key enrollment for regID (edited by edit)
	// and returns its key.
	enroll := func(t *testing.T, regID string, edit func(*dps.IndividualEnrollment)) []byte {
		t.Helper()
		key := make([]byte, 32)
		rand.Read(key)
		e := &dps.IndividualEnrollment{RegistrationID: regID, Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey,
			SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(key), SecondaryKey: dps.EncodeKey(key)}}}
		if edit != nil {
			edit(e)
		}
		if _, err := svc.PutEnrollment(t.Context(), e, ""); err != nil {
			t.Fatal(err)
		}
		return key
	}
	register := func(t *testing.T, regID string, edit func(*dps.IndividualEnrollment)) (*dps.DeviceRegistrationState, []byte) {
		t.Helper()
		key := enroll(t, regID, edit)
		st, err := dev.RegisterSymmetricKey(t.Context(), regID, key, nil)
		if err != nil {
			t.Fatalf("register %s: %v", regID, err)
		}
		return st, key
	}
	// connect reaches the hub named hub at the endpoint's address, as a
	// device whose resolver maps the name there does.
	connect := func(t *testing.T, hub, deviceID string, key []byte) (*dps.HubClient, error) {
		host, _, _ := net.SplitHostPort(hub)
		return dps.ConnectHub(t.Context(), dps.HubConfig{Addr: emb.Hub.Addr(), Hub: hub, DeviceID: deviceID, Key: key,
			TLS: &tls.Config{RootCAs: roots, ServerName: host}})
	}

	t.Run("hashed spreads devices over the hubs that apply the policy, stably", func(t *testing.T) {
		// Registered at once (each waits a poll interval), then a quarter again.
		const n = 16
		ids, keys := make([]string, n), make([][]byte, n)
		for i := range n {
			ids[i] = "hashed-" + string(rune('a'+i))
			keys[i] = enroll(t, ids[i], nil)
		}
		first, again := make([]string, n), make([]string, n)
		var wg sync.WaitGroup
		errs := make(chan error, 2*n)
		for i := range n {
			wg.Go(func() {
				st, err := dev.RegisterSymmetricKey(t.Context(), ids[i], keys[i], nil)
				if err != nil {
					errs <- err
					return
				}
				first[i] = st.AssignedHub
				if i%4 == 0 {
					st, err := dev.RegisterSymmetricKey(t.Context(), ids[i], keys[i], nil)
					if err != nil {
						errs <- err
						return
					}
					again[i] = st.AssignedHub
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		count := map[string]int{}
		for i := range n {
			count[first[i]]++
			if i%4 == 0 && again[i] != first[i] {
				t.Errorf("%s moved from %s to %s", ids[i], first[i], again[i])
			}
		}
		if count[name(hubA)] == 0 || count[name(hubB)] == 0 || count[name(hubC)] != 0 || len(count) != 2 {
			t.Errorf("hubs of 16 hashed devices %v: want both %s and %s, never %s", count, name(hubA), name(hubB), name(hubC))
		}
	})

	type device struct {
		id  string
		hub string
		key []byte
	}
	var devices []device
	for _, c := range []struct {
		policy string
		edit   func(*dps.IndividualEnrollment)
		want   string
	}{
		{"geoLatency → the hub of the lowest latency from 127.0.0.1", geoLatency, name(hubB)},
		{"static → the hub the enrollment names", func(e *dps.IndividualEnrollment) {
			e.AllocationPolicy, e.IoTHubs = dps.AllocationStatic, []string{strings.ToUpper(name(hubC))}
		}, name(hubC)},
		{"custom → the webhook's choice among the linked hubs", func(e *dps.IndividualEnrollment) {
			e.AllocationPolicy = dps.AllocationCustom
			e.IoTHubs = []string{name(hubA), name(hubC)}
			e.CustomAllocationDefinition = &dps.CustomAllocationDefinition{WebhookURL: hook.srv.URL + "/allocate", APIVersion: "2021-10-01"}
		}, name(hubC)},
	} {
		t.Run(c.policy, func(t *testing.T) {
			id := "policy-" + strings.Fields(c.policy)[0]
			st, key := register(t, strings.ToLower(id), c.edit)
			if st.AssignedHub != c.want {
				t.Fatalf("assigned %s, want %s", st.AssignedHub, c.want)
			}
			devices = append(devices, device{st.DeviceID, st.AssignedHub, key})
		})
	}

	t.Run("devices reach their hub by its name, and only it", func(t *testing.T) {
		if len(devices) != 3 {
			t.Fatalf("%d devices registered", len(devices))
		}
		for _, d := range devices {
			hc, err := connect(t, d.hub, d.id, d.key)
			if err != nil {
				t.Fatalf("%s to %s: %v", d.id, d.hub, err)
			}
			if _, err := hc.SendTelemetry(t.Context(), []byte(`{"hub":"`+d.hub+`"}`), nil); err != nil {
				t.Fatal(err)
			}
			hc.Close()
			got, err := emb.Hub.WaitTelemetry(t.Context(), d.hub, d.id)
			if err != nil {
				t.Fatal(err)
			}
			if got.Hub != d.hub {
				t.Errorf("telemetry of %s recorded on %s, want %s", d.id, got.Hub, d.hub)
			}
			other := name(hubA)
			if d.hub == other {
				other = name(hubB)
			}
			if hc, err := connect(t, other, d.id, d.key); err == nil {
				hc.Close()
				t.Errorf("%s (assigned %s) was let in to %s", d.id, d.hub, other)
			} else if k := station.KindOf(err); k != station.KindUnauthorized {
				t.Errorf("%s on %s: kind %v (%v), want Unauthorized", d.id, other, k, err)
			}
		}
	})

	t.Run("the TLS certificate covers every hub name and no other", func(t *testing.T) {
		for _, host := range []string{hubA, hubB, hubC, "hub-d.localhost"} {
			conn, err := tls.Dial("tcp", emb.Hub.Addr(), &tls.Config{RootCAs: roots, ServerName: host})
			if err == nil {
				conn.Close()
			}
			if want := host != "hub-d.localhost"; (err == nil) != want {
				t.Errorf("TLS to %s: %v; want accepted %v", host, err, want)
			}
		}
	})
}

// TestEmbeddedHubsRefused: hub names with a port, a latency map naming a
// hub not linked, and a given certificate that does not cover a hub's name
// are refused with a message that says what to change.
func TestEmbeddedHubsRefused(t *testing.T) {
	_, cert, err := devserver.NewTLSIdentity()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		cfg  devserver.EmbeddedConfig
		want string
	}{
		{"a port in a hub name", devserver.EmbeddedConfig{Hubs: []devserver.LinkedHub{{Name: "hub1.localhost:8883"}}}, "without a port"},
		{"a latency map naming another hub", devserver.EmbeddedConfig{Hubs: []devserver.LinkedHub{{Name: "hub1.localhost"}},
			Latencies: devserver.Latencies{{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: "hub9.localhost", Latency: time.Millisecond}}}, "not linked"},
		{"a certificate without the hub's name", devserver.EmbeddedConfig{Hubs: []devserver.LinkedHub{{Name: "hub1.example"}},
			Certificate: &cert, TrustPEM: []byte("x")}, "does not cover hub hub1.example"},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.cfg.DataDir = t.TempDir()
			emb, err := devserver.StartEmbedded(t.Context(), c.cfg)
			if err == nil {
				emb.Close()
				t.Fatal("started")
			}
			if station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), c.want) {
				t.Errorf("err %v (kind %v), want Invalid with %q", err, station.KindOf(err), c.want)
			}
		})
	}
}

func TestParseLatencies(t *testing.T) {
	got, err := devserver.ParseLatencies([]byte("# network hub latency\n10.0.0.0/8\thub1.localhost 20ms\n\n127.0.0.1 hub2.localhost 1ms # loopback\n::ffff:10.1.2.3 hub1.localhost 1.5ms\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := devserver.Latencies{
		{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: "hub1.localhost", Latency: 20 * time.Millisecond},
		{Network: netip.MustParsePrefix("127.0.0.1/32"), Hub: "hub2.localhost", Latency: time.Millisecond},
		{Network: netip.MustParsePrefix("10.1.2.3/32"), Hub: "hub1.localhost", Latency: 1500 * time.Microsecond},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: got %v, want %v", i, got[i], want[i])
		}
	}
	for _, bad := range []string{"10.0.0.0/8 hub1", "10.0.0.0/33 hub1 1ms", "nowhere hub1 1ms", "10.0.0.0/8 hub1 soon", "10.0.0.0/8 hub1 -1ms"} {
		if _, err := devserver.ParseLatencies([]byte("# ok\n" + bad)); station.KindOf(err) != station.KindInvalid || !strings.Contains(err.Error(), "line 2") {
			t.Errorf("%q: %v, want Invalid naming line 2", bad, err)
		}
	}
}

// FuzzParseLatencies: a latency map file never panics the parser, is
// refused with KindInvalid only, and an accepted map has valid, masked
// networks and no negative latency.
func FuzzParseLatencies(f *testing.F) {
	f.Add([]byte("10.0.0.0/8 hub1.localhost 20ms\n127.0.0.1 hub2.localhost 1ms # x\n"))
	f.Add([]byte("::1 h 0s\n# only a comment"))
	f.Add([]byte("10.0.0.1/8 h 1h\n\t\n"))
	f.Fuzz(func(t *testing.T, text []byte) {
		l, err := devserver.ParseLatencies(text)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		for _, e := range l {
			if !e.Network.IsValid() || e.Network != e.Network.Masked() || e.Latency < 0 || e.Hub == "" {
				t.Fatalf("accepted entry %+v", e)
			}
		}
	})
}
