package dps

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/kilnworks/kiln/station"
)

// TimeLayout is the layout of every DPS timestamp: UTC with seven fractional
// digits and a Z, the .NET round-trip format (§1.4).
const TimeLayout = "2006-01-02T15:04:05.0000000Z"

// Time is a DPS timestamp. It marshals in TimeLayout (in UTC, truncated to
// 100 ns) and unmarshals any RFC 3339 time, a time without a zone (taken as
// UTC) or null. The zero Time is left out of a model by omitzero.
type Time struct{ time.Time }

// MarshalJSON writes t in TimeLayout.
func (t Time) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, len(TimeLayout)+2)
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, TimeLayout)
	return append(b, '"'), nil
}

// UnmarshalJSON reads a DPS timestamp. Kinds: Invalid.
func (t *Time) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*t = Time{}
		return nil
	}
	s, err := strconv.Unquote(string(b))
	if err != nil || len(b) < 2 || b[0] != '"' {
		return station.Errorf("read DPS timestamp", station.KindInvalid, "%.40s is not a JSON string", b)
	}
	if v, err := time.Parse(time.RFC3339Nano, s); err == nil {
		t.Time = v.UTC()
		return nil
	}
	v, err := time.ParseInLocation("2006-01-02T15:04:05.999999999", s, time.UTC)
	if err != nil {
		return station.Errorf("read DPS timestamp", station.KindInvalid,
			"%q is not a timestamp like 2023-01-10T21:52:50.5898405Z", s)
	}
	t.Time = v
	return nil
}

// Registration and operation states (§1.4).
const (
	StatusUnassigned = "unassigned"
	StatusAssigning  = "assigning"
	StatusAssigned   = "assigned"
	StatusFailed     = "failed"
	StatusDisabled   = "disabled"
)

// Substates of an assigned registration (§1.4, §10).
const (
	SubstatusInitialAssignment                = "initialAssignment"
	SubstatusDeviceDataMigrated               = "deviceDataMigrated"
	SubstatusDeviceDataReset                  = "deviceDataReset"
	SubstatusReprovisionedToInitialAssignment = "reprovisionedToInitialAssignment"
)

// DeviceRegistration is the body a device sends to register (§1.3). Every
// field is optional on the wire: the registration ID that counts is the one
// in the URL or the MQTT CONNECT, and some SDKs send an empty body.
type DeviceRegistration struct {
	RegistrationID string          `json:"registrationId,omitempty"`
	TPM            *TPMAttestation `json:"tpm,omitempty"`
	// Payload is custom allocation data, any JSON, passed on as it came.
	Payload json.RawMessage `json:"payload,omitempty"`
	// ClientCertificateCSR is the base64 DER PKCS#10 request of the aziot
	// identity service (preview certificate issuance); Kiln ignores it.
	ClientCertificateCSR string `json:"clientCertificateCsr,omitempty"`
}

// TPMAttestation holds a TPM's keys, each the base64 of a TPM2B_PUBLIC
// (§4.2): in a DeviceRegistration and in an enrollment's attestation, where
// storageRootKey is optional.
type TPMAttestation struct {
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey,omitempty"`
}

// RegistrationOperationStatus is the answer to a register or a poll (§1.4,
// §1.5). OperationID and Status always come first: the Embedded C parser
// depends on it (§2.6).
type RegistrationOperationStatus struct {
	OperationID string `json:"operationId"`
	Status      string `json:"status"`
	// RegistrationState is left out of the first register answer and
	// present in every poll answer.
	RegistrationState *DeviceRegistrationState `json:"registrationState,omitempty"`
}

// DeviceRegistrationState is the state of one registration, in DPS's key
// order (§1.4): the attestation result first, then the rest. Empty fields are
// left out.
type DeviceRegistrationState struct {
	X509                   *X509RegistrationResult         `json:"x509,omitempty"`
	SymmetricKey           *SymmetricKeyRegistrationResult `json:"symmetricKey,omitempty"`
	TPM                    *TPMRegistrationResult          `json:"tpm,omitempty"`
	RegistrationID         string                          `json:"registrationId,omitempty"`
	CreatedDateTimeUTC     Time                            `json:"createdDateTimeUtc,omitzero"`
	AssignedHub            string                          `json:"assignedHub,omitempty"`
	DeviceID               string                          `json:"deviceId,omitempty"`
	Status                 string                          `json:"status,omitempty"`
	Substatus              string                          `json:"substatus,omitempty"`
	ErrorCode              int                             `json:"errorCode,omitempty"`
	ErrorMessage           string                          `json:"errorMessage,omitempty"`
	LastUpdatedDateTimeUTC Time                            `json:"lastUpdatedDateTimeUtc,omitzero"`
	ETag                   string                          `json:"etag,omitempty"`
	// Payload is data a custom allocation webhook returned for the device.
	Payload json.RawMessage `json:"payload,omitempty"`
	// IssuedClientCertificate is the certificate chain (PEM, leaf first)
	// issued for the clientCertificateCsr the device sent.
	IssuedClientCertificate string `json:"issuedClientCertificate,omitempty"`
}

