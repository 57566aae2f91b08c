package devserver_test

import (
	"strings"
	"testing"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/station"
)

// FuzzDecodeAllocationResponse feeds custom allocation webhook answers
// (seeds in testdata/fuzz): the decoder never panics, refuses with
// KindInvalid only, and never accepts a hub that was not offered.
func FuzzDecodeAllocationResponse(f *testing.F) {
	f.Add([]byte(`{"iotHubHostName":"hub1.kiln.test","initialTwin":{"tags":{"a":1},"properties":{"desired":{"fw":"2"}}},"payload":{"x":[1,2]}}`), "hub2.kiln.test")
	f.Add([]byte(`{"iotHubHostName":"HUB2.kiln.test"}`), "hub2.kiln.test")
	f.Add([]byte(`{"iotHubHostName":"hub9.kiln.test"}`), "hub2.kiln.test")
	f.Add([]byte(`{"iotHubHostName":"hub1.kiln.test","initialTwin":{"properties":{"desired":[1]}}}`), "")
	f.Add([]byte(``), "hub2.kiln.test")
	f.Fuzz(func(t *testing.T, body []byte, hub string) {
		offered := []string{"hub1.kiln.test", hub}
		res, got, err := devserver.DecodeAllocationResponse(body, offered)
		if err != nil {
			if k := station.KindOf(err); k != station.KindInvalid {
				t.Fatalf("kind %v for %v", k, err)
			}
			return
		}
		if got != offered[0] && got != offered[1] {
			t.Fatalf("accepted hub %q, offered %v", got, offered)
		}
		if !strings.EqualFold(res.IoTHubHostName, got) || got == "" {
			t.Fatalf("answer names %q, decoder returned %q", res.IoTHubHostName, got)
		}
	})
}
