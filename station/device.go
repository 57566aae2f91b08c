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
	// Method is how the device attests to DPS: tpm (also when empty),
	// x509 (the stored certificate chain and generated key) or symkey (the
	// stored symmetric key).
	Method Method `json:"method,omitempty"`
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

// The capabilities a DUT announces in the hello exchange.
const (
	CapTPM    = "tpm"    // TPM passthrough: the DUT has a TPM 2.0
	CapKeyGen = "keygen" // generates a key pair and returns a CSR; stores a certificate chain
	CapSymKey = "symkey" // stores a symmetric (DPS device) key
)

// KeyStorage says where a DUT keeps a private key it generated.
type KeyStorage string

// The key storages.
const (
	KeyInTPM      KeyStorage = "tpm"      // a TPM key under the SRK: the private part never leaves the TPM
	KeyInSoftware KeyStorage = "software" // a software key in the DUT's protected storage
)

// KeyRequest asks a DUT to generate a key pair and a CSR for it.
type KeyRequest struct {
	// Type is the key type in the station CA's names: "EC-P256" (the
	// default when empty) or "RSA-2048".
	Type string `json:"type,omitempty"`
	// CommonName is the CSR's subject CN: the unit's registration ID.
	CommonName string `json:"common_name"`
	// Storage is where the key must be made; empty means in the TPM when
	// the DUT has one, else in software.
	Storage KeyStorage `json:"storage,omitempty"`
}

// GeneratedKey is a DUT's answer to a KeyRequest.
type GeneratedKey struct {
	CSR     []byte     `json:"csr"`     // PKCS#10, DER, signed by the new key
	Storage KeyStorage `json:"storage"` // where the private key is
}

// DeviceIdentity is the identity a DUT holds, as it reads it back: the
// station confirms with it what it wrote. Secrets do not come back: a
// symmetric key is confirmed by its fingerprint.
type DeviceIdentity struct {
	// CertChain is the stored certificate chain, DER, leaf first; empty
	// when none is stored.
	CertChain [][]byte `json:"cert_chain,omitempty"`
	// KeyStorage is where the generated key is; empty when there is none.
	KeyStorage KeyStorage `json:"key_storage,omitempty"`
	// SymKeyRegistrationID is the registration ID the stored symmetric key
	// is for; empty when none is stored.
	SymKeyRegistrationID string `json:"symkey_registration_id,omitempty"`
	// SymKeySHA256 is the hex SHA-256 of the stored symmetric key.
	SymKeySHA256 string `json:"symkey_sha256,omitempty"`
}

// IdentityLink is a Link to an agent that can hold an identity other than
// its TPM's endorsement key: a key it generates with a certificate the
// station issues, or a symmetric key the station writes.
type IdentityLink interface {
	Link
	// GenerateKey makes a new key pair on the DUT (replacing one made
	// before) and returns a CSR signed by it. Kinds: Unavailable, Invalid
	// (a key type or storage the DUT cannot make), NotFound (storage tpm
	// asked of a DUT without a TPM).
	GenerateKey(ctx context.Context, req KeyRequest) (GeneratedKey, error)
	// WriteCertChain stores the chain (DER, leaf first) for the generated
	// key. Kinds: Unavailable, Invalid (the leaf is not for the DUT's
	// key, or no key was generated).
	WriteCertChain(ctx context.Context, chain [][]byte) error
	// WriteSymmetricKey stores the DPS device key of registration ID
	// regID. Kinds: Unavailable, Invalid.
	WriteSymmetricKey(ctx context.Context, regID string, key []byte) error
	// ReadIdentity reads back what the DUT holds. Kinds: Unavailable.
	ReadIdentity(ctx context.Context) (DeviceIdentity, error)
}