// X509RegistrationResult is the x509 part of a registration state: empty
// ({}) for an individual enrollment, the group ID for a group.
type X509RegistrationResult struct {
	EnrollmentGroupID      string               `json:"enrollmentGroupId,omitempty"`
	CertificateInfo        *X509CertificateInfo `json:"certificateInfo,omitempty"`
	SigningCertificateInfo *X509CertificateInfo `json:"signingCertificateInfo,omitempty"`
}

// SymmetricKeyRegistrationResult is the symmetricKey part of a registration
// state: empty for an individual enrollment, the group ID for a group.
type SymmetricKeyRegistrationResult struct {
	EnrollmentGroupID string `json:"enrollmentGroupId,omitempty"`
}

// TPMRegistrationResult is the tpm part of a registration state: the
// activation blob (base64) carrying the device's IoT Hub key (§4.3 step 5).
// The C SDK fails without it.
type TPMRegistrationResult struct {
	AuthenticationKey string `json:"authenticationKey"`
}

// The fixed texts of the TPM challenge (§4.3).
const (
	// TPMChallengeMessage is the message of real DPS's TPM challenge.
	TPMChallengeMessage = "Authorization required, resend request using supplied key"
	// RegistrationKeyName is the key name (skn) of every device SAS token.
	RegistrationKeyName = "registration"
)

// TPMChallenge is the body of the 401 answer to a TPM device's first,
// unauthenticated register (§4.3). It has no status key: the C SDK reads one
// as a registration status. UnencryptedAuthenticationKey is always null.
type TPMChallenge struct {
	Message                      string  `json:"message"`
	AuthenticationKey            string  `json:"authenticationKey"`
	UnencryptedAuthenticationKey *string `json:"unencryptedAuthenticationKey"`
	KeyName                      string  `json:"keyName"`
}

// NewTPMChallenge returns the challenge body that carries authenticationKey
// (the base64 activation blob), with DPS's message and key name.
func NewTPMChallenge(authenticationKey string) TPMChallenge {
	return TPMChallenge{Message: TPMChallengeMessage, AuthenticationKey: authenticationKey, KeyName: RegistrationKeyName}
}

// ErrorDetails is the error body of the device and service APIs (§7.4,
// ProvisioningServiceErrorDetails). Every error answer carries one, with
// both ErrorCode and Message. It is an error itself, so clients can return
// it; its message holds no secret.
type ErrorDetails struct {
	// ErrorCode is the HTTP status times 1000 plus a detail (401002).
	ErrorCode    int               `json:"errorCode"`
	TrackingID   string            `json:"trackingId"`
	Message      string            `json:"message"`
	TimestampUTC Time              `json:"timestampUtc"`
	Info         map[string]string `json:"info,omitempty"`
}

// Error codes seen from DPS (§7.4). The HTTP status is the code / 1000.
const (
	CodeBadRequest        = 400000
	CodeHubNotSpecified   = 400208 // no IoT hub could be assigned
	CodeAllocationFailed  = 400209 // custom allocation failed (C SDK: "unauthorized")
	CodeUnauthorized      = 401002
	CodeNotFound          = 404000
	CodeEnrollmentMissing = 404201
	CodeRegistrationGone  = 404202
	CodeConflict          = 409000
	CodePrecondition      = 412000
	CodeThrottled         = 429000
	CodeInternal          = 500000
)

// Error returns the DPS error code and message.
func (e *ErrorDetails) Error() string {
	return fmt.Sprintf("DPS error %d: %s", e.ErrorCode, e.Message)
}

// HTTPStatus returns the HTTP status the error code stands for: the code
// divided by 1000, as the Embedded C SDK reads it.
func (e *ErrorDetails) HTTPStatus() int { return e.ErrorCode / 1000 }

