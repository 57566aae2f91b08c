package devserver_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// TestTPMRegistrationEndToEnd drives a TPM device on the simulator through
// the HTTPS device API: challenge, activation, the SAS-authenticated
// register, polls that see "assigning" first, the final "assigned" with
// the second blob, and then the hub's view of the device, whose key is the
// one in the TPM.
func TestTPMRegistrationEndToEnd(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{AssignmentDelay: 300 * time.Millisecond})
	dev := newSimDevice(t)
	const regID = "kiln-unit-0001"
	e.enroll(t, regID, dev.ek, func(en *dps.IndividualEnrollment) {
		en.InitialTwin = &dps.InitialTwin{Properties: &dps.InitialTwinProperties{Desired: json.RawMessage(`{"line":"A"}`)}}
	})

	reg := e.register(ctx, t, regID, dev)

	// The challenge body: exactly DPS's keys, no status (§4.3).
	var keys map[string]any
	reg.challenge.decode(t, &keys)
	if _, ok := keys["status"]; ok {
		t.Errorf("the challenge has a status key: %s", reg.challenge.body)
	}
	if keys["keyName"] != "registration" || keys["message"] == nil || keys["authenticationKey"] == nil {
		t.Errorf("challenge body %s", reg.challenge.body)
	}
	if v, ok := keys["unencryptedAuthenticationKey"]; !ok || v != nil {
		t.Errorf("challenge body %s: want unencryptedAuthenticationKey null", reg.challenge.body)
	}
	// The register answer: 202, assigning, an operation ID, retry-after.
	var acc map[string]any
	reg.accepted.decode(t, &acc)
	if acc["status"] != "assigning" || acc["operationId"] == "" || acc["registrationState"] != nil {
		t.Errorf("register answer %s", reg.accepted.body)
	}
	if reg.accepted.header.Get("retry-after") == "" {
		t.Error("the register answer has no retry-after")
	}
	// The first poll sees assigning, with registrationState {registrationId, status}.
	if len(reg.polls) < 2 || reg.polls[0].status != http.StatusAccepted {
		t.Fatalf("want a 202 poll before the 200; got %d polls", len(reg.polls))
	}
	var first dps.RegistrationOperationStatus
	reg.polls[0].decode(t, &first)
	if diff := cmp.Diff(&dps.DeviceRegistrationState{RegistrationID: regID, Status: "assigning"}, first.RegistrationState); diff != "" {
		t.Errorf("assigning poll state (-want +got):\n%s", diff)
	}
	// The final answer.
	st := reg.final.RegistrationState
	if reg.final.Status != "assigned" || st.Status != "assigned" || st.AssignedHub == "" || st.DeviceID != regID ||
		st.TPM == nil || st.TPM.AuthenticationKey == "" || st.Substatus != "initialAssignment" || st.ETag == "" ||
		st.CreatedDateTimeUTC.IsZero() || st.LastUpdatedDateTimeUTC.IsZero() {
		t.Errorf("final answer %s", reg.finalRaw)
	}
	if st.AssignedHub != hub1 && st.AssignedHub != hub2 {
		t.Errorf("assigned to %s, not a linked hub", st.AssignedHub)
	}
	// Key order (§1.4, §2.6): operationId, status, registrationState; tpm
	// first inside it and deviceId before status.
	raw := string(reg.finalRaw)
	if !ordered(raw, `"operationId"`, `"status":"assigned"`, `"registrationState"`, `"tpm"`, `"registrationId"`,
		`"createdDateTimeUtc"`, `"assignedHub"`, `"deviceId"`, `"status"`, `"substatus"`, `"lastUpdatedDateTimeUtc"`, `"etag"`) {
		t.Errorf("keys out of DPS order: %s", raw)
	}
	if !strings.Contains(raw, `Z"`) || !timestamp7.MatchString(raw) {
		t.Errorf("timestamps are not in the 7-digit format: %s", raw)
	}

	// The hub knows the device, with the key the TPM holds.
	hd, err := e.srv.HubDevice(ctx, strings.ToUpper(st.AssignedHub), regID)
	if err != nil {
		t.Fatal(err)
	}
	if hd.DeviceID != regID || !hd.Enabled || len(hd.PrimaryKey) != dps.KeySize || !bytes.Equal(hd.Twin, []byte(`{"line":"A"}`)) {
		t.Errorf("hub device %+v", hd)
	}
	tok, err := dps.BuildSAS(ctx, dps.HubDeviceResource(st.AssignedHub, regID), time.Now().Add(time.Hour), "", dev.sign)
	if err != nil {
		t.Fatal(err)
	}
	sas, err := dps.ParseSAS(tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := sas.Verify(hd.PrimaryKey, time.Now()); err != nil {
		t.Errorf("a hub token signed in the TPM does not verify with the hub device's key: %v", err)
	}
	if _, err := e.srv.HubDevice(ctx, st.AssignedHub, "someone-else"); err == nil {
		t.Error("HubDevice found a device that was never registered")
	}

	// The registration status lookup answers the bare state.
	tokDPS := deviceToken(ctx, t, e.srv.IDScope(), regID, dev, time.Now().Add(time.Hour))
	r := e.do(t, http.MethodPost, "/"+e.srv.IDScope()+"/registrations/"+regID+"?api-version=2019-03-31", tokDPS, `{"registrationId":"`+regID+`"}`)
	var lookup dps.DeviceRegistrationState
	r.decode(t, &lookup)
	if r.status != http.StatusOK || lookup.Status != "assigned" || lookup.AssignedHub != st.AssignedHub {
		t.Errorf("lookup: %d %s", r.status, r.body)
	}
	// So does the service API.
	r = e.service(t, http.MethodGet, "/registrations/"+regID, nil)
	var svc dps.DeviceRegistrationState
	r.decode(t, &svc)
	if r.status != http.StatusOK || svc.AssignedHub != st.AssignedHub || svc.DeviceID != regID || svc.TPM != nil {
		t.Errorf("service registration: %d %s", r.status, r.body)
	}
}

