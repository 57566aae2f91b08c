package dps

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
)

// DefaultDeviceAPIVersion is the api-version a DeviceClient sends: that of
// the Node, Python and Embedded C SDKs (§0).
const DefaultDeviceAPIVersion = "2019-03-31"

// Bounds of the client's waits (§1.5): DPS's retry-after is clamped to
// [minRetryAfter, maxRetryAfter] and defaults to defaultRetryAfter; a
// registration polls at most maxPolls times; a SAS token lives tokenLife.
const (
	minRetryAfter     = 1 * time.Second
	maxRetryAfter     = 30 * time.Second
	defaultRetryAfter = 2 * time.Second
	maxPolls          = 60
	maxThrottled      = 3 // 429/503 answers tolerated per registration
	tokenLife         = time.Hour
	maxBody           = 1 << 20
)

// TPMDevice is the TPM a device registers with: *hsm.TPM satisfies it.
// Implementations serialise access to the TPM.
type TPMDevice interface {
	// Endorsement returns the EK's and SRK's TPM2B_PUBLIC (creating them
	// when absent).
	Endorsement(ctx context.Context) (*station.Endorsement, error)
	// ActivateDPS imports the ID key of a DPS activation blob (the decoded
	// authenticationKey) and keeps it for HMAC.
	ActivateDPS(ctx context.Context, blob []byte) error
	// HMAC signs data with the imported ID key, inside the TPM.
	HMAC(ctx context.Context, data []byte) ([]byte, error)
}

// DeviceClient registers a device with a DPS device endpoint over HTTPS
// (§1). The zero value needs Endpoint and IDScope; it is safe for
// concurrent use if its fields are not changed.
type DeviceClient struct {
	// Endpoint is the DPS device endpoint, host or host:port, always
	// reached over HTTPS (a leading https:// is tolerated).
	Endpoint string
	// IDScope is the DPS ID scope, e.g. 0ne00AB12CD.
	IDScope string
	// HTTP sends the requests; its TLS roots decide which servers the
	// device trusts. Nil means a client with the system roots.
	HTTP *http.Client
	// APIVersion is sent as api-version; empty means
	// DefaultDeviceAPIVersion.
	APIVersion string
	// Now is the clock of SAS expiries; nil means time.Now.
	Now func() time.Time
	// Progress, when set, is told each stage of a registration: "register",
	// "challenge", "activated", "assigning", "assigned" (or the final
	// status), with a detail for a person that holds no secret.
	Progress func(stage, detail string)
	// CSR, when set, is a PKCS#10 request (DER) sent with the registration
	// as clientCertificateCsr: a DPS that issues certificates answers with
	// the issued chain in DeviceRegistrationState.IssuedClientCertificate.
	CSR []byte
}

// csr returns the clientCertificateCsr of c's registrations.
func (c *DeviceClient) csr() string {
	if len(c.CSR) == 0 {
		return ""
	}
	return base64.StdEncoding.EncodeToString(c.CSR)
}

// NewTLSClient returns an HTTP client that trusts the PEM certificates in
// trustBundle (the system roots when it is empty) with a per-request
// timeout. Kinds: Invalid (no certificate in a non-empty bundle).
func NewTLSClient(trustBundle string, timeout time.Duration) (*http.Client, error) {
	cfg, err := TLSConfig(trustBundle)
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = cfg
	return &http.Client{Transport: tr, Timeout: timeout}, nil
}

// TLSConfig returns a TLS 1.2+ client configuration whose roots are the PEM
// certificates in trustBundle, or the system roots when it is empty.
// Kinds: Invalid.
func TLSConfig(trustBundle string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if strings.TrimSpace(trustBundle) == "" {
		return cfg, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(trustBundle)) {
		return nil, station.Errorf("read trust bundle", station.KindInvalid,
			"the trust bundle holds no PEM certificate: write the CA certificates of the DPS and hub servers")
	}
	cfg.RootCAs = pool
	return cfg, nil
}

func (c *DeviceClient) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *DeviceClient) progress(stage, detail string) {
	if c.Progress != nil {
		c.Progress(stage, detail)
	}
}

