package devserver

import (
	"bytes"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// hubHook plugs the hub into mochi. Authentication runs in OnConnect so
// that the hub can choose the CONNACK code (mochi's own refusal in
// OnConnectAuthenticate is always "not authorized" for MQTT 3.1.1);
// OnConnectAuthenticate then admits exactly the clients OnConnect accepted.
// Every device publish is consumed here and never routed through the
// broker: telemetry is recorded, and $iothub requests are answered by
// writing to the requesting client alone, since every device subscribes to
// the same $iothub/twin/res/# filter.
type hubHook struct {
	mqtt.HookBase
	hub *Hub
}

func (k *hubHook) ID() string { return "kiln-hub" }

func (k *hubHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnDisconnect,
		mqtt.OnPacketRead, mqtt.OnPublish, mqtt.OnPublished:
		return true
	}
	return false
}

// OnConnect authenticates the device. On refusal it writes the CONNACK
// itself and returns an error, which makes mochi close the connection
// without sending another.
func (k *hubHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	h := k.hub
	s, code, err := h.authenticate(cl, pk)
	if err != nil {
		h.log.Info("device refused", "client", pk.Connect.ClientIdentifier, "remote", cl.Net.Remote,
			"connack", code.Code, "reason", err.Error())
		_ = cl.WritePacket(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Connack},
			ReasonCode:  code.Code,
		})
		return code
	}
	// IoT Hub would turn a will into telemetry; the hub offers no wills, so
	// that a will can never reach a topic the device may not publish to.
	cl.Properties.Will = mqtt.Will{}
	h.mu.Lock()
	h.sessions[cl] = s
	h.mu.Unlock()
	u, _ := parseHubUsername(string(pk.Connect.Username))
	h.log.Info("device connected", "hub", s.hub, "device", s.deviceID, "auth", s.auth,
		"api_version", u.params["api-version"], "remote", cl.Net.Remote)
	return nil
}

// OnConnectAuthenticate admits the clients OnConnect accepted.
func (k *hubHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	return k.hub.session(cl) != nil
}

// OnDisconnect forgets the client's session.
func (k *hubHook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	h := k.hub
	h.mu.Lock()
	s := h.sessions[cl]
	delete(h.sessions, cl)
	h.mu.Unlock()
	if s != nil {
		h.log.Debug("device disconnected", "hub", s.hub, "device", s.deviceID, "error", err)
	}
}

// OnACLCheck allows a device to publish to its own telemetry topic and to
// the twin and method-response topics, and to subscribe to (and receive on)
// its own cloud-to-device topic and the twin-response, desired-properties
// and method topics. A refused publish closes the connection, as IoT Hub
// does; a refused subscription gets a failure code in SUBACK.
func (k *hubHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	s := k.hub.session(cl)
	if s == nil {
		return false
	}
	ok := mayRead(s.deviceID, topic)
	if write {
		ok = mayPublish(s.deviceID, topic)
	}
	if !ok {
		k.hub.log.Info("topic refused", "hub", s.hub, "device", s.deviceID, "topic", hubClip(topic, 200), "publish", write)
		if write {
			cl.Stop(packets.ErrNotAuthorized)
		}
	}
	return ok
}

// OnPacketRead disconnects a device that publishes more than MaxMessage
// bytes (body plus property bag) or publishes with QoS 2, as IoT Hub does.
func (k *hubHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	h := k.hub
	reason := ""
	switch size := len(pk.Payload) + len(propertyBag(pk.TopicName)); {
	case size > h.cfg.MaxMessage:
		reason = "message too large"
	case pk.FixedHeader.Qos > 1:
		reason = "QoS 2 is not supported"
	default:
		return pk, nil
	}
	h.log.Info("device disconnected", "reason", reason, "client", cl.ID, "topic", hubClip(pk.TopicName, 200),
		"bytes", len(pk.Payload), "max", h.cfg.MaxMessage)
	return pk, packets.ErrRejectPacket // ends the connection
}

