package station

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"encoding/hex"
	"strings"
	"time"
)

// Method is how a unit gets its identity.
type Method string

// The provisioning methods.
const (
	MethodTPM    Method = "tpm"    // enrolled by the TPM endorsement key
	MethodX509   Method = "x509"   // an X.509 leaf issued by the station CA
	MethodSymKey Method = "symkey" // a symmetric key derived from a group key
)

// Result is the outcome of a run.
type Result string

// The results of a run. A run is "running" until it is finished; a run left
// running by a crash stays so in the store, which is how it is recognised.
const (
	ResultRunning Result = "running"
	ResultPass    Result = "pass"
	ResultFail    Result = "fail"
)

// StepStatus is the outcome of one step.
type StepStatus string

// The step outcomes.
const (
	StepOK   StepStatus = "ok"
	StepWarn StepStatus = "warn" // done, with a finding that does not fail the unit
	StepFail StepStatus = "fail"
	StepSkip StepStatus = "skip" // not applicable under this profile
)

// The steps of the TPM method, in order.
const (
	StepConnect    = "connect"          // open the DUT link
	StepIdentify   = "identify"         // hello: serial, model, firmware, protocol version
	StepReadEK     = "read-ek"          // EK, SRK and EK certificate through TPM passthrough
	StepValidateEK = "validate-ek-cert" // EK certificate chain and key match
	StepDuplicates = "check-duplicates" // serial and EK never seen before
	StepRecord     = "record"           // the unit is written to the store
)

// TPMSteps lists the steps of the TPM method in the order they run.
var TPMSteps = []string{StepConnect, StepIdentify, StepReadEK, StepValidateEK, StepDuplicates, StepRecord}

// EKCertPolicy says what an EK certificate that is missing or does not
// validate does to a unit.
type EKCertPolicy string

// The EK certificate policies.
const (
	EKCertRequire EKCertPolicy = "require" // missing or invalid: FAIL
	EKCertWarn    EKCertPolicy = "warn"    // missing or invalid: PASS with a warning on the step
	EKCertOff     EKCertPolicy = "off"     // not checked
)

// RegIDRule says how a unit's DPS registration ID is made.
type RegIDRule string

// The registration ID rules.
const (
	RegIDFromEK     RegIDRule = "ek"     // DPS convention: base32(SHA-256(EK TPM2B_PUBLIC)), lower case, no padding
	RegIDFromSerial RegIDRule = "serial" // the serial number, lower-cased
)

// Profile is the station profile: how this station provisions units.
type Profile struct {
	Station      string // the station's name, written on every record
	Method       Method
	RegID        RegIDRule
	EKCertPolicy EKCertPolicy
	// KeyType is the key type the X.509 method asks DUTs for, in the
	// station CA's names ("EC-P256", "RSA-2048"); empty means EC-P256.
	KeyType string
}

// DefaultProfile is the profile used when none is configured.
func DefaultProfile() Profile {
	return Profile{Station: "kiln", Method: MethodTPM, RegID: RegIDFromEK, EKCertPolicy: EKCertWarn}
}

// DeviceInfo is what a DUT says about itself in the link's hello exchange.
type DeviceInfo struct {
	Serial       string   `json:"serial"`
	Model        string   `json:"model"`
	Firmware     string   `json:"firmware"`
	Capabilities []string `json:"capabilities"`
	Protocol     int      `json:"protocol"` // negotiated link protocol version
}

// Has reports whether the device announced capability c.
func (d DeviceInfo) Has(c string) bool {
	for _, x := range d.Capabilities {
		if x == c {
			return true
		}
	}
	return false
}

// LinkStats counts what crossed a DUT link.
type LinkStats struct {
	BytesOut  int64 // bytes written to the line, framing included
	BytesIn   int64 // bytes read from the line, framing and garbage included
	Requests  int   // requests answered
	Retries   int   // requests sent again after a timeout or a NAK
	BadFrames int   // frames dropped: bad CRC, bad encoding, oversize
}

