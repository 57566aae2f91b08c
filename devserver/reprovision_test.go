package devserver_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// twinOf is an initial twin with desired properties and tags.
func twinOf(desired, tags string) *dps.InitialTwin {
	return &dps.InitialTwin{Tags: json.RawMessage(tags), Properties: &dps.InitialTwinProperties{Desired: json.RawMessage(desired)}}
}

// reenroll replaces the enrollment regID, keeping its keys, after edit.
func (e *env) reenroll(t testing.TB, regID string, edit func(*dps.IndividualEnrollment)) {
	t.Helper()
	r := e.service(t, http.MethodPost, "/enrollments/"+url.PathEscape(regID)+"/attestationmechanism", nil)
	var am dps.AttestationMechanism
	r.decode(t, &am)
	r = e.service(t, http.MethodGet, "/enrollments/"+url.PathEscape(regID), nil)
	var en dps.IndividualEnrollment
	r.decode(t, &en)
	en.Attestation, en.ETag, en.RegistrationState = am, "", nil
	edit(&en)
	if r := e.service(t, http.MethodPut, "/enrollments/"+url.PathEscape(regID), en); r.status != http.StatusOK {
		t.Fatalf("re-enroll %s: %d %s", regID, r.status, r.body)
	}
}

func TestReprovisioning(t *testing.T) {
	policy := func(update, migrate bool) *dps.ReprovisionPolicy {
		return &dps.ReprovisionPolicy{UpdateHubAssignment: update, MigrateDeviceData: migrate}
	}
	type step struct {
		hub           string // the enrollment's static hub for this registration
		twin          string // the enrollment's desired properties for it
		wantHub       string
		wantSubstatus string
		wantTwin      string // desired properties the hub then has
		wantPrevious  string // HubDevice.PreviousHub
		wantNewData   bool   // DataETag changed from the previous step
	}
	tests := []struct {
		name   string
		policy *dps.ReprovisionPolicy
		steps  []step
	}{
		{"default: update and migrate", nil, []step{
			{hubA, `{"v":1}`, hubA, dps.SubstatusInitialAssignment, `{"v":1}`, "", true},
			{hubA, `{"v":2}`, hubA, dps.SubstatusReprovisionedToInitialAssignment, `{"v":1}`, "", false},
			{hubB, `{"v":3}`, hubB, dps.SubstatusDeviceDataMigrated, `{"v":1}`, hubA, false},
			{hubA, `{"v":4}`, hubA, dps.SubstatusDeviceDataMigrated, `{"v":1}`, hubB, false},
		}},
		{"update, reset the data", policy(true, false), []step{
			{hubA, `{"v":1}`, hubA, dps.SubstatusInitialAssignment, `{"v":1}`, "", true},
			{hubA, `{"v":2}`, hubA, dps.SubstatusDeviceDataReset, `{"v":2}`, "", true},
			{hubB, `{"v":3}`, hubB, dps.SubstatusDeviceDataReset, `{"v":3}`, "", true},
		}},
		{"never re-provision", policy(false, true), []step{
			{hubA, `{"v":1}`, hubA, dps.SubstatusInitialAssignment, `{"v":1}`, "", true},
			{hubB, `{"v":2}`, hubA, dps.SubstatusReprovisionedToInitialAssignment, `{"v":1}`, "", false},
		}},
		{"never re-provision, no migration either", policy(false, false), []step{
			{hubA, `{"v":1}`, hubA, dps.SubstatusInitialAssignment, `{"v":1}`, "", true},
			{hubB, `{"v":2}`, hubA, dps.SubstatusReprovisionedToInitialAssignment, `{"v":1}`, "", false},
		}},
	}
	e := start(t, devserver.Config{Hubs: []devserver.LinkedHub{{Name: hubA}, {Name: hubB}}})
	ctx := t.Context()
	scope := e.srv.IDScope()
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			regID := "reprov-" + string(rune('a'+i))
			_, key, _ := e.enrollSymmetricKey(t, regID, func(en *dps.IndividualEnrollment) {
				en.AllocationPolicy, en.IoTHubs, en.ReprovisionPolicy = dps.AllocationStatic, []string{tt.steps[0].hub}, tt.policy
				en.InitialTwin = twinOf(tt.steps[0].twin, `{"line":"1"}`)
			})
			tok := dps.NewDeviceSAS(scope, regID, key, time.Now().Add(time.Hour))
			var lastData string
			for n, s := range tt.steps {
				if n > 0 {
					e.reenroll(t, regID, func(en *dps.IndividualEnrollment) {
						en.IoTHubs, en.InitialTwin = []string{s.hub}, twinOf(s.twin, `{"line":"2"}`)
					})
				}
				reg := e.registerSAS(t, regID, tok)
				st := reg.final.RegistrationState
				if reg.final.Status != dps.StatusAssigned || st.AssignedHub != s.wantHub || st.Substatus != s.wantSubstatus {
					t.Fatalf("step %d: final %s, want hub %s, substatus %s", n, reg.finalRaw, s.wantHub, s.wantSubstatus)
				}
				hd, err := e.srv.HubDevice(ctx, s.wantHub, regID)
				if err != nil {
					t.Fatalf("step %d: %v", n, err)
				}
				if string(hd.Twin) != s.wantTwin || hd.PreviousHub != s.wantPrevious || (hd.DataETag != lastData) != s.wantNewData || hd.DataETag == "" {
					t.Errorf("step %d: hub device twin %s, previous hub %q, data %q (was %q); want twin %s, previous %q, new data %v",
						n, hd.Twin, hd.PreviousHub, hd.DataETag, lastData, s.wantTwin, s.wantPrevious, s.wantNewData)
				}
				lastData = hd.DataETag
				// The device is on one hub only.
				for _, h := range []string{hubA, hubB} {
					if _, err := e.srv.HubDevice(ctx, h, regID); h != s.wantHub && station.KindOf(err) != station.KindNotFound {
						t.Errorf("step %d: hub %s still knows the device (%v)", n, h, err)
					}
				}
				// The service shows the same substatus.
				var svc dps.DeviceRegistrationState
				e.service(t, http.MethodGet, "/registrations/"+regID, nil).decode(t, &svc)
				if svc.Substatus != s.wantSubstatus || svc.AssignedHub != s.wantHub {
					t.Errorf("step %d: service registration state %+v", n, svc)
				}
			}
		})
	}
}