// timestamp7 is a DPS timestamp: seven fractional digits and a Z.
var timestamp7 = regexp.MustCompile(`"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z"`)

// ordered reports whether the substrings appear in s in this order.
func ordered(s string, subs ...string) bool {
	i := 0
	for _, sub := range subs {
		j := strings.Index(s[i:], sub)
		if j < 0 {
			return false
		}
		i += j + len(sub)
	}
	return true
}

func TestTPMNegative(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{})
	scope := e.srv.IDScope()
	dev := newSoftDevice(t, true)
	other := newSoftDevice(t, false)
	e.enroll(t, "unit-a", dev.ek)
	e.enroll(t, "unit-disabled", dev.ek, func(en *dps.IndividualEnrollment) { en.ProvisioningStatus = "disabled" })

	t.Run("wrong EK", func(t *testing.T) {
		r := e.do(t, http.MethodPut, registerPath(scope, "unit-a"), "", challengeBody("unit-a", other))
		if got := r.errorBody(t, http.StatusUnauthorized); got.ErrorCode != dps.CodeUnauthorized {
			t.Errorf("errorCode %d", got.ErrorCode)
		}
	})
	t.Run("enrollment EK as bare TPMT_PUBLIC", func(t *testing.T) {
		en := dps.IndividualEnrollment{RegistrationID: "unit-bare", Attestation: dps.AttestationMechanism{
			Type: "tpm", TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(dev.ek[2:])}}}
		if r := e.service(t, http.MethodPut, "/enrollments/unit-bare", en); r.status != http.StatusOK {
			t.Fatalf("%d %s", r.status, r.body)
		}
		if r := e.do(t, http.MethodPut, registerPath(scope, "unit-bare"), "", challengeBody("unit-bare", dev)); r.status != http.StatusUnauthorized || !strings.Contains(string(r.body), "authenticationKey") {
			t.Errorf("challenge for a bare-TPMT enrollment: %d %s", r.status, r.body)
		}
	})
	t.Run("no enrollment", func(t *testing.T) {
		r := e.do(t, http.MethodPut, registerPath(scope, "nobody"), "", challengeBody("nobody", dev))
		r.errorBody(t, http.StatusUnauthorized)
	})
	t.Run("wrong ID scope", func(t *testing.T) {
		r := e.do(t, http.MethodPut, registerPath("0ne00000000", "unit-a"), "", challengeBody("unit-a", dev))
		r.errorBody(t, http.StatusUnauthorized)
	})
	t.Run("body registrationId differs", func(t *testing.T) {
		r := e.do(t, http.MethodPut, registerPath(scope, "unit-a"), "", challengeBody("unit-b", dev))
		r.errorBody(t, http.StatusBadRequest)
	})
	t.Run("expired SAS", func(t *testing.T) {
		r := e.do(t, http.MethodPut, registerPath(scope, "unit-a"), "", challengeBody("unit-a", dev))
		var ch dps.TPMChallenge
		r.decode(t, &ch)
		blob, _ := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
		if err := dev.activate(ctx, blob); err != nil {
			t.Fatal(err)
		}
		tok := deviceToken(ctx, t, scope, "unit-a", dev, time.Now().Add(-time.Minute))
		e.do(t, http.MethodPut, registerPath(scope, "unit-a"), tok, challengeBody("unit-a", dev)).errorBody(t, http.StatusUnauthorized)
		// A forged signature.
		forged := strings.Replace(deviceToken(ctx, t, scope, "unit-a", dev, time.Now().Add(time.Hour)), "sig=", "sig=AAAA", 1)
		e.do(t, http.MethodPut, registerPath(scope, "unit-a"), forged, challengeBody("unit-a", dev)).errorBody(t, http.StatusUnauthorized)
		// A token for another registration.
		wrongRes := deviceToken(ctx, t, scope, "unit-disabled", dev, time.Now().Add(time.Hour))
		e.do(t, http.MethodPut, registerPath(scope, "unit-a"), wrongRes, challengeBody("unit-a", dev)).errorBody(t, http.StatusUnauthorized)
		// The valid token passes, also without the tpm object (aziot).
		ok := deviceToken(ctx, t, scope, "unit-a", dev, time.Now().Add(time.Hour))
		if r := e.do(t, http.MethodPut, registerPath(scope, "unit-a"), ok, `{"registrationId":"unit-a"}`); r.status != http.StatusAccepted {
			t.Errorf("valid token without tpm: %d %s", r.status, r.body)
		}
	})
	t.Run("unknown operation", func(t *testing.T) {
		tok := deviceToken(ctx, t, scope, "unit-a", dev, time.Now().Add(time.Hour))
		r := e.do(t, http.MethodGet, "/"+scope+"/registrations/unit-a/operations/4.0000000000000000.nope?api-version=2019-03-31", tok, nil)
		r.errorBody(t, http.StatusNotFound)
		// Without credentials, the device is not told whether it exists.
		r = e.do(t, http.MethodGet, "/"+scope+"/registrations/unit-a/operations/4.0000000000000000.nope?api-version=2019-03-31", "", nil)
		r.errorBody(t, http.StatusUnauthorized)
	})
	t.Run("disabled enrollment", func(t *testing.T) {
		reg := e.register(ctx, t, "unit-disabled", dev)
		st := reg.final.RegistrationState
		if reg.final.Status != "disabled" || st.Status != "disabled" || st.RegistrationID != "unit-disabled" || st.ErrorCode == 0 ||
			st.ErrorMessage == "" || st.AssignedHub != "" || st.TPM != nil {
			t.Errorf("disabled: %s", reg.finalRaw)
		}
		if _, err := e.srv.HubDevice(ctx, hub1, "unit-disabled"); err == nil {
			t.Error("a disabled device is in the hub directory")
		}
	})
}