// RegisterTPM registers the device regID with TPM attestation, as in §4.3:
// an unauthenticated register that DPS answers with a 401 challenge, the
// challenge's activation blob imported into tpm, the register sent again
// with a SAS token signed inside the TPM, then polls of the operation
// (honouring retry-after, bounded, until ctx is done) until the status is
// final. When DPS assigns the device, the final state's activation blob is
// imported too (§4.8, as the C, Node and aziot SDKs do), so that tpm's HMAC
// then signs the device's IoT Hub tokens. payload, when not nil, is sent as
// custom allocation data.
//
// A final status of failed or disabled is returned in the state with a nil
// error. Kinds: Unauthorized (DPS refused the attestation, or its TLS
// certificate did not check out), NotFound (DPS knows no such registration
// or operation), Unavailable (no answer, throttled, a server error),
// Invalid (a malformed answer, bad arguments), and those of tpm.
func (c *DeviceClient) RegisterTPM(ctx context.Context, regID string, tpm TPMDevice, payload json.RawMessage) (*DeviceRegistrationState, error) {
	const op = "register with DPS"
	if c.Endpoint == "" || c.IDScope == "" {
		return nil, station.Errorf(op, station.KindInvalid, "the DPS endpoint and ID scope must be set: write the device's provisioning config")
	}
	if err := station.ValidRegistrationID(regID); err != nil {
		return nil, err
	}
	e, err := tpm.Endorsement(ctx)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(DeviceRegistration{
		RegistrationID: regID,
		TPM: &TPMAttestation{
			EndorsementKey: base64.StdEncoding.EncodeToString(e.EKPublic),
			StorageRootKey: base64.StdEncoding.EncodeToString(e.SRKPublic),
		},
		Payload: payload,
	})
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the custom payload is not JSON: %w", err)
	}
	base := c.baseURL(regID)

	// 1. The challenge.
	c.progress("register", "sending the TPM's EK and SRK to "+c.Endpoint)
	res, err := c.do(ctx, op, http.MethodPut, base+"/register", body, "")
	for throttled := 0; err == nil && (res.status == http.StatusTooManyRequests || res.status == http.StatusServiceUnavailable) && throttled < maxThrottled; throttled++ {
		c.progress("throttled", fmt.Sprintf("DPS answered %d; trying again", res.status))
		if err := sleep(ctx, clampRetry(res.retryAfter)); err != nil {
			return nil, station.E(op, station.KindUnavailable, err)
		}
		res, err = c.do(ctx, op, http.MethodPut, base+"/register", body, "")
	}
	if err != nil {
		return nil, err
	}
	if res.status != http.StatusUnauthorized {
		return nil, c.unexpected(op, res, "a 401 TPM challenge")
	}
	var ch TPMChallenge
	if err := json.Unmarshal(res.body, &ch); err != nil || ch.AuthenticationKey == "" {
		return nil, errorFromAnswer(op, res)
	}
	blob, err := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the challenge's authenticationKey is not base64: the server is faulty")
	}
	c.progress("challenge", fmt.Sprintf("DPS sent a %d-byte activation blob", len(blob)))

	// 2. Activation and the authenticated register.
	if err := tpm.ActivateDPS(ctx, blob); err != nil {
		return nil, err
	}
	c.progress("activated", "the DPS key is in the TPM")
	keyName := ch.KeyName
	if keyName == "" {
		keyName = RegistrationKeyName
	}
	token, err := BuildSAS(ctx, DeviceResource(c.IDScope, regID), c.now().Add(tokenLife), keyName, tpm.HMAC)
	if err != nil {
		return nil, err
	}
	st, err := c.call(ctx, op, http.MethodPut, base+"/register", body, token)
	if err != nil {
		return nil, err
	}

	// 3. Polls.
	rs, err := c.poll(ctx, op, base, regID, st, token)
	if err != nil || rs.Status != StatusAssigned {
		return rs, err
	}

	// 4. The hub key (§4.8).
	if rs.TPM == nil || rs.TPM.AuthenticationKey == "" {
		return nil, station.Errorf(op, station.KindInvalid,
			"DPS assigned the device but sent no hub key (registrationState.tpm.authenticationKey): the server is faulty")
	}
	blob, err = base64.StdEncoding.DecodeString(rs.TPM.AuthenticationKey)
	if err != nil {
		return nil, station.Errorf(op, station.KindInvalid, "the assigned state's authenticationKey is not base64: the server is faulty")
	}
	if err := tpm.ActivateDPS(ctx, blob); err != nil {
		return nil, err
	}
	c.progress(StatusAssigned, fmt.Sprintf("device %s on hub %s", rs.DeviceID, rs.AssignedHub))
	return rs, nil
}