// OnPublish takes every device publish out of the broker: mochi still
// acknowledges QoS 1, and OnPublished handles it.
func (k *hubHook) OnPublish(_ *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	return pk, packets.CodeSuccessIgnore
}

// OnPublished handles a device publish after mochi acknowledged it.
func (k *hubHook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	h := k.hub
	s := h.session(cl)
	if s == nil {
		return
	}
	topic := pk.TopicName
	switch {
	case strings.HasPrefix(topic, topicTwinGet):
		h.twinGet(cl, s, topic)
	case strings.HasPrefix(topic, topicTwinPatchReported):
		h.twinPatch(cl, s, topic, pk.Payload)
	case strings.HasPrefix(topic, topicMethodResponse):
		h.log.Debug("method response dropped: the hub invokes no methods", "device", s.deviceID, "topic", hubClip(topic, 200))
	default:
		t := Telemetry{
			Hub:        s.hub,
			DeviceID:   s.deviceID,
			Received:   h.cfg.Now(),
			Topic:      topic,
			Properties: parseBag(propertyBag(topic)),
			Body:       bytes.Clone(pk.Payload),
		}
		h.log.Debug("telemetry", "hub", s.hub, "device", s.deviceID, "bytes", len(t.Body), "properties", len(t.Properties))
		h.record(t)
		h.countTelemetry()
	}
}

func (h *Hub) session(cl *mqtt.Client) *hubSession {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sessions[cl]
}

// Topics of IoT Hub's MQTT surface.
const (
	topicTwinGet           = "$iothub/twin/GET/"
	topicTwinPatchReported = "$iothub/twin/PATCH/properties/reported/"
	topicTwinResponse      = "$iothub/twin/res/"
	topicTwinDesired       = "$iothub/twin/PATCH/properties/desired/"
	topicMethodRequest     = "$iothub/methods/POST/"
	topicMethodResponse    = "$iothub/methods/res/"
)

// eventsTopic returns a device's telemetry topic without the property bag.
func eventsTopic(deviceID string) string { return "devices/" + deviceID + "/messages/events" }

// mayPublish reports whether device id may publish to topic:
// devices/{id}/messages/events[/{property_bag}[/]], or a twin request, or a
// method response.
func mayPublish(id, topic string) bool {
	if rest, ok := strings.CutPrefix(topic, eventsTopic(id)); ok {
		return rest == "" || rest[0] == '/'
	}
	return strings.HasPrefix(topic, topicTwinGet) ||
		strings.HasPrefix(topic, topicTwinPatchReported) ||
		strings.HasPrefix(topic, topicMethodResponse)
}

// mayRead reports whether device id may subscribe to the filter (or receive
// on the topic) f: its own cloud-to-device topic, twin responses, desired
// property updates and method requests. The prefixes are literal, so a
// filter allowed here can match no other device's topics.
func mayRead(id, f string) bool {
	for _, p := range []string{"devices/" + id + "/messages/devicebound/", topicTwinResponse, topicTwinDesired, topicMethodRequest} {
		if strings.HasPrefix(f, p) {
			return true
		}
	}
	return false
}

// propertyBag returns the property bag of a telemetry topic
// devices/{id}/messages/events/{bag}: "" when there is none, without a
// trailing slash. Other topics have no bag.
func propertyBag(topic string) string {
	rest, ok := strings.CutPrefix(topic, "devices/")
	if !ok {
		return ""
	}
	_, rest, ok = strings.Cut(rest, "/messages/events")
	if !ok || rest != "" && rest[0] != '/' {
		return ""
	}
	return strings.TrimSuffix(strings.TrimPrefix(rest, "/"), "/")
}

// matchFilter reports whether an MQTT topic filter matches a topic name.
func matchFilter(filter, topic string) bool {
	fs := strings.Split(filter, "/")
	ts := strings.Split(topic, "/")
	for i, f := range fs {
		if f == "#" {
			return true
		}
		if i >= len(ts) || f != "+" && f != ts[i] {
			return false
		}
	}
	return len(fs) == len(ts)
}

func hubClip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