func TestAllocation(t *testing.T) {
	ctx := t.Context()
	dev := newSoftDevice(t, true)

	t.Run("no hub", func(t *testing.T) {
		e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hub1}}}) // not applying the policy
		e.enroll(t, "lonely", dev.ek)
		reg := e.register(ctx, t, "lonely", dev)
		st := reg.final.RegistrationState
		if reg.final.Status != "failed" || st.ErrorCode != dps.CodeHubNotSpecified || st.ErrorMessage == "" || st.Status != "failed" {
			t.Errorf("no hub: %s", reg.finalRaw)
		}
		if !ordered(string(reg.finalRaw), `"operationId"`, `"status"`, `"registrationState"`, `"registrationId"`,
			`"createdDateTimeUtc"`, `"status":"failed"`, `"errorCode"`, `"errorMessage"`, `"lastUpdatedDateTimeUtc"`, `"etag"`) {
			t.Errorf("failed body out of order: %s", reg.finalRaw)
		}
	})
	t.Run("static", func(t *testing.T) {
		e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hub1, ApplyAllocationPolicy: true}, {Name: hub2}}})
		e.enroll(t, "static-1", dev.ek, func(en *dps.IndividualEnrollment) {
			en.AllocationPolicy, en.IoTHubs, en.DeviceID = "static", []string{strings.ToUpper(hub2)}, "custom-device"
		})
		e.enroll(t, "static-unlinked", dev.ek, func(en *dps.IndividualEnrollment) {
			en.AllocationPolicy, en.IoTHubs = "static", []string{"elsewhere.azure-devices.net"}
		})
		reg := e.register(ctx, t, "static-1", dev)
		if st := reg.final.RegistrationState; st.AssignedHub != hub2 || st.DeviceID != "custom-device" {
			t.Errorf("static: %s", reg.finalRaw)
		}
		if _, err := e.srv.HubDevice(ctx, hub2, "custom-device"); err != nil {
			t.Error(err)
		}
		reg = e.register(ctx, t, "static-unlinked", dev)
		if st := reg.final.RegistrationState; reg.final.Status != "failed" || st.ErrorCode != dps.CodeHubNotSpecified {
			t.Errorf("static to an unlinked hub: %s", reg.finalRaw)
		}
	})
	t.Run("hashed", func(t *testing.T) {
		e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{
			{Name: hub1, Weight: 1, ApplyAllocationPolicy: true}, {Name: hub2, Weight: 3, ApplyAllocationPolicy: true},
		}})
		counts := map[string]int{}
		first := map[string]string{}
		for i := range 24 {
			id := "hashed-" + string(rune('a'+i))
			e.enroll(t, id, dev.ek)
			reg := e.register(ctx, t, id, dev)
			hub := reg.final.RegistrationState.AssignedHub
			counts[hub]++
			first[id] = hub
		}
		if counts[hub1] == 0 || counts[hub2] <= counts[hub1] {
			t.Errorf("weights 1:3 gave %v", counts)
		}
		// The same ID lands on the same hub again: re-provisioned to its
		// initial assignment, as real DPS answers a repeated registration.
		for _, id := range []string{"hashed-a", "hashed-b", "hashed-c"} {
			if got := e.register(ctx, t, id, dev).final.RegistrationState; got.AssignedHub != first[id] || got.Substatus != dps.SubstatusReprovisionedToInitialAssignment {
				t.Errorf("%s: hub %s then %s (%s)", id, first[id], got.AssignedHub, got.Substatus)
			}
		}
	})
}

