package devserver

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// twinKey names a device twin: hub (lower case) and device ID.
type twinKey struct{ hub, deviceID string }

// twinState is what the hub keeps of a twin: the reported properties
// (desired ones come from HubDevice.Twin) and their version, which starts
// at 1 and grows by one on every accepted patch.
type twinState struct {
	reported map[string]any
	version  int64
	dataETag string // HubDevice.DataETag the state belongs to
}

// twinGet answers $iothub/twin/GET/?$rid=R with
// $iothub/twin/res/200/?$rid=R and the twin's desired and reported
// properties, each with its $version.
func (h *Hub) twinGet(cl *mqtt.Client, s *hubSession, topic string) {
	rid := requestID(topic)
	desired, err := desiredProperties(s.device.Twin)
	if err != nil {
		h.log.Warn("twin desired properties are not a JSON object; answering with none", "hub", s.hub, "device", s.deviceID, "error", err)
		desired = []byte(`{"$version":1}`)
	}
	h.mu.Lock()
	ts := h.twin(s)
	rep := make(map[string]any, len(ts.reported)+1)
	for k, v := range ts.reported {
		rep[k] = v
	}
	rep["$version"] = ts.version
	h.mu.Unlock()
	reported, err := json.Marshal(rep)
	if err != nil {
		h.log.Error("encode reported properties", "device", s.deviceID, "error", err)
		h.reply(cl, s, twinResponse(500, rid, 0), nil)
		return
	}
	body, _ := json.Marshal(struct {
		Desired  json.RawMessage `json:"desired"`
		Reported json.RawMessage `json:"reported"`
	}{desired, reported})
	h.reply(cl, s, twinResponse(200, rid, 0), body)
}

// twinPatch applies $iothub/twin/PATCH/properties/reported/?$rid=R (a JSON
// merge patch: null removes a property) and answers
// $iothub/twin/res/204/?$rid=R&$version=N, or 400 for a body that is not a
// JSON object or names a $-property.
func (h *Hub) twinPatch(cl *mqtt.Client, s *hubSession, topic string, body []byte) {
	rid := requestID(topic)
	var patch map[string]any
	d := json.NewDecoder(bytes.NewReader(body))
	d.UseNumber()
	if err := d.Decode(&patch); err != nil || patch == nil || d.More() {
		h.log.Info("reported properties refused: not a JSON object", "hub", s.hub, "device", s.deviceID)
		h.reply(cl, s, twinResponse(400, rid, 0), nil)
		return
	}
	for k := range patch {
		if strings.HasPrefix(k, "$") {
			h.log.Info("reported properties refused: $-property", "hub", s.hub, "device", s.deviceID, "property", hubClip(k, 100))
			h.reply(cl, s, twinResponse(400, rid, 0), nil)
			return
		}
	}
	h.mu.Lock()
	ts := h.twin(s)
	mergePatch(ts.reported, patch)
	ts.version++
	v := ts.version
	h.mu.Unlock()
	h.log.Debug("reported properties", "hub", s.hub, "device", s.deviceID, "version", v)
	h.reply(cl, s, twinResponse(204, rid, v), nil)
}

// twin returns the twin state of the session's device, making it if need
// be. A state kept for other device data (DPS reset the data from the
// enrollment since) is dropped; a new state takes over the state of the
// hub the data was migrated from (DPS's deviceDataMigrated), which that
// hub then forgets. h.mu must be held.
func (h *Hub) twin(s *hubSession) *twinState {
	k := twinKey{strings.ToLower(s.hub), s.deviceID}
	data := s.device.DataETag
	ts := h.twins[k]
	if ts != nil && ts.dataETag != data {
		ts = nil
	}
	if ts == nil {
		ts = &twinState{reported: map[string]any{}, version: 1, dataETag: data}
		if prev := s.device.PreviousHub; prev != "" && !strings.EqualFold(prev, s.hub) {
			pk := twinKey{strings.ToLower(prev), s.deviceID}
			if old := h.twins[pk]; old != nil && old.dataETag == data {
				ts.reported, ts.version = old.reported, old.version
				delete(h.twins, pk)
			}
		}
		h.twins[k] = ts
	}
	return ts
}

// reply writes a QoS 0 PUBLISH to one client, and only if that client
// subscribed to a filter matching the topic (as IoT Hub, which answers
// twin requests on the device's $iothub/twin/res/# subscription).
func (h *Hub) reply(cl *mqtt.Client, s *hubSession, topic string, body []byte) {
	subscribed := false
	for f := range cl.State.Subscriptions.GetAll() {
		if matchFilter(f, topic) {
			subscribed = true
			break
		}
	}
	if !subscribed {
		h.log.Info("twin response dropped: the device did not subscribe to $iothub/twin/res/#", "hub", s.hub, "device", s.deviceID)
		return
	}
	err := cl.WritePacket(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   topic,
		Payload:     body,
	})
	if err != nil {
		h.log.Debug("twin response not sent", "hub", s.hub, "device", s.deviceID, "error", err)
	}
}

// twinResponse returns $iothub/twin/res/{status}/?$rid={rid}, with
// &$version={version} when version is not 0.
func twinResponse(status int, rid string, version int64) string {
	t := topicTwinResponse + strconv.Itoa(status) + "/?$rid=" + rid
	if version != 0 {
		t += "&$version=" + strconv.FormatInt(version, 10)
	}
	return t
}

// requestID returns the $rid parameter of a request topic as sent (it is
// echoed byte for byte), or "" when there is none.
func requestID(topic string) string {
	_, q, ok := strings.Cut(topic, "?")
	if !ok {
		return ""
	}
	for pair := range strings.SplitSeq(q, "&") {
		if v, ok := strings.CutPrefix(pair, "$rid="); ok {
			return v
		}
	}
	return ""
}

// desiredProperties returns the desired properties document: the JSON
// object twin with "$version":1 added unless it has one.
func desiredProperties(twin json.RawMessage) ([]byte, error) {
	m := map[string]json.RawMessage{}
	if t := bytes.TrimSpace(twin); len(t) > 0 && !bytes.Equal(t, []byte("null")) {
		if err := json.Unmarshal(t, &m); err != nil {
			return nil, err
		}
		if m == nil {
			m = map[string]json.RawMessage{}
		}
	}
	if _, ok := m["$version"]; !ok {
		m["$version"] = json.RawMessage("1")
	}
	return json.Marshal(m)
}

// mergePatch applies a JSON merge patch (RFC 7386) to dst.
func mergePatch(dst, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			sub, ok := dst[k].(map[string]any)
			if !ok {
				sub = map[string]any{}
			}
			mergePatch(sub, pv)
			dst[k] = sub
		default:
			dst[k] = v
		}
	}
}
