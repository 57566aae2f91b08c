package dps

import (
	"context"
	"net/http"
	"net/url"
)

// CA certificates registered with the service and verified by proof of
// possession: the certificates that X.509 enrollment groups name in
// attestation.x509.caReferences (§6). Azure DPS manages them through its
// management plane (Microsoft.Devices/provisioningServices/{name}/certificates);
// Kiln's devserver serves the same resource shapes on its service API,
// under /certificates.
//
// The flow: upload the CA certificate (isVerified false), generate a
// verification code, issue a certificate whose subject CN is that code,
// signed with the CA's private key, and post it to verify; the CA is then
// verified and groups that reference it accept device chains that lead to
// it.

// MaxCertificates is DPS's limit of CA certificates per service (§10).
const MaxCertificates = 25

// CertificateProperties describes a registered CA certificate, as DPS's
// CertificateProperties. Subject, Expiry, Thumbprint, Created and Updated
// are set by the service: Expiry, Created and Updated in RFC 1123 form
// ("Sat, 31 Dec 2039 23:59:59 GMT"), Thumbprint the upper-case hex SHA-1.
type CertificateProperties struct {
	Subject    string `json:"subject,omitempty"`
	Expiry     string `json:"expiry,omitempty"`
	Thumbprint string `json:"thumbprint,omitempty"`
	IsVerified bool   `json:"isVerified"`
	// Certificate is the certificate, PEM (base64 DER is accepted on
	// upload).
	Certificate string `json:"certificate,omitempty"`
	Created     string `json:"created,omitempty"`
	Updated     string `json:"updated,omitempty"`
	// VerificationCode is set in the answer to generateVerificationCode
	// only: the subject CN the proof-of-possession certificate must have.
	VerificationCode string `json:"verificationCode,omitempty"`
}

// Certificate is a CA certificate resource: DPS's CertificateResponse (and
// VerificationCodeResponse, whose properties add the verification code).
type Certificate struct {
	Properties CertificateProperties `json:"properties"`
	ID         string                `json:"id,omitempty"`
	Name       string                `json:"name"`
	Type       string                `json:"type,omitempty"`
	ETag       string                `json:"etag,omitempty"`
}

// CertificateType is the type of every Certificate resource.
const CertificateType = "Microsoft.Devices/ProvisioningServices/Certificates"

// CertificateList is the answer to a listing of certificates.
type CertificateList struct {
	Value []Certificate `json:"value"`
}

// CertificateUpload is the body of a certificate upload
// (CertificateBodyDescription): the certificate, PEM or base64 DER, and
// optionally isVerified true to skip proof of possession, as DPS allows.
type CertificateUpload struct {
	Certificate string `json:"certificate"`
	IsVerified  bool   `json:"isVerified,omitempty"`
}

// certificateUploadBody wraps an upload as DPS's management plane sends it.
type certificateUploadBody struct {
	Properties CertificateUpload `json:"properties"`
}

// VerificationCodeRequest is the body of a verify call: the
// proof-of-possession certificate, PEM or base64 DER.
type VerificationCodeRequest struct {
	Certificate string `json:"certificate"`
}

func certificatePath(name string) string { return "/certificates/" + url.PathEscape(name) }

// PutCertificate uploads (or replaces) the CA certificate name. A new or
// changed certificate starts unverified unless u.IsVerified. ifMatch, when
// set, makes the write conditional on the resource's ETag. Kinds: Invalid
// (not a CA certificate), Unauthorized, Conflict (ETag mismatch, the limit
// of MaxCertificates), Unavailable.
func (c *ServiceClient) PutCertificate(ctx context.Context, name string, u CertificateUpload, ifMatch string) (*Certificate, error) {
	var out Certificate
	if err := c.do(ctx, "upload CA certificate", http.MethodPut, certificatePath(name), ifMatch, certificateUploadBody{u}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// GetCertificate returns the CA certificate name. Kinds: NotFound,
// Unauthorized, Unavailable.
func (c *ServiceClient) GetCertificate(ctx context.Context, name string) (*Certificate, error) {
	var out Certificate
	if err := c.do(ctx, "get CA certificate", http.MethodGet, certificatePath(name), "", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListCertificates returns every CA certificate of the service.
// Kinds: Unauthorized, Unavailable.
func (c *ServiceClient) ListCertificates(ctx context.Context) ([]Certificate, error) {
	var out CertificateList
	if err := c.do(ctx, "list CA certificates", http.MethodGet, "/certificates", "", nil, &out); err != nil {
		return nil, err
	}
	return out.Value, nil
}

// DeleteCertificate deletes the CA certificate name. Kinds: NotFound,
// Conflict (ETag mismatch), Unauthorized, Unavailable.
func (c *ServiceClient) DeleteCertificate(ctx context.Context, name, ifMatch string) error {
	return c.do(ctx, "delete CA certificate", http.MethodDelete, certificatePath(name), ifMatch, nil, nil)
}

// GenerateVerificationCode makes a new verification code for the CA
// certificate name (Properties.VerificationCode); an earlier code stops
// working. Kinds: NotFound, Conflict (ETag mismatch), Unauthorized,
// Unavailable.
func (c *ServiceClient) GenerateVerificationCode(ctx context.Context, name, ifMatch string) (*Certificate, error) {
	var out Certificate
	if err := c.do(ctx, "generate verification code", http.MethodPost, certificatePath(name)+"/generateVerificationCode", ifMatch, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// VerifyCertificate proves possession of the CA's private key with
// proofPEM, a certificate whose subject CN is the verification code, signed
// by the CA. Kinds: Invalid (wrong CN, not signed by the CA, no code
// generated), NotFound, Conflict, Unauthorized, Unavailable.
func (c *ServiceClient) VerifyCertificate(ctx context.Context, name, ifMatch, proofPEM string) (*Certificate, error) {
	var out Certificate
	if err := c.do(ctx, "verify CA certificate", http.MethodPost, certificatePath(name)+"/verify", ifMatch,
		VerificationCodeRequest{Certificate: proofPEM}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
