package devserver

import (
	"strings"
	"testing"
)

// FuzzHubParsers feeds device-controlled strings (the MQTT user name, topic
// names and filters) to the hub's parsers and checks the ACL's promise: a
// filter device "a" may subscribe to never matches another device's topic.
func FuzzHubParsers(f *testing.F) {
	for _, s := range []string{
		"hub.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4",
		"hub/d1/api-version=2016-11-14&DeviceClientType=iothubclient%2f1.1.27%20(Linux%3b%20armv7l)",
		"hub/d1/m1/?api-version=1",
		"devices/a/messages/events/%24.ct=application%2Fjson&k=v/",
		"devices/a/messages/devicebound/#",
		"$iothub/twin/res/+/#",
		"$iothub/twin/GET/?$rid=1&x=%zz",
		"#",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if u, err := parseHubUsername(s); err == nil {
			if u.host == "" || u.deviceID == "" || strings.Contains(u.host, "/") || strings.Contains(u.deviceID, "/") {
				t.Errorf("parseHubUsername(%q) = host %q, device %q", s, u.host, u.deviceID)
			}
		}
		_ = parseBag(propertyBag(s))
		_ = requestID(s)
		if mayRead("a", s) {
			for _, other := range []string{"devices/b/messages/devicebound/x", "devices/b/messages/events/", "devices/a/messages/events/"} {
				if matchFilter(s, other) {
					t.Errorf("device a may subscribe to %q, which matches %q", s, other)
				}
			}
		}
		if mayPublish("a", s) && strings.HasPrefix(s, "devices/") && !strings.HasPrefix(s, "devices/a/messages/events") {
			t.Errorf("device a may publish to %q", s)
		}
	})
}
