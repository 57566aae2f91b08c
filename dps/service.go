package dps

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// ServiceAPIVersion is the service API version the ServiceClient sends.
const ServiceAPIVersion = "2021-10-01"

// ServiceClient calls a DPS service API, Azure's or Kiln's devserver, with
// SAS tokens made from a service connection string. It is safe for
// concurrent use.
type ServiceClient struct {
	conn       *ConnectionString
	base       string
	http       *http.Client
	apiVersion string
	now        func() time.Time
}

// ServiceOptions tune a ServiceClient. The zero value is fine.
type ServiceOptions struct {
	HTTP       *http.Client     // nil: a client with a 30 s timeout and the system roots
	BaseURL    string           // "" : https://{HostName}
	APIVersion string           // "" : ServiceAPIVersion
	Now        func() time.Time // token clock; nil: time.Now
}

// NewServiceClient returns a client for the DPS named by a service
// connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...).
// Kinds: Invalid.
func NewServiceClient(connectionString string, o ServiceOptions) (*ServiceClient, error) {
	cs, err := ParseConnectionString(connectionString)
	if err != nil {
		return nil, err
	}
	if cs.SharedAccessKeyName == "" || cs.DeviceID != "" {
		return nil, station.Errorf("service client", station.KindInvalid, "not a DPS service connection string: it needs HostName, SharedAccessKeyName and SharedAccessKey")
	}
	c := &ServiceClient{conn: cs, base: o.BaseURL, http: o.HTTP, apiVersion: o.APIVersion, now: o.Now}
	if c.base == "" {
		c.base = "https://" + cs.HostName
	}
	c.base = strings.TrimSuffix(c.base, "/")
	if c.http == nil {
		c.http = &http.Client{Timeout: 30 * time.Second}
	}
	if c.apiVersion == "" {
		c.apiVersion = ServiceAPIVersion
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c, nil
}

// HostName is the service's host name from the connection string.
func (c *ServiceClient) HostName() string { return c.conn.HostName }

// PutEnrollment creates or replaces an individual enrollment. ifMatch, when
// set, makes the write conditional on the enrollment's current ETag. Kinds:
// Invalid, Unauthorized, Conflict (ETag mismatch), Unavailable.
func (c *ServiceClient) PutEnrollment(ctx context.Context, e *IndividualEnrollment, ifMatch string) (*IndividualEnrollment, error) {
	var out IndividualEnrollment
	err := c.do(ctx, "put enrollment", http.MethodPut, "/enrollments/"+url.PathEscape(e.RegistrationID), ifMatch, e, &out)
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// GetEnrollment returns an individual enrollment. Kinds: NotFound,
// Unauthorized, Unavailable.
func (c *ServiceClient) GetEnrollment(ctx context.Context, registrationID string) (*IndividualEnrollment, error) {
	var out IndividualEnrollment
	if err := c.do(ctx, "get enrollment", http.MethodGet, "/enrollments/"+url.PathEscape(registrationID), "", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// DeleteEnrollment deletes an individual enrollment. Kinds: NotFound,
// Conflict (ETag mismatch), Unauthorized, Unavailable.
func (c *ServiceClient) DeleteEnrollment(ctx context.Context, registrationID, ifMatch string) error {
	return c.do(ctx, "delete enrollment", http.MethodDelete, "/enrollments/"+url.PathEscape(registrationID), ifMatch, nil, nil)
}

// RegistrationState returns the device registration state of a
// registration ID. Kinds: NotFound (the device never registered),
// Unauthorized, Unavailable.
func (c *ServiceClient) RegistrationState(ctx context.Context, registrationID string) (*DeviceRegistrationState, error) {
	var out DeviceRegistrationState
	if err := c.do(ctx, "get registration state", http.MethodGet, "/registrations/"+url.PathEscape(registrationID), "", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *ServiceClient) do(ctx context.Context, op, method, path, ifMatch string, in, out any) error {
	var hdr http.Header
	if ifMatch != "" {
		hdr = http.Header{"If-Match": {ifMatch}}
	}
	_, err := c.exchange(ctx, op, method, path, hdr, in, out)
	return err
}

// exchange sends a request with the extra headers hdr and the JSON body
// in (nil: none), decodes a success answer into out (nil: ignored) and
// returns the answer's headers.
func (c *ServiceClient) exchange(ctx context.Context, op, method, path string, hdr http.Header, in, out any) (http.Header, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, station.E(op, station.KindInvalid, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path+"?api-version="+url.QueryEscape(c.apiVersion), body)
	if err != nil {
		return nil, station.E(op, station.KindInvalid, err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", c.conn.SAS(c.now().Add(time.Hour)))
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, station.E(op, station.KindUnavailable, ctx.Err())
		}
		return nil, station.Errorf(op, station.KindUnavailable, "%s is not reachable: %w: check the network and the connection string's HostName", c.conn.HostName, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, station.Errorf(op, station.KindUnavailable, "read the answer of %s: %w", c.conn.HostName, err)
	}
	if resp.StatusCode >= 300 {
		return nil, serviceError(op, resp, raw)
	}
	if out == nil || len(bytes.TrimSpace(raw)) == 0 {
		return resp.Header, nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the service answered %d with a body that is not the expected JSON: %v", resp.StatusCode, err)
	}
	return resp.Header, nil
}

// serviceError turns a service API error answer into a station error that
// carries the DPS error code and message.
func serviceError(op string, resp *http.Response, raw []byte) error {
	kind := kindOfStatus(resp.StatusCode)
	var d ErrorDetails
	if json.Unmarshal(raw, &d) == nil && d.ErrorCode != 0 {
		return &station.Error{Op: op, Kind: kind, Err: fmt.Errorf("DPS answered %d: %w", resp.StatusCode, &d)}
	}
	msg := strings.TrimSpace(string(raw))
	if len(msg) > 200 {
		msg = msg[:200] + "…"
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	return station.Errorf(op, kind, "DPS answered %d: %s", resp.StatusCode, msg)
}

// kindOfStatus maps an HTTP status of a DPS answer to a station Kind.
func kindOfStatus(status int) station.Kind {
	switch {
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return station.KindUnauthorized
	case status == http.StatusNotFound:
		return station.KindNotFound
	case status == http.StatusConflict || status == http.StatusPreconditionFailed:
		return station.KindConflict
	case status == http.StatusTooManyRequests || status >= 500:
		return station.KindUnavailable
	case status >= 400:
		return station.KindInvalid
	}
	return station.KindOther
}

// NewTPMEnrollment returns an enabled individual enrollment of regID
// attested by the EK (its TPM2B_PUBLIC), ready for PutEnrollment.
func NewTPMEnrollment(regID string, ekPublic []byte) *IndividualEnrollment {
	return &IndividualEnrollment{
		RegistrationID: regID,
		Attestation: AttestationMechanism{
			Type: AttestationTPM,
			TPM:  &TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ekPublic)},
		},
		ProvisioningStatus: "enabled",
	}
}