// Enrollment and attestation values of the service API (§7.2).
const (
	ProvisioningEnabled  = "enabled"
	ProvisioningDisabled = "disabled"

	AttestationNone         = "none"
	AttestationTPM          = "tpm"
	AttestationX509         = "x509"
	AttestationSymmetricKey = "symmetricKey"

	AllocationHashed     = "hashed"
	AllocationGeoLatency = "geoLatency"
	AllocationStatic     = "static"
	AllocationCustom     = "custom"
)

// IndividualEnrollment is one device's enrollment in the service API
// (§7.2), in DPS's key order. RegistrationState, ETag and the timestamps are
// set by the service.
type IndividualEnrollment struct {
	RegistrationID             string                      `json:"registrationId"`
	DeviceID                   string                      `json:"deviceId,omitempty"`
	RegistrationState          *DeviceRegistrationState    `json:"registrationState,omitempty"`
	OptionalDeviceInformation  json.RawMessage             `json:"optionalDeviceInformation,omitempty"`
	Attestation                AttestationMechanism        `json:"attestation"`
	Capabilities               *DeviceCapabilities         `json:"capabilities,omitempty"`
	IoTHubHostName             string                      `json:"iotHubHostName,omitempty"`
	InitialTwin                *InitialTwin                `json:"initialTwin,omitempty"`
	ETag                       string                      `json:"etag,omitempty"`
	ProvisioningStatus         string                      `json:"provisioningStatus,omitempty"`
	ReprovisionPolicy          *ReprovisionPolicy          `json:"reprovisionPolicy,omitempty"`
	CreatedDateTimeUTC         Time                        `json:"createdDateTimeUtc,omitzero"`
	LastUpdatedDateTimeUTC     Time                        `json:"lastUpdatedDateTimeUtc,omitzero"`
	AllocationPolicy           string                      `json:"allocationPolicy,omitempty"`
	IoTHubs                    []string                    `json:"iotHubs,omitempty"`
	CustomAllocationDefinition *CustomAllocationDefinition `json:"customAllocationDefinition,omitempty"`
}

// EnrollmentGroup is an enrollment for a group of devices (§7.2).
type EnrollmentGroup struct {
	EnrollmentGroupID          string                      `json:"enrollmentGroupId"`
	Attestation                AttestationMechanism        `json:"attestation"`
	Capabilities               *DeviceCapabilities         `json:"capabilities,omitempty"`
	IoTHubHostName             string                      `json:"iotHubHostName,omitempty"`
	InitialTwin                *InitialTwin                `json:"initialTwin,omitempty"`
	ETag                       string                      `json:"etag,omitempty"`
	ProvisioningStatus         string                      `json:"provisioningStatus,omitempty"`
	ReprovisionPolicy          *ReprovisionPolicy          `json:"reprovisionPolicy,omitempty"`
	CreatedDateTimeUTC         Time                        `json:"createdDateTimeUtc,omitzero"`
	LastUpdatedDateTimeUTC     Time                        `json:"lastUpdatedDateTimeUtc,omitzero"`
	AllocationPolicy           string                      `json:"allocationPolicy,omitempty"`
	IoTHubs                    []string                    `json:"iotHubs,omitempty"`
	CustomAllocationDefinition *CustomAllocationDefinition `json:"customAllocationDefinition,omitempty"`
}

// AttestationMechanism says how an enrolled device proves itself: Type is
// one of the Attestation constants, and the matching field is set.
type AttestationMechanism struct {
	Type         string                   `json:"type"`
	TPM          *TPMAttestation          `json:"tpm,omitempty"`
	X509         *X509Attestation         `json:"x509,omitempty"`
	SymmetricKey *SymmetricKeyAttestation `json:"symmetricKey,omitempty"`
}

// SymmetricKeyAttestation holds an enrollment's two keys, base64.
type SymmetricKeyAttestation struct {
	PrimaryKey   string `json:"primaryKey,omitempty"`
	SecondaryKey string `json:"secondaryKey,omitempty"`
}

// X509Attestation holds one of: the device certificates of an individual
// enrollment, the signing certificates of a group, or references to CA
// certificates registered with the service.
type X509Attestation struct {
	ClientCertificates  *X509Certificates `json:"clientCertificates,omitempty"`
	SigningCertificates *X509Certificates `json:"signingCertificates,omitempty"`
	CAReferences        *X509CAReferences `json:"caReferences,omitempty"`
}

// X509Certificates is a primary and an optional secondary certificate.
type X509Certificates struct {
	Primary   *X509CertificateWithInfo `json:"primary,omitempty"`
	Secondary *X509CertificateWithInfo `json:"secondary,omitempty"`
}

