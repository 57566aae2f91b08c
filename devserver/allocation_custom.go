package devserver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// DefaultWebhookTimeout bounds a custom allocation webhook call when
// Config.WebhookClient is nil.
const DefaultWebhookTimeout = 30 * time.Second

// allocation is the outcome of a successful allocation.
type allocation struct {
	hub     string
	twin    json.RawMessage // desired properties of a webhook's initialTwin; nil: the enrollment's
	payload json.RawMessage // a webhook's payload, for registrationState.payload
}

// allocationContext is what a register request told about the device that
// its assignment may need: the address it came from (geoLatency) and its
// custom payload (custom). It is kept in memory from the register to the
// assignment; an assignment resumed after a restart runs without it.
type allocationContext struct {
	client  netip.Addr
	payload json.RawMessage
}

// maxAllocationContexts bounds the contexts kept for operations not yet
// assigned; beyond it, assignments run without theirs.
const maxAllocationContexts = 100_000

// allocationContexts holds the allocationContext of operations not yet
// assigned. Its zero value is ready.
type allocationContexts struct {
	mu sync.Mutex
	m  map[string]allocationContext
}

// keepAllocationContext remembers what operation opID's assignment may
// need from its register request d.
func (s *Server) keepAllocationContext(opID string, d *deviceRequest) {
	ac := allocationContext{client: clientAddr(d.remote)}
	if d.body != nil && len(d.body.Payload) > 0 && string(d.body.Payload) != "null" {
		ac.payload = d.body.Payload
	}
	if !ac.client.IsValid() && ac.payload == nil {
		return
	}
	c := &s.allocationContexts
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]allocationContext{}
	}
	if len(c.m) < maxAllocationContexts {
		c.m[opID] = ac
	}
}

// takeAllocationContext returns and forgets the context of operation opID.
func (s *Server) takeAllocationContext(opID string) allocationContext {
	c := &s.allocationContexts
	c.mu.Lock()
	defer c.mu.Unlock()
	ac := c.m[opID]
	delete(c.m, opID)
	return ac
}

// allocation allocates a hub to enrollment e (of group groupID, "" for an
// individual enrollment) by its policy: the webhook for custom, allocate
// for the others. prev is the device's registration before this attempt.
// It returns an *allocationError when the registration must fail, another
// error when the assignment could not run (the server is closing).
func (s *Server) allocation(ctx context.Context, e *dps.IndividualEnrollment, groupID string, prev *registration, ac allocationContext) (*allocation, error) {
	policy, _, _ := allocationCandidates(s.cfg.Hubs, e)
	if strings.EqualFold(policy, dps.AllocationCustom) && e.CustomAllocationDefinition != nil && e.CustomAllocationDefinition.WebhookURL != "" {
		return s.customAllocation(ctx, e, groupID, prev, ac)
	}
	hub, err := allocate(s.cfg.Hubs, e, e.RegistrationID, ac.client, s.cfg.Latencies)
	if err != nil {
		return nil, err
	}
	return &allocation{hub: hub}, nil
}

// AllocationRequest is the body DPS posts to a custom allocation webhook
// (dps-protocol.md §8): the enrollment (individual or group, attestation
// reduced to its type), the device's runtime context and the hubs it may
// be assigned to.
type AllocationRequest struct {
	IndividualEnrollment *dps.IndividualEnrollment `json:"individualEnrollment,omitempty"`
	EnrollmentGroup      *dps.EnrollmentGroup      `json:"enrollmentGroup,omitempty"`
	DeviceRuntimeContext DeviceRuntimeContext      `json:"deviceRuntimeContext"`
	LinkedHubs           []string                  `json:"linkedHubs"`
}

// DeviceRuntimeContext describes the registering device to a webhook.
type DeviceRuntimeContext struct {
	RegistrationID string `json:"registrationId"`
	// CurrentIoTHubHostName and CurrentDeviceID are set on
	// re-provisioning (DPS's sample spells the key currentIotHubHostName).
	CurrentIoTHubHostName string              `json:"currentIotHubHostName,omitempty"`
	CurrentDeviceID       string              `json:"currentDeviceId,omitempty"`
	X509                  *struct{}           `json:"x509,omitempty"`
	SymmetricKey          *struct{}           `json:"symmetricKey,omitempty"`
	TPM                   *dps.TPMAttestation `json:"tpm,omitempty"`
	Payload               json.RawMessage     `json:"payload,omitempty"`
}

// AllocationResponse is a webhook's answer (§8): the hub, one of the
// request's linkedHubs; optionally the device's initial twin and a payload
// returned to the device.
type AllocationResponse struct {
	IoTHubHostName string           `json:"iotHubHostName"`
	InitialTwin    *dps.InitialTwin `json:"initialTwin,omitempty"`
	Payload        json.RawMessage  `json:"payload,omitempty"`
}