func TestInitialTwinAndCapabilities(t *testing.T) {
	e := start(t, devserver.Config{})
	ctx := t.Context()
	scope := e.srv.IDScope()
	_, key, _ := e.enrollSymmetricKey(t, "edge-1", func(en *dps.IndividualEnrollment) {
		en.Capabilities = &dps.DeviceCapabilities{IoTEdge: true}
		en.InitialTwin = twinOf(`{"telemetryInterval":30,"mode":{"eco":true}}`, `{"site":"plant-7","line":{"id":3}}`)
	})
	_, key2, _ := e.enrollSymmetricKey(t, "plain-1")
	hour := time.Now().Add(time.Hour)

	reg := e.registerSAS(t, "edge-1", dps.NewDeviceSAS(scope, "edge-1", key, hour))
	st := reg.final.RegistrationState
	hd, err := e.srv.HubDevice(ctx, st.AssignedHub, st.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	var desired, tags any
	if err := json.Unmarshal(hd.Twin, &desired); err != nil {
		t.Fatalf("twin %s: %v", hd.Twin, err)
	}
	if err := json.Unmarshal(hd.Tags, &tags); err != nil {
		t.Fatalf("tags %s: %v", hd.Tags, err)
	}
	wantDesired := map[string]any{"telemetryInterval": 30.0, "mode": map[string]any{"eco": true}}
	wantTags := map[string]any{"site": "plant-7", "line": map[string]any{"id": 3.0}}
	if diff := cmp.Diff(wantDesired, desired); diff != "" {
		t.Errorf("desired (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(wantTags, tags); diff != "" {
		t.Errorf("tags (-want +got):\n%s", diff)
	}
	if !hd.IoTEdge {
		t.Error("capabilities.iotEdge was not passed to the hub")
	}

	// A group passes its twin and capabilities to its devices too.
	gp := randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "edge-line", gp, randomGroupKey(t), func(g *dps.EnrollmentGroup) {
		g.Capabilities = &dps.DeviceCapabilities{IoTEdge: true}
		g.InitialTwin = twinOf(`{"fw":"2.0"}`, `{"group":"edge-line"}`)
	})
	greg := e.registerSAS(t, "edge-grp-1", dps.NewDeviceSAS(scope, "edge-grp-1", dps.DeriveDeviceKey(gp, "edge-grp-1"), hour))
	gd, err := e.srv.HubDevice(ctx, greg.final.RegistrationState.AssignedHub, "edge-grp-1")
	if err != nil {
		t.Fatal(err)
	}
	if string(gd.Twin) != `{"fw":"2.0"}` || string(gd.Tags) != `{"group":"edge-line"}` || !gd.IoTEdge {
		t.Errorf("group device: twin %s, tags %s, iotEdge %v", gd.Twin, gd.Tags, gd.IoTEdge)
	}

	// Without an initial twin or capabilities: nothing.
	preg := e.registerSAS(t, "plain-1", dps.NewDeviceSAS(scope, "plain-1", key2, hour))
	pd, err := e.srv.HubDevice(ctx, preg.final.RegistrationState.AssignedHub, "plain-1")
	if err != nil {
		t.Fatal(err)
	}
	if pd.Twin != nil || pd.Tags != nil || pd.IoTEdge {
		t.Errorf("plain device: twin %s, tags %s, iotEdge %v; want none", pd.Twin, pd.Tags, pd.IoTEdge)
	}
}

func TestRegisterPayload(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	_, key, _ := e.enrollSymmetricKey(t, "payload-1")
	tok := dps.NewDeviceSAS(scope, "payload-1", key, time.Now().Add(time.Hour))

	// Over HTTPS and MQTT, a register body with a custom payload is
	// accepted; without a custom allocation webhook DPS returns no
	// payload, and neither does Kiln.
	body := dps.DeviceRegistration{RegistrationID: "payload-1", Payload: json.RawMessage(`{"modelId":"dtmi:kiln:unit;1","slot":4}`)}
	r := e.do(t, http.MethodPut, registerPath(scope, "payload-1"), tok, body)
	if r.status != http.StatusAccepted {
		t.Fatalf("register with payload: %d %s", r.status, r.body)
	}
	c, ch := e.mustDialDPS(t, "payload-1", tok)
	raw, _ := json.Marshal(body)
	final := registerMQTT(t, c, ch, "payload-1", raw)
	if final.op.Status != dps.StatusAssigned || final.op.RegistrationState.Payload != nil {
		t.Errorf("MQTT with payload: %s, want assigned without a payload", final.raw)
	}
	// A payload that is not JSON is refused.
	e.do(t, http.MethodPut, registerPath(scope, "payload-1"), tok, `{"registrationId":"payload-1","payload":{`).errorBody(t, http.StatusBadRequest)
}
