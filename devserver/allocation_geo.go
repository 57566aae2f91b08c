package devserver

import (
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// Latency is one entry of the geoLatency map: devices whose address is in
// Network reach Hub in Latency.
type Latency struct {
	Network netip.Prefix
	Hub     string // a linked hub's name (compared ignoring case)
	Latency time.Duration
}

// Latencies is the geoLatency map of a Server (Config.Latencies), which
// stands for the geography a private server does not have. For a device at
// address a, a hub's latency is that of the hub's most specific entry (the
// longest prefix) holding a; a hub without such an entry has an unknown
// latency, which ranks after every known one. geoLatency allocation picks
// the lowest; devices of unknown address, and hubs of equal latency, are
// hashed by weight among the lowest, as DPS breaks ties.
type Latencies []Latency

// nearest returns the hubs of the lowest latency to client: all of them
// when none has a known latency.
func (l Latencies) nearest(hubs []LinkedHub, client netip.Addr) []LinkedHub {
	if len(l) == 0 || !client.IsValid() {
		return hubs
	}
	client = client.Unmap()
	var best []LinkedHub
	bestLat := time.Duration(-1) // unknown
	for _, h := range hubs {
		lat, bits := time.Duration(-1), -1
		for _, e := range l {
			if strings.EqualFold(e.Hub, h.Name) && e.Network.Contains(client) && e.Network.Bits() > bits {
				lat, bits = e.Latency, e.Network.Bits()
			}
		}
		switch {
		case lat == bestLat:
			best = append(best, h)
		case lat >= 0 && (bestLat < 0 || lat < bestLat):
			best, bestLat = []LinkedHub{h}, lat
		}
	}
	if bestLat < 0 {
		return hubs
	}
	return best
}

// check validates the map against the linked hubs. Kinds: Invalid.
func (l Latencies) check(hubs []LinkedHub) error {
	const op = "check latency map"
	for _, e := range l {
		if !e.Network.IsValid() {
			return station.Errorf(op, station.KindInvalid, "latency of hub %s: no network: give a CIDR prefix such as 10.0.0.0/8", e.Hub)
		}
		if e.Latency < 0 {
			return station.Errorf(op, station.KindInvalid, "latency of hub %s from %s is negative", e.Hub, e.Network)
		}
		found := false
		for _, h := range hubs {
			found = found || strings.EqualFold(h.Name, e.Hub)
		}
		if !found {
			return station.Errorf(op, station.KindInvalid, "the latency map names hub %q, which is not linked: link it, or remove its entries", e.Hub)
		}
	}
	return nil
}

// clientAddr returns the IP address of a remote address (host:port, or a
// bare address); the zero Addr when it is not one.
func clientAddr(remote string) netip.Addr {
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		return ap.Addr().Unmap()
	}
	host := remote
	if h, _, err := net.SplitHostPort(remote); err == nil {
		host = h
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	return a.Unmap()
}

// ParseLatencies reads a geoLatency map from text: one entry a line, as
// "NETWORK HUB LATENCY" separated by spaces or tabs, e.g.
//
//	# network       hub              latency
//	10.0.0.0/8      hub1.localhost   20ms
//	127.0.0.1       hub2.localhost   1ms
//
// NETWORK is a CIDR prefix or a single address, HUB a linked hub's name and
// LATENCY a Go duration; empty lines and text after # are ignored. The hubs
// are checked when the map is used (Config.Latencies). Kinds: Invalid,
// naming the line.
func ParseLatencies(text []byte) (Latencies, error) {
	const op = "read latency map"
	var l Latencies
	for i, line := range strings.Split(string(text), "\n") {
		if c := strings.IndexByte(line, '#'); c >= 0 {
			line = line[:c]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 3 {
			return nil, station.Errorf(op, station.KindInvalid, "line %d has %d fields: write NETWORK HUB LATENCY, like 10.0.0.0/8 hub1.localhost 20ms", i+1, len(f))
		}
		p, err := netip.ParsePrefix(f[0])
		if err != nil {
			a, aerr := netip.ParseAddr(f[0])
			if aerr != nil {
				return nil, station.Errorf(op, station.KindInvalid, "line %d: network %q is not a CIDR prefix or an address: write it like 10.0.0.0/8", i+1, f[0])
			}
			a = a.Unmap()
			p = netip.PrefixFrom(a, a.BitLen())
		}
		d, err := time.ParseDuration(f[2])
		if err != nil || d < 0 {
			return nil, station.Errorf(op, station.KindInvalid, "line %d: latency %q is not a duration: write it like 20ms", i+1, f[2])
		}
		l = append(l, Latency{Network: p.Masked(), Hub: f[1], Latency: d})
	}
	return l, nil
}