// DecodeAllocationResponse reads a webhook's answer: an AllocationResponse
// whose iotHubHostName is one of linkedHubs (ignoring case; it returns the
// hub as linkedHubs spells it). Kinds: Invalid.
func DecodeAllocationResponse(body []byte, linkedHubs []string) (*AllocationResponse, string, error) {
	const op = "read allocation response"
	var res AllocationResponse
	if err := dps.Decode(body, &res); err != nil {
		return nil, "", err
	}
	if res.IoTHubHostName == "" {
		return nil, "", station.Errorf(op, station.KindInvalid, "the answer has no iotHubHostName")
	}
	for _, h := range linkedHubs {
		if strings.EqualFold(h, res.IoTHubHostName) {
			if res.InitialTwin != nil && res.InitialTwin.Properties != nil {
				if d := bytes.TrimSpace(res.InitialTwin.Properties.Desired); len(d) > 0 && d[0] != '{' && string(d) != "null" {
					return nil, "", station.Errorf(op, station.KindInvalid, "initialTwin.properties.desired is not a JSON object")
				}
			}
			return &res, h, nil
		}
	}
	return nil, "", station.Errorf(op, station.KindInvalid, "iotHubHostName %.100q is not one of the linked hubs %s", res.IoTHubHostName, strings.Join(linkedHubs, ", "))
}

// customAllocation posts an AllocationRequest to the enrollment's webhook
// and takes the hub it answers (§8). A failure to reach it, a non-2xx
// answer, a bad answer or a hub not offered make the registration fail
// with 400209, as DPS.
func (s *Server) customAllocation(ctx context.Context, e *dps.IndividualEnrollment, groupID string, prev *registration, ac allocationContext) (*allocation, error) {
	fail := func(msg string) (*allocation, error) {
		return nil, &allocationError{dps.CodeAllocationFailed, msg}
	}
	_, _, candidates := allocationCandidates(s.cfg.Hubs, e)
	req := AllocationRequest{LinkedHubs: make([]string, 0, len(candidates))}
	for _, h := range candidates {
		req.LinkedHubs = append(req.LinkedHubs, h.Name)
	}
	rc := &req.DeviceRuntimeContext
	rc.RegistrationID, rc.Payload = e.RegistrationID, ac.payload
	if prev.Hub != "" {
		rc.CurrentIoTHubHostName, rc.CurrentDeviceID = s.hubName(prev.Hub), prev.DeviceID
	}
	att := dps.AttestationMechanism{Type: e.Attestation.Type} // no secrets
	switch {
	case strings.EqualFold(e.Attestation.Type, dps.AttestationTPM) && e.Attestation.TPM != nil:
		rc.TPM = &dps.TPMAttestation{EndorsementKey: e.Attestation.TPM.EndorsementKey}
	case strings.EqualFold(e.Attestation.Type, dps.AttestationX509):
		rc.X509 = &struct{}{}
	default:
		rc.SymmetricKey = &struct{}{}
	}
	if groupID != "" {
		g, err := s.db.group(ctx, groupID)
		if err != nil {
			return nil, err
		}
		g.Attestation = att
		req.EnrollmentGroup = g
	} else {
		ie := *e
		ie.Attestation, ie.RegistrationState = att, nil
		req.IndividualEnrollment = &ie
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, station.E("custom allocation", station.KindInternal, err)
	}

	target := e.CustomAllocationDefinition.WebhookURL
	log := s.log.With("registrationId", e.RegistrationID, "webhook", redactURL(target))
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		log.Info("custom allocation failed", "err", "bad webhook URL")
		return fail("Custom allocation failed: the webhook URL is not a URL.")
	}
	hr.Header.Set("Content-Type", "application/json; charset=utf-8")
	hr.Header.Set("Accept", "application/json")
	client := s.cfg.WebhookClient
	if client == nil {
		client = &http.Client{Timeout: DefaultWebhookTimeout}
	}
	rsp, err := client.Do(hr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, station.E("custom allocation", station.KindUnavailable, ctx.Err()) // closing: resumed later
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL may hold the function key: keep it out of the log
		}
		log.Info("custom allocation failed", "err", err)
		return fail("Custom allocation failed: the webhook could not be reached.")
	}
	defer rsp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(rsp.Body, int64(s.cfg.Quotas.messageBytes())+1))
	if rsp.StatusCode < 200 || rsp.StatusCode > 299 {
		log.Info("custom allocation failed", "status", rsp.StatusCode)
		return fail("Custom allocation failed with status code: " + strconv.Itoa(rsp.StatusCode))
	}
	if err != nil || len(b) > s.cfg.Quotas.messageBytes() {
		log.Info("custom allocation failed", "err", "the answer could not be read or is too large", "bytes", len(b))
		return fail("Custom allocation failed: the webhook's answer could not be read or is too large.")
	}
	res, hub, err := DecodeAllocationResponse(b, req.LinkedHubs)
	if err != nil {
		log.Info("custom allocation failed", "err", err)
		return fail("Custom allocation failed: " + err.Error() + ".")
	}
	al := &allocation{hub: hub}
	if res.InitialTwin != nil && res.InitialTwin.Properties != nil {
		if d := res.InitialTwin.Properties.Desired; len(d) > 0 && string(d) != "null" {
			al.twin = d
		}
	}
	if len(res.Payload) > 0 && string(res.Payload) != "null" {
		al.payload = res.Payload
	}
	log.Info("custom allocation", "hub", hub)
	return al, nil
}

// hubName returns a linked hub's name as configured, or name itself.
func (s *Server) hubName(name string) string {
	for _, h := range s.cfg.Hubs {
		if strings.EqualFold(h.Name, name) {
			return h.Name
		}
	}
	return name
}

// redactURL returns a URL without its query and user information, where
// webhooks carry their keys (an Azure Function's code=...).
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(not a URL)"
	}
	u.RawQuery, u.User, u.Fragment = "", nil, ""
	return u.String()
}
