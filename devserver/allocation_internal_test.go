package devserver

import (
	"fmt"
	"math"
	"net/netip"
	"testing"
	"time"
)

// Hashed allocation gives each hub a share of devices proportional to its
// weight, keeps a device where it was, and moves only the devices of a
// removed hub.
func TestHashedWeights(t *testing.T) {
	hubs := []LinkedHub{{Name: "a", Weight: 1}, {Name: "b", Weight: 3}, {Name: "c", Weight: 6}}
	const n = 20000
	counts := map[string]int{}
	first := make([]string, n)
	for i := range n {
		first[i] = hashed(hubs, fmt.Sprint("dev-", i)).Name
		counts[first[i]]++
	}
	for _, h := range hubs {
		want := float64(n) * float64(h.Weight) / 10
		if got := float64(counts[h.Name]); math.Abs(got-want) > 0.05*want+50 {
			t.Errorf("hub %s (weight %d): %v devices of %d, want about %.0f", h.Name, h.Weight, got, n, want)
		}
	}
	// Stable, and ignoring the case of the hub names.
	upper := []LinkedHub{{Name: "A", Weight: 1}, {Name: "B", Weight: 3}, {Name: "C", Weight: 6}}
	for i := range 200 {
		if got := hashed(upper, fmt.Sprint("dev-", i)).Name; got != map[string]string{"a": "A", "b": "B", "c": "C"}[first[i]] {
			t.Fatalf("dev-%d: %s then %s", i, first[i], got)
		}
	}
	// Without hub c, only c's devices move.
	for i := range n {
		got := hashed(hubs[:2], fmt.Sprint("dev-", i)).Name
		if first[i] != "c" && got != first[i] {
			t.Fatalf("dev-%d moved from %s to %s when c was removed", i, first[i], got)
		}
	}
	// Weight zero counts as 1.
	if z := hashed([]LinkedHub{{Name: "x"}, {Name: "y", Weight: 1}}, "dev-1"); z.Name == "" {
		t.Error("no hub")
	}
}

func TestLatenciesNearest(t *testing.T) {
	hubs := []LinkedHub{{Name: "eu"}, {Name: "us"}, {Name: "asia"}}
	lat := Latencies{
		{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: "EU", Latency: 10 * time.Millisecond},
		{Network: netip.MustParsePrefix("10.0.0.0/8"), Hub: "us", Latency: 80 * time.Millisecond},
		{Network: netip.MustParsePrefix("10.1.0.0/16"), Hub: "us", Latency: 5 * time.Millisecond},
		{Network: netip.MustParsePrefix("10.2.0.0/16"), Hub: "us", Latency: 10 * time.Millisecond},
		{Network: netip.MustParsePrefix("2001:db8::/32"), Hub: "asia", Latency: time.Millisecond},
	}
	names := func(hs []LinkedHub) string {
		var s []string
		for _, h := range hs {
			s = append(s, h.Name)
		}
		return fmt.Sprint(s)
	}
	tests := []struct {
		addr string
		want string
	}{
		{"10.9.9.9", "[eu]"},          // 10 ms beats 80 ms
		{"10.1.2.3", "[us]"},          // the /16 is more specific than the /8
		{"10.2.2.2", "[eu us]"},       // a tie
		{"192.0.2.1", "[eu us asia]"}, // no latency known: all
		{"::ffff:10.1.0.1", "[us]"},   // an IPv4-mapped address
		{"2001:db8::1", "[asia]"},     // IPv6
		{"", "[eu us asia]"},          // address unknown
	}
	for _, tt := range tests {
		var a netip.Addr
		if tt.addr != "" {
			a = netip.MustParseAddr(tt.addr)
		}
		if got := names(lat.nearest(hubs, a)); got != tt.want {
			t.Errorf("%q: %s, want %s", tt.addr, got, tt.want)
		}
	}
	for remote, want := range map[string]string{"10.1.2.3:4567": "10.1.2.3", "[::ffff:10.0.0.1]:1": "10.0.0.1", "127.0.0.1": "127.0.0.1", "pipe": "invalid IP"} {
		if got := clientAddr(remote).String(); got != want {
			t.Errorf("clientAddr(%q) = %s, want %s", remote, got, want)
		}
	}
}
