package devserver

import (
	"context"
	"encoding/json"
	"time"
)

// HubDevice is what the embedded IoT Hub needs to know about a device that
// DPS assigned to it: who it is, how it authenticates, and its initial twin.
type HubDevice struct {
	Hub          string // host name of the hub the device was assigned to
	DeviceID     string
	PrimaryKey   []byte // SAS key (TPM: the key sent in the activation blob; symmetric key: the device key); nil for X.509
	SecondaryKey []byte
	// Thumbprints are the hex SHA-1 and SHA-256 thumbprints (upper case) of
	// the X.509 client certificate the device registered with; empty for SAS.
	Thumbprints []string
	Enabled     bool
	// Twin is the device twin document's desired properties from the
	// enrollment's initialTwin (JSON object), nil for an empty twin.
	Twin json.RawMessage
	// Tags are the twin's tags from the enrollment's initialTwin (JSON
	// object), nil for none. Devices do not see tags; the service side does.
	Tags json.RawMessage
	// IoTEdge is the device's IoT Edge capability (capabilities.iotEdge).
	IoTEdge bool
	// DataETag names the device data: it changes whenever DPS sets the
	// data afresh from the enrollment (first assignment, reset), and the
	// hub then drops the reported properties it kept for the device.
	DataETag string
	// PreviousHub is the hub the device data was migrated from (the
	// deviceDataMigrated reprovisioning), "" otherwise: the hub moves the
	// reported properties it kept there to this hub.
	PreviousHub string
}

// DeviceDirectory answers the hub's questions about devices. The DPS side of
// the devserver implements it from its registrations.
type DeviceDirectory interface {
	// HubDevice returns the device deviceID as assigned to hub. Kinds:
	// NotFound (no such device on that hub).
	HubDevice(ctx context.Context, hub, deviceID string) (*HubDevice, error)
}

// Telemetry is one device-to-cloud message the embedded hub received.
type Telemetry struct {
	Hub        string
	DeviceID   string
	Received   time.Time
	Topic      string            // as published, e.g. devices/d1/messages/events/a=b
	Properties map[string]string // the property bag parsed from the topic
	Body       []byte
}
