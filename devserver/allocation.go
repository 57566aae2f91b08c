package devserver

import (
	"crypto/sha256"
	"encoding/binary"
	"math"
	"net/netip"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// LinkedHub is an IoT hub the devserver may assign devices to.
type LinkedHub struct {
	// Name is the hub's host name, e.g. hub1.kiln.local (compared
	// ignoring case).
	Name string
	// Weight is the hub's allocation weight for hashed allocation, 1 to
	// 1000; zero means 1.
	Weight int
	// ApplyAllocationPolicy puts the hub in the candidates of enrollments
	// that list no hubs of their own (§10). A hub without it receives only
	// devices whose enrollment names it in iotHubs or iotHubHostName.
	ApplyAllocationPolicy bool
}

// allocationError is an allocation that found no hub: the registration
// fails with its DPS error code (400208: no hub, 400209: custom allocation).
type allocationError struct {
	code    int
	message string
}

func (e *allocationError) Error() string { return e.message }

// allocate picks the hub for a registration by the policies that need no
// webhook (§10):
//
//   - the candidates are the enrollment's iotHubs (or its legacy
//     iotHubHostName) when set, otherwise the linked hubs that apply the
//     allocation policy; a hub that is not linked is never chosen;
//   - static: the enrollment's single hub;
//   - hashed (the default): weighted rendezvous hashing of the
//     registration ID over the candidates, so the same ID lands on the
//     same hub while the hubs and their weights stay the same, and each hub
//     receives a share of devices proportional to its weight;
//   - geoLatency: the candidate with the lowest latency to the device's
//     address in lat (allocation_geo.go); ties, and hubs of unknown
//     latency, are hashed as above among the lowest;
//   - custom needs the webhook (Server.allocation): an error here.
//
// It returns the hub's name as configured, or an *allocationError.
func allocate(hubs []LinkedHub, e *dps.IndividualEnrollment, registrationID string, client netip.Addr, lat Latencies) (string, error) {
	policy, named, candidates := allocationCandidates(hubs, e)
	switch {
	case strings.EqualFold(policy, dps.AllocationStatic):
		if len(named) != 1 {
			return "", &allocationError{dps.CodeHubNotSpecified,
				"Static allocation needs exactly one IoT hub in the enrollment's iotHubs."}
		}
		if len(candidates) != 1 {
			return "", &allocationError{dps.CodeHubNotSpecified,
				"The enrollment's IoT hub " + named[0] + " is not linked to this provisioning service."}
		}
		return candidates[0].Name, nil
	case strings.EqualFold(policy, dps.AllocationHashed), strings.EqualFold(policy, dps.AllocationGeoLatency):
		if len(candidates) == 0 {
			return "", &allocationError{dps.CodeHubNotSpecified,
				"No linked IoT hub is available for this enrollment: link a hub, or list one in the enrollment's iotHubs."}
		}
		if strings.EqualFold(policy, dps.AllocationGeoLatency) {
			candidates = lat.nearest(candidates, client)
		}
		return hashed(candidates, registrationID).Name, nil
	case strings.EqualFold(policy, dps.AllocationCustom):
		return "", &allocationError{dps.CodeAllocationFailed,
			"Custom allocation failed: the enrollment has no customAllocationDefinition.webhookUrl."}
	}
	return "", &allocationError{dps.CodeHubNotSpecified, "Unknown allocation policy " + policy + "."}
}

// allocationCandidates returns an enrollment's allocation policy (hashed
// when unset, static for a legacy iotHubHostName alone), the hubs it
// names, and the linked hubs it may be assigned to.
func allocationCandidates(hubs []LinkedHub, e *dps.IndividualEnrollment) (policy string, named []string, candidates []LinkedHub) {
	linked := func(name string) (LinkedHub, bool) {
		for _, h := range hubs {
			if strings.EqualFold(h.Name, name) {
				return h, true
			}
		}
		return LinkedHub{}, false
	}
	named = e.IoTHubs
	if len(named) == 0 && e.IoTHubHostName != "" {
		named = []string{e.IoTHubHostName}
	}
	policy = e.AllocationPolicy
	if policy == "" {
		policy = dps.AllocationHashed
		if len(e.IoTHubs) == 0 && e.IoTHubHostName != "" {
			policy = dps.AllocationStatic
		}
	}
	if len(named) > 0 {
		for _, n := range named {
			if h, ok := linked(n); ok {
				candidates = append(candidates, h)
			}
		}
	} else {
		for _, h := range hubs {
			if h.ApplyAllocationPolicy {
				candidates = append(candidates, h)
			}
		}
	}
	return policy, named, candidates
}

// hashed picks a hub by weighted rendezvous hashing: each hub scores
// -weight / ln(u), where u in (0, 1) is a hash of the hub and the
// registration ID, and the highest score wins.
func hashed(hubs []LinkedHub, registrationID string) LinkedHub {
	best, bestScore := hubs[0], math.Inf(-1)
	id := regKey(registrationID)
	for _, h := range hubs {
		sum := sha256.Sum256([]byte(strings.ToLower(h.Name) + "\x00" + id))
		u := (float64(binary.BigEndian.Uint64(sum[:8])>>11) + 0.5) / (1 << 53) // in (0, 1)
		w := float64(max(h.Weight, 1))
		if score := -w / math.Log(u); score > bestScore {
			best, bestScore = h, score
		}
	}
	return best
}

// checkHubs validates the configured linked hubs, at most max of them
// (zero: no limit). Kinds: Invalid.
func checkHubs(hubs []LinkedHub, max int) error {
	const op = "check linked hubs"
	if max > 0 && len(hubs) > max {
		return station.Errorf(op, station.KindInvalid, "%d linked hubs: the limit is %d; link fewer hubs, or raise the limit", len(hubs), max)
	}
	seen := map[string]bool{}
	for _, h := range hubs {
		name := strings.ToLower(h.Name)
		if name == "" || strings.ContainsAny(name, "/ ") {
			return station.Errorf(op, station.KindInvalid, "linked hub %q: give the hub's host name", h.Name)
		}
		if seen[name] {
			return station.Errorf(op, station.KindInvalid, "linked hub %s is listed twice", h.Name)
		}
		seen[name] = true
		if h.Weight < 0 || h.Weight > 1000 {
			return station.Errorf(op, station.KindInvalid, "linked hub %s: weight %d is not 0 to 1000", h.Name, h.Weight)
		}
	}
	return nil
}