// poll follows an accepted registration: it polls the operation of st with
// token (honouring retry-after, at most maxPolls times, until ctx is done)
// until its status is final, and returns the final registration state,
// whose Status is always set. A final status other than assigned is
// reported to Progress and returned with a nil error.
func (c *DeviceClient) poll(ctx context.Context, op, base, regID string, st opState, token string) (*DeviceRegistrationState, error) {
	var err error
	for polls := 0; st.status == StatusAssigning || st.status == StatusUnassigned || st.status == ""; polls++ {
		if st.op.OperationID == "" {
			return nil, station.Errorf(op, station.KindInvalid, "DPS answered %q without an operationId: the server is faulty", st.status)
		}
		if polls >= maxPolls {
			return nil, station.Errorf(op, station.KindUnavailable,
				"DPS was still assigning after %d polls: check the DPS server, then register again", polls)
		}
		c.progress("assigning", "waiting "+st.wait.String()+" for DPS to assign a hub")
		if err := sleep(ctx, st.wait); err != nil {
			return nil, station.E(op, station.KindUnavailable, err)
		}
		st, err = c.call(ctx, op, http.MethodGet, base+"/operations/"+url.PathEscape(st.op.OperationID), nil, token)
		if err != nil {
			return nil, err
		}
	}
	rs := st.op.RegistrationState
	if rs == nil {
		rs = &DeviceRegistrationState{RegistrationID: regID}
	}
	if rs.Status == "" {
		rs.Status = st.status
	}
	if st.status != StatusAssigned {
		c.progress(st.status, fmt.Sprintf("DPS error %d: %s", rs.ErrorCode, rs.ErrorMessage))
	}
	return rs, nil
}

// baseURL returns https://{endpoint}/{scope}/registrations/{regId}.
func (c *DeviceClient) baseURL(regID string) string {
	host := strings.TrimSuffix(strings.TrimPrefix(c.Endpoint, "https://"), "/")
	return "https://" + host + "/" + url.PathEscape(c.IDScope) + "/registrations/" + url.PathEscape(regID)
}

// answer is one HTTP answer, its body read.
type answer struct {
	status     int
	body       []byte
	retryAfter time.Duration // 0 when absent or unreadable
}

// opState is an answer read as a RegistrationOperationStatus.
type opState struct {
	op     RegistrationOperationStatus
	status string
	wait   time.Duration
}

// call sends an authenticated request and reads a RegistrationOperationStatus,
// waiting out up to maxThrottled 429 or 503 answers.
func (c *DeviceClient) call(ctx context.Context, op, method, u string, body []byte, token string) (opState, error) {
	for throttled := 0; ; throttled++ {
		res, err := c.do(ctx, op, method, u, body, token)
		if err != nil {
			return opState{}, err
		}
		if (res.status == http.StatusTooManyRequests || res.status == http.StatusServiceUnavailable) && throttled < maxThrottled {
			c.progress("throttled", fmt.Sprintf("DPS answered %d; trying again", res.status))
			if err := sleep(ctx, clampRetry(res.retryAfter)); err != nil {
				return opState{}, station.E(op, station.KindUnavailable, err)
			}
			continue
		}
		if res.status != http.StatusOK && res.status != http.StatusAccepted {
			return opState{}, errorFromAnswer(op, res)
		}
		var st opState
		if err := json.Unmarshal(res.body, &st.op); err != nil {
			return opState{}, station.Errorf(op, station.KindInvalid,
				"DPS answered %d with a body that is not a registration status (%v): the server is faulty", res.status, err)
		}
		st.status = st.op.Status
		if st.status == "" && st.op.RegistrationState != nil {
			st.status = st.op.RegistrationState.Status
		}
		st.wait = clampRetry(res.retryAfter)
		return st, nil
	}
}