// TestHeadersAndRoutes checks what a recorder sees exactly: the lower-case
// retry-after header, case-insensitive routes and percent-decoded IDs.
func TestHeadersAndRoutes(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{})
	dev := newSoftDevice(t, true)
	e.enroll(t, "Mixed.Case:1", dev.ek)
	scope := e.srv.IDScope()

	// The challenge through Handler, with an upper-case path and an
	// encoded registration ID.
	body, _ := json.Marshal(challengeBody("mixed.case:1", dev))
	rec := httptest.NewRecorder()
	e.srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPut,
		"/"+strings.ToLower(scope)+"/REGISTRATIONS/mixed.case%3A1/Register?api-version=2021-06-01", bytes.NewReader(body)))
	if rec.Code != http.StatusUnauthorized {
		t.Fatalf("challenge: %d %s", rec.Code, rec.Body)
	}
	var ch dps.TPMChallenge
	json.Unmarshal(rec.Body.Bytes(), &ch)
	blob, _ := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	if err := dev.activate(ctx, blob); err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPut, "/"+scope+"/registrations/MIXED.CASE%3A1/register", bytes.NewReader(body))
	req.Header.Set("Authorization", deviceToken(ctx, t, scope, "MIXED.CASE:1", dev, time.Now().Add(time.Hour)))
	rec = httptest.NewRecorder()
	e.srv.Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusAccepted {
		t.Fatalf("register: %d %s", rec.Code, rec.Body)
	}
	//lint:ignore SA1008 the SDKs need the header written in lower case, so the map key is not canonical on purpose.
	if got := rec.Header()["retry-after"]; len(got) != 1 || got[0] != "1" {
		t.Errorf(`header map key "retry-after" = %q, want ["1"] (written lower case, verbatim)`, got)
	}
	// Service routes ignore case too.
	if r := e.service(t, http.MethodGet, "/Enrollments/MIXED.CASE:1", nil); r.status != http.StatusOK {
		t.Errorf("GET /Enrollments/MIXED.CASE:1: %d %s", r.status, r.body)
	}
	if r := e.service(t, http.MethodPost, "/enrollments/mixed.case:1/AttestationMechanism", nil); r.status != http.StatusOK || !strings.Contains(string(r.body), `"type":"tpm"`) {
		t.Errorf("attestation mechanism: %d %s", r.status, r.body)
	}
	// Unknown routes and wrong methods get DPS error bodies.
	e.service(t, http.MethodGet, "/nothing/here", nil).errorBody(t, http.StatusNotFound)
	e.do(t, http.MethodGet, registerPath(scope, "x"), "", nil).errorBody(t, http.StatusMethodNotAllowed)
}

