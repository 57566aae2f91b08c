package devserver_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/devserver"
)

// TestHubTwinFollowsReprovisioning checks what the hub does with the
// reported properties it keeps when DPS re-provisions a device: kept while
// the device data stays (same DataETag), dropped when DPS resets the data
// (a new DataETag), moved along when DPS migrates the data to another hub
// (PreviousHub), which then forgets them.
func TestHubTwinFollowsReprovisioning(t *testing.T) {
	e := startHub(t, nil)
	key := []byte("primary key of the reprovisioned device")
	put := func(hub, data, previous string) {
		e.dir.add(devserver.HubDevice{Hub: hub, DeviceID: "r1", Enabled: true, PrimaryKey: key,
			Twin: json.RawMessage(`{"mode":"` + data + `"}`), DataETag: data, PreviousHub: previous})
	}
	// session connects to hub, optionally reports patch, and returns the
	// reported properties it read first.
	session := func(hub, patch string) map[string]any {
		t.Helper()
		c := e.mustDial(t, dialer{id: "r1", username: hubUsername(hub, "r1"), password: hubSAS(hub, "r1", key, hubNow.Add(time.Hour))})
		defer c.Disconnect(50)
		_, res := subscribe(t, c, "$iothub/twin/res/#", 0)
		_, doc := getTwin(t, c, res, "1")
		if patch != "" {
			wait(t, c.Publish("$iothub/twin/PATCH/properties/reported/?$rid=2", 0, false, patch))
			receive(t, res)
		}
		rep, _ := doc["reported"].(map[string]any)
		return rep
	}
	check := func(step string, got map[string]any, want map[string]any) {
		t.Helper()
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("%s: reported (-want +got):\n%s", step, diff)
		}
	}

	put(hubA, "data-1", "")
	check("first connection", session(hubA, `{"fw":"1.0"}`), map[string]any{"$version": 1.0})
	check("same device data", session(hubA, ""), map[string]any{"fw": "1.0", "$version": 2.0})

	put(hubA, "data-2", "") // DPS reset the device data
	check("after a reset", session(hubA, `{"fw":"2.0"}`), map[string]any{"$version": 1.0})

	put(hubB, "data-2", hubA) // DPS migrated the device data to hub B
	check("migrated to hub B", session(hubB, ""), map[string]any{"fw": "2.0", "$version": 2.0})
	check("hub A forgot it", session(hubA, ""), map[string]any{"$version": 1.0})
}