// do sends one request. Network and TLS failures become errors; every HTTP
// status is returned as an answer.
func (c *DeviceClient) do(ctx context.Context, op, method, u string, body []byte, token string) (answer, error) {
	v := c.APIVersion
	if v == "" {
		v = DefaultDeviceAPIVersion
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u+"?api-version="+url.QueryEscape(v), rd)
	if err != nil {
		return answer{}, station.Errorf(op, station.KindInvalid, "the DPS endpoint %q does not make a URL: write host or host:port", c.Endpoint)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	req.Header.Set("User-Agent", "kiln-agent")
	if token != "" {
		req.Header.Set("Authorization", token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return answer{}, transportError(ctx, op, c.Endpoint, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return answer{}, station.Errorf(op, station.KindUnavailable, "read the answer of %s: %v: check the network and try again", c.Endpoint, err)
	}
	res := answer{status: resp.StatusCode, body: b}
	if s := resp.Header.Get("retry-after"); s != "" {
		if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n > 0 {
			res.retryAfter = time.Duration(min(n, 3600)) * time.Second
		}
	}
	return res, nil
}

// transportError classifies a failure to get an answer at all.
func transportError(ctx context.Context, op, endpoint string, err error) error {
	if ctx.Err() != nil {
		return station.E(op, station.KindUnavailable, ctx.Err())
	}
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	var tv *tls.CertificateVerificationError
	if errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci) || errors.As(err, &tv) {
		return station.Errorf(op, station.KindUnauthorized,
			"the certificate of %s did not check out (%v): put the server's CA in the device's trust bundle", endpoint, unwrapURL(err))
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return station.Errorf(op, station.KindUnavailable, "%s did not answer in time: check the network and the DPS server", endpoint)
	}
	return station.Errorf(op, station.KindUnavailable, "cannot reach %s (%v): check the endpoint, the network and that the DPS server runs", endpoint, unwrapURL(err))
}

// unwrapURL drops the *url.Error wrapper, whose text repeats the URL.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// errorFromAnswer turns a DPS error answer into a station error whose kind
// follows the HTTP status and whose text carries DPS's error code and
// message.
func errorFromAnswer(op string, res answer) error {
	var d ErrorDetails
	msg := fmt.Sprintf("DPS answered HTTP %d", res.status)
	if json.Unmarshal(res.body, &d) == nil && (d.ErrorCode != 0 || d.Message != "") {
		msg = fmt.Sprintf("DPS answered HTTP %d, error %d: %s", res.status, d.ErrorCode, d.Message)
	}
	switch s := res.status; {
	case s == http.StatusUnauthorized || s == http.StatusForbidden:
		return station.Errorf(op, station.KindUnauthorized, "%s: check that the device is enrolled with these credentials (its TPM's endorsement key or its symmetric key)", msg)
	case s == http.StatusNotFound:
		return station.Errorf(op, station.KindNotFound, "%s: check the ID scope and that the device is enrolled", msg)
	case s == http.StatusTooManyRequests || s >= 500:
		return station.Errorf(op, station.KindUnavailable, "%s: try again later", msg)
	default:
		return station.Errorf(op, station.KindInvalid, "%s: check the device's provisioning config", msg)
	}
}

// unexpected reports an answer of the wrong kind: an error body becomes its
// error; a success where a challenge was due is a faulty server.
func (c *DeviceClient) unexpected(op string, res answer, want string) error {
	if res.status >= 300 {
		return errorFromAnswer(op, res)
	}
	return station.Errorf(op, station.KindInvalid, "DPS answered HTTP %d where %s was due: the server is not a DPS or is faulty", res.status, want)
}

// clampRetry bounds a retry-after wait.
func clampRetry(d time.Duration) time.Duration {
	if d == 0 {
		return defaultRetryAfter
	}
	return min(max(d, minRetryAfter), maxRetryAfter)
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