// Link is an open request/response connection to the agent on one DUT.
// A Link is used by one goroutine at a time.
type Link interface {
	// Info runs the hello exchange (version negotiation) and returns what the
	// device says about itself. Kinds: Unavailable (no answer), Invalid
	// (no common protocol version, malformed answer).
	Info(ctx context.Context) (DeviceInfo, error)
	// TPM sends one raw TPM 2.0 command to the DUT's TPM and returns the
	// raw response. Kinds: Unavailable, Invalid, NotFound (no TPM on the DUT).
	TPM(ctx context.Context, cmd []byte) ([]byte, error)
	// Stats reports what has crossed the link so far.
	Stats() LinkStats
	// Close closes the link; it is idempotent.
	Close() error
}

// Endorsement is what a TPM says about its identity.
type Endorsement struct {
	EKPublic   []byte // the EK's TPM2B_PUBLIC (2-byte size, then TPMT_PUBLIC)
	EKKeyDER   []byte // the EK's public key as PKIX DER
	SRKPublic  []byte // the SRK's TPM2B_PUBLIC
	EKCert     []byte // DER from NV 0x01C00002; nil when the TPM has none
	EKCreated  bool   // Kiln created and persisted the EK (it was absent)
	SRKCreated bool   // Kiln created and persisted the SRK (it was absent)
}

// EKHash returns the hex SHA-256 of the EK's TPM2B_PUBLIC: the unit's EK
// fingerprint in records and duplicate checks.
func (e *Endorsement) EKHash() string { return EKHash(e.EKPublic) }

// EKHash returns the hex SHA-256 of an EK TPM2B_PUBLIC.
func EKHash(ekPublic []byte) string {
	h := sha256.Sum256(ekPublic)
	return hex.EncodeToString(h[:])
}

// RegistrationIDFromEK returns the default DPS registration ID of a TPM
// device: SHA-256 over the EK TPM2B_PUBLIC bytes, RFC 4648 base32 without
// padding, lower case.
func RegistrationIDFromEK(ekPublic []byte) string {
	h := sha256.Sum256(ekPublic)
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(h[:]))
}

// Endorser reads a DUT's TPM endorsement identity through its link.
type Endorser interface {
	// Endorsement reads (creating and persisting when absent) the EK and SRK
	// and reads the EK certificate. Kinds: Unavailable (link or TPM did not
	// answer), Conflict (a foreign key sits at a standard handle), Invalid.
	Endorsement(ctx context.Context, l Link) (*Endorsement, error)
}

// Verifier validates an EK certificate against the station's trusted
// manufacturer roots.
type Verifier interface {
	// VerifyEKCert checks that e.EKCert chains to a trusted root and that its
	// key is e's EK. Kinds: NotFound (no certificate), Unauthorized (chain or
	// key mismatch), Invalid (unparseable).
	VerifyEKCert(ctx context.Context, e *Endorsement) error
}

// Step is one step of a run.
type Step struct {
	Name     string        `json:"name"`
	Status   StepStatus    `json:"status"`
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration_ns"`
	Detail   string        `json:"detail,omitempty"` // what the step found, for the record
	Error    string        `json:"error,omitempty"`
}

// Run is one provisioning attempt on one DUT: the evidence of what happened,
// written as it happens, whether the unit passes or not.
type Run struct {
	ID             int64     `json:"id"`
	Serial         string    `json:"serial"` // scanned, or reported by the DUT when nothing was scanned
	Port           string    `json:"port"`
	Station        string    `json:"station"`
	Operator       string    `json:"operator"`
	Method         Method    `json:"method"`
	Started        time.Time `json:"started"`
	Finished       time.Time `json:"finished,omitzero"`
	Result         Result    `json:"result"`
	ErrorKind      Kind      `json:"-"`
	Error          string    `json:"error,omitempty"` // the reason for a FAIL, for a person
	Model          string    `json:"model,omitempty"`
	Firmware       string    `json:"firmware,omitempty"`
	RegistrationID string    `json:"registration_id,omitempty"`
	EKHash         string    `json:"ek_hash,omitempty"`
	BytesOut       int64     `json:"bytes_out"`
	BytesIn        int64     `json:"bytes_in"`
	// The end-to-end check: what the DPS answered and when the hub saw the
	// unit's telemetry.
	DPSStatus   string    `json:"dps_status,omitempty"`
	AssignedHub string    `json:"assigned_hub,omitempty"`
	DeviceID    string    `json:"device_id,omitempty"`
	TelemetryAt time.Time `json:"telemetry_at,omitzero"`
	Steps       []Step    `json:"steps"`
}

