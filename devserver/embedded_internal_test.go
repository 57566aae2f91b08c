package devserver

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestEmbeddedHubNames: hubs are named host:port after the hub's port,
// the bare host on IoT Hub's 8883, the hub's address when none is given;
// the latency map follows the names.
func TestEmbeddedHubNames(t *testing.T) {
	given := []LinkedHub{{Name: "hub1.localhost", Weight: 2, ApplyAllocationPolicy: true}, {Name: "HUB2.localhost"}}
	lat := Latencies{{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: "hub2.LOCALHOST", Latency: time.Millisecond}}
	for _, c := range []struct {
		addr, want, wantLat string
	}{
		{"127.0.0.1:41000", "hub1.localhost:41000 HUB2.localhost:41000", "HUB2.localhost:41000"},
		{"0.0.0.0:8883", "hub1.localhost HUB2.localhost", "HUB2.localhost"},
	} {
		hubs, l, err := embeddedHubs(given, lat, c.addr)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, h := range hubs {
			names = append(names, h.Name)
		}
		if got := strings.Join(names, " "); got != c.want || l[0].Hub != c.wantLat || hubs[0].Weight != 2 || !hubs[0].ApplyAllocationPolicy {
			t.Errorf("%s: hubs %q (%+v), latency hub %q; want %q and %q", c.addr, got, hubs, l[0].Hub, c.want, c.wantLat)
		}
	}
	if given[0].Name != "hub1.localhost" || lat[0].Hub != "hub2.LOCALHOST" {
		t.Error("embeddedHubs changed its arguments")
	}
	hubs, _, err := embeddedHubs(nil, nil, "127.0.0.1:41000")
	if err != nil || len(hubs) != 1 || hubs[0].Name != "127.0.0.1:41000" || !hubs[0].ApplyAllocationPolicy {
		t.Errorf("no hubs given: %+v, %v; want one named by the address", hubs, err)
	}
}