// X509CertificateWithInfo is a certificate (PEM or base64 DER) and, in
// answers, what the service read from it.
type X509CertificateWithInfo struct {
	Certificate string               `json:"certificate,omitempty"`
	Info        *X509CertificateInfo `json:"info,omitempty"`
}

// X509CertificateInfo describes a certificate.
type X509CertificateInfo struct {
	SubjectName      string `json:"subjectName"`
	SHA1Thumbprint   string `json:"sha1Thumbprint"`
	SHA256Thumbprint string `json:"sha256Thumbprint"`
	IssuerName       string `json:"issuerName"`
	NotBeforeUTC     Time   `json:"notBeforeUtc"`
	NotAfterUTC      Time   `json:"notAfterUtc"`
	SerialNumber     string `json:"serialNumber"`
	Version          int    `json:"version"`
}

// X509CAReferences names CA certificates registered with the service.
type X509CAReferences struct {
	Primary   string `json:"primary,omitempty"`
	Secondary string `json:"secondary,omitempty"`
}

// DeviceCapabilities are the device's capabilities in its hub.
type DeviceCapabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// InitialTwin is the twin a device gets in its hub at first assignment.
// Tags and Desired are twin collections: free-form JSON objects.
type InitialTwin struct {
	Tags       json.RawMessage        `json:"tags,omitempty"`
	Properties *InitialTwinProperties `json:"properties,omitempty"`
}

// InitialTwinProperties holds the desired properties of an InitialTwin.
type InitialTwinProperties struct {
	Desired json.RawMessage `json:"desired,omitempty"`
}

// ReprovisionPolicy says what happens when a registered device registers
// again (§10). Both fields default to true when absent from the JSON.
type ReprovisionPolicy struct {
	UpdateHubAssignment bool `json:"updateHubAssignment"`
	MigrateDeviceData   bool `json:"migrateDeviceData"`
}

// UnmarshalJSON reads a policy, taking an absent field as true.
func (p *ReprovisionPolicy) UnmarshalJSON(b []byte) error {
	var v struct {
		UpdateHubAssignment *bool `json:"updateHubAssignment"`
		MigrateDeviceData   *bool `json:"migrateDeviceData"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*p = ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
	if v.UpdateHubAssignment != nil {
		p.UpdateHubAssignment = *v.UpdateHubAssignment
	}
	if v.MigrateDeviceData != nil {
		p.MigrateDeviceData = *v.MigrateDeviceData
	}
	return nil
}

// CustomAllocationDefinition names the webhook of custom allocation (§8).
type CustomAllocationDefinition struct {
	WebhookURL string `json:"webhookUrl"`
	APIVersion string `json:"apiVersion"`
}

// QuerySpecification is the body of a query; "*" selects everything.
type QuerySpecification struct {
	Query string `json:"query"`
}

// Bulk operation modes (§7.2). Compare them with strings.EqualFold: Node
// sends "updateIfMatchEtag".
const (
	BulkCreate            = "create"
	BulkUpdate            = "update"
	BulkUpdateIfMatchETag = "updateIfMatchETag"
	BulkDelete            = "delete"
)

// BulkEnrollmentOperation applies one mode to up to 10 enrollments.
type BulkEnrollmentOperation struct {
	Mode        string                 `json:"mode"`
	Enrollments []IndividualEnrollment `json:"enrollments"`
}

// BulkEnrollmentOperationResult is the answer to a bulk operation: HTTP
// stays 200 and failures are listed per item.
type BulkEnrollmentOperationResult struct {
	IsSuccessful bool                           `json:"isSuccessful"`
	Errors       []BulkEnrollmentOperationError `json:"errors"`
}

// BulkEnrollmentOperationError is one failed item of a bulk operation.
type BulkEnrollmentOperationError struct {
	RegistrationID string `json:"registrationId"`
	ErrorCode      int    `json:"errorCode"`
	ErrorStatus    string `json:"errorStatus"`
}

// Decode reads one JSON value of the device or service API into v,
// refusing trailing data; an empty or all-space body leaves v as it is
// (some SDKs send none). Unknown fields are ignored, as DPS does.
// Kinds: Invalid.
func Decode(b []byte, v any) error {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		return station.Errorf("read DPS request", station.KindInvalid, "the body is not the expected JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return station.Errorf("read DPS request", station.KindInvalid, "the body has data after its JSON value")
	}
	return nil
}