// Duration is how long the run took (so far, for a running run).
func (r *Run) Duration() time.Duration {
	if r.Finished.IsZero() {
		return 0
	}
	return r.Finished.Sub(r.Started)
}

// Unit is a provisioned unit: the identity recorded for a unit that passed.
// Serial and EK hash are unique across units.
type Unit struct {
	Serial         string `json:"serial"`
	RegistrationID string `json:"registration_id"`
	Method         Method `json:"method"`
	Model          string `json:"model,omitempty"`
	Firmware       string `json:"firmware,omitempty"`
	EKHash         string `json:"ek_hash,omitempty"`
	EKPublic       []byte `json:"ek_public,omitempty"` // TPM2B_PUBLIC
	EKKeyDER       []byte `json:"ek_key,omitempty"`    // PKIX DER
	SRKPublic      []byte `json:"srk_public,omitempty"`
	EKCert         []byte `json:"ek_cert,omitempty"` // DER
	// The X.509 method: the leaf the station CA issued (DER), its serial
	// (hex) and SHA-256 thumbprint (upper-case hex), and where the DUT keeps
	// its key.
	Certificate    []byte     `json:"certificate,omitempty"`
	CertSerial     string     `json:"cert_serial,omitempty"`
	CertThumbprint string     `json:"cert_thumbprint,omitempty"`
	KeyStorage     KeyStorage `json:"key_storage,omitempty"`
	// EnrollmentGroup is the DPS enrollment group of a symmetric-key unit.
	EnrollmentGroup string `json:"enrollment_group,omitempty"`
	// SymKeySHA256 is the hex SHA-256 of a symmetric-key unit's device key
	// (the key itself is never recorded: it is derived from the group key).
	SymKeySHA256 string    `json:"symkey_sha256,omitempty"`
	RunID        int64     `json:"run_id"`
	Station      string    `json:"station"`
	Operator     string    `json:"operator"`
	Created      time.Time `json:"created"`
}

// RunFilter selects runs. Zero fields select everything.
type RunFilter struct {
	Serial string    // exact serial
	Result Result    // exact result
	Since  time.Time // started at or after
	Until  time.Time // started before
	Limit  int       // at most this many, newest first (0 = 100)
}

// Store is the system of record. Implementations are safe for concurrent use.
type Store interface {
	// CreateRun inserts r (Result running) and sets r.ID.
	CreateRun(ctx context.Context, r *Run) error
	// AddStep appends a finished step to run id. Kinds: NotFound.
	AddStep(ctx context.Context, runID int64, s Step) error
	// FinishRun writes r's final fields (result, error, identity, finished,
	// byte counts). Kinds: NotFound.
	FinishRun(ctx context.Context, r *Run) error
	// Run returns run id with its steps. Kinds: NotFound.
	Run(ctx context.Context, id int64) (*Run, error)
	// Runs returns runs matching f with their steps, newest first.
	Runs(ctx context.Context, f RunFilter) ([]*Run, error)
	// RecordUnit inserts a provisioned unit. Kinds: Conflict when its serial
	// or EK hash is recorded already.
	RecordUnit(ctx context.Context, u *Unit) error
	// UnitBySerial returns the unit with that serial. Kinds: NotFound.
	UnitBySerial(ctx context.Context, serial string) (*Unit, error)
	// UnitByEKHash returns the unit with that EK hash. Kinds: NotFound.
	UnitByEKHash(ctx context.Context, ekHash string) (*Unit, error)
	// Close closes the store; it is idempotent.
	Close() error
}