// TestCloseLeavesNoGoroutines closes a server with an assignment pending
// and checks that nothing of it keeps running, and that the operation
// resumes after a restart.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	ctx := t.Context()
	e := start(t, devserver.Config{AssignmentDelay: time.Hour})
	dev := newSoftDevice(t, true)
	e.enroll(t, "pending", dev.ek)
	scope := e.srv.IDScope()
	r := e.do(t, http.MethodPut, registerPath(scope, "pending"), "", challengeBody("pending", dev))
	var ch dps.TPMChallenge
	r.decode(t, &ch)
	blob, _ := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	if err := dev.activate(ctx, blob); err != nil {
		t.Fatal(err)
	}
	tok := deviceToken(ctx, t, scope, "pending", dev, time.Now().Add(time.Hour))
	r = e.do(t, http.MethodPut, registerPath(scope, "pending"), tok, nil)
	var op dps.RegistrationOperationStatus
	r.decode(t, &op)
	e.client.Transport.(*http.Transport).CloseIdleConnections()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	checkNoGoroutines(t)

	e.cfg.AssignmentDelay = 0
	e2 := startWith(t, e.cfg, e.pool)
	deadline := time.Now().Add(10 * time.Second)
	for {
		p := e2.do(t, http.MethodGet, "/"+scope+"/registrations/pending/operations/"+op.OperationID, tok, nil)
		if p.status == http.StatusOK {
			break
		}
		if p.status != http.StatusAccepted || time.Now().After(deadline) {
			t.Fatalf("resumed operation: %d %s", p.status, p.body)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
