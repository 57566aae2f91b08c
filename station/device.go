package station

import (
	"context"
	"time"
)

// DeviceConfig is the provisioning configuration a DUT keeps: where it
// registers and as whom. The station writes it twice: first pointing at the
// station's embedded DPS for the end-to-end check, then at production.
type DeviceConfig struct {
	IDScope        string `json:"id_scope"`
	GlobalEndpoint string `json:"global_endpoint"` // DPS device endpoint, host or host:port (HTTPS)
	RegistrationID string `json:"registration_id"`
	// TrustBundle is PEM: the roots the device trusts for the DPS and hub
	// TLS certificates. Empty: the device's system roots.
	TrustBundle string `json:"trust_bundle,omitempty"`
}

// ProvisionProgress is one step a DUT reports while it provisions itself.
type ProvisionProgress struct {
	Stage  string        `json:"stage"` // e.g. "register", "assigned", "hub-connect", "telemetry"
	Detail string        `json:"detail,omitempty"`
	After  time.Duration `json:"after_ns"` // since the DUT started provisioning
}

// ProvisionReport is what a DUT reports when it has provisioned itself.
type ProvisionReport struct {
	Status        string    `json:"status"` // the DPS registration status: assigned, failed, disabled
	AssignedHub   string    `json:"assigned_hub,omitempty"`
	DeviceID      string    `json:"device_id,omitempty"`
	ErrorCode     int       `json:"error_code,omitempty"`
	ErrorMessage  string    `json:"error_message,omitempty"`
	TelemetrySent time.Time `json:"telemetry_sent,omitzero"` // when the DUT's telemetry message was acknowledged
	MessageID     string    `json:"message_id,omitempty"`    // the telemetry message's id, to match it at the hub
}

// ProvisioningLink is a Link to an agent that can provision itself against
// a DPS: write and read its configuration, and run registration, the hub
// connection and a telemetry message now.
type ProvisioningLink interface {
	Link
	// WriteConfig stores cfg on the DUT. Kinds: Unavailable, Invalid.
	WriteConfig(ctx context.Context, cfg DeviceConfig) error
	// ReadConfig returns the configuration stored on the DUT. Kinds:
	// Unavailable, NotFound (none written yet).
	ReadConfig(ctx context.Context) (DeviceConfig, error)
	// ProvisionNow makes the DUT register with DPS, connect to its assigned
	// hub and send one telemetry message, calling progress for each stage
	// the DUT reports. Kinds: Unavailable (link), Unauthorized (DPS refused
	// the attestation), Invalid; a DPS status other than assigned is
	// returned in the report with a nil error.
	ProvisionNow(ctx context.Context, progress func(ProvisionProgress)) (ProvisionReport, error)
}
