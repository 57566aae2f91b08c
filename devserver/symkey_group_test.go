package devserver_test

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
	"github.com/kilnworks/kiln/dps"
)

// randomGroupKey returns a fresh 32-byte group key.
func randomGroupKey(t testing.TB) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// putSymmetricKeyGroup creates or replaces a symmetric-key enrollment
// group with the given keys through the service API.
func (e *env) putSymmetricKeyGroup(t testing.TB, id string, primary, secondary []byte, edit ...func(*dps.EnrollmentGroup)) {
	t.Helper()
	g := dps.EnrollmentGroup{
		EnrollmentGroupID: id,
		Attestation: dps.AttestationMechanism{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{
			PrimaryKey: dps.EncodeKey(primary), SecondaryKey: dps.EncodeKey(secondary),
		}},
	}
	for _, f := range edit {
		f(&g)
	}
	e.putGroup(t, g)
}

func TestSymmetricKeyGroupRegistration(t *testing.T) {
	e := start(t, devserver.Config{})
	ctx := t.Context()
	scope := e.srv.IDScope()
	hour := time.Now().Add(time.Hour)
	gp, gs := randomGroupKey(t), randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "line-a", gp, gs)
	other := randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "line-b", other, randomGroupKey(t))

	tests := []struct {
		name, regID, group string
		key, hubPrimary    []byte
	}{
		{"derived from the primary key", "grp-dev-1", "line-a", dps.DeriveDeviceKey(gp, "grp-dev-1"), dps.DeriveDeviceKey(gp, "grp-dev-1")},
		{"derived from the secondary key", "grp-dev-2", "line-a", dps.DeriveDeviceKey(gs, "grp-dev-2"), dps.DeriveDeviceKey(gp, "grp-dev-2")},
		{"the other group", "grp-dev-3", "line-b", dps.DeriveDeviceKey(other, "grp-dev-3"), dps.DeriveDeviceKey(other, "grp-dev-3")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := e.registerSAS(t, tt.regID, dps.NewDeviceSAS(scope, tt.regID, tt.key, hour))
			st := reg.final.RegistrationState
			if reg.final.Status != dps.StatusAssigned || st == nil || st.Status != dps.StatusAssigned {
				t.Fatalf("final %s, want assigned", reg.finalRaw)
			}
			if st.DeviceID != tt.regID || st.AssignedHub == "" || st.Substatus != dps.SubstatusInitialAssignment {
				t.Errorf("final state %s: want device %s (the registration ID) on a hub, initialAssignment", reg.finalRaw, tt.regID)
			}
			want := `"registrationState":{"symmetricKey":{"enrollmentGroupId":"` + tt.group + `"},"registrationId":`
			if !bytes.Contains(reg.finalRaw, []byte(want)) {
				t.Errorf("final state %s: want it to start with %s", reg.finalRaw, want)
			}
			// The hub keys are the keys derived from the group's
			// primary and secondary keys, whichever the device used.
			hd, err := e.srv.HubDevice(ctx, st.AssignedHub, st.DeviceID)
			if err != nil {
				t.Fatal(err)
			}
			if !hd.Enabled || !bytes.Equal(hd.PrimaryKey, tt.hubPrimary) {
				t.Errorf("hub device enabled=%v, primary is the derived primary: %v", hd.Enabled, bytes.Equal(hd.PrimaryKey, tt.hubPrimary))
			}
			if tt.group == "line-a" && !bytes.Equal(hd.SecondaryKey, dps.DeriveDeviceKey(gs, tt.regID)) {
				t.Errorf("hub device secondary key is not the key derived from the group's secondary key")
			}
		})
	}

	// The registration states name the group: query by group lists its
	// devices only.
	r := e.service(t, http.MethodPost, "/registrations/line-a/query", dps.QuerySpecification{Query: "*"})
	var states []dps.DeviceRegistrationState
	r.decode(t, &states)
	var ids []string
	for _, s := range states {
		ids = append(ids, s.RegistrationID)
	}
	if r.status != http.StatusOK || len(ids) != 2 || ids[0] != "grp-dev-1" || ids[1] != "grp-dev-2" {
		t.Errorf("query line-a registrations: %d %s, want grp-dev-1 and grp-dev-2", r.status, r.body)
	}
	if r := e.service(t, http.MethodGet, "/registrations/grp-dev-3", nil); r.status != http.StatusOK {
		t.Errorf("GET registration grp-dev-3: %d %s", r.status, r.body)
	}

	// The lookup works with the derived key too.
	tok := dps.NewDeviceSAS(scope, "grp-dev-1", dps.DeriveDeviceKey(gp, "grp-dev-1"), hour)
	r = e.do(t, http.MethodPost, "/"+scope+"/registrations/grp-dev-1?api-version=2019-03-31", tok, dps.DeviceRegistration{RegistrationID: "grp-dev-1"})
	if r.status != http.StatusOK {
		t.Errorf("lookup: %d %s", r.status, r.body)
	}

	// A device seen with one key may come back with another: the key it
	// used last is only tried first.
	for _, step := range []struct {
		key   []byte
		group string
	}{
		{dps.DeriveDeviceKey(gs, "grp-dev-1"), "line-a"},
		{dps.DeriveDeviceKey(other, "grp-dev-1"), "line-b"},
		{dps.DeriveDeviceKey(gp, "grp-dev-1"), "line-a"},
	} {
		reg := e.registerSAS(t, "grp-dev-1", dps.NewDeviceSAS(scope, "grp-dev-1", step.key, hour))
		if st := reg.final.RegistrationState; reg.final.Status != dps.StatusAssigned || st.SymmetricKey == nil || st.SymmetricKey.EnrollmentGroupID != step.group {
			t.Errorf("grp-dev-1 again: %s, want assigned in %s", reg.finalRaw, step.group)
		}
	}
}

func TestSymmetricKeyGroupRefusals(t *testing.T) {
	e := start(t, devserver.Config{})
	ctx := t.Context()
	scope := e.srv.IDScope()
	hour := time.Now().Add(time.Hour)
	gp, gs := randomGroupKey(t), randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "grp", gp, gs)
	const regID = "grp-neg-1"
	derived := dps.DeriveDeviceKey(gp, regID)

	refused := func(t *testing.T, regID, token string) {
		t.Helper()
		r := e.do(t, http.MethodPut, registerPath(scope, regID), token, dps.DeviceRegistration{RegistrationID: regID})
		if b := r.errorBody(t, http.StatusUnauthorized); b.ErrorCode != dps.CodeUnauthorized || b.Message != "Unauthorized" {
			t.Errorf("error %d %q, want 401002 Unauthorized", b.ErrorCode, b.Message)
		}
	}
	tests := []struct {
		name, regID, token string
	}{
		{"no Authorization", regID, ""},
		{"the group key itself", regID, dps.NewDeviceSAS(scope, regID, gp, hour)},
		{"another device's derived key", regID, dps.NewDeviceSAS(scope, regID, dps.DeriveDeviceKey(gp, "grp-neg-2"), hour)},
		{"derived over another spelling", regID, dps.NewDeviceSAS(scope, regID, dps.DeriveDeviceKey(gp, "GRP-NEG-1"), hour)},
		{"expired", regID, dps.NewDeviceSAS(scope, regID, derived, time.Now().Add(-time.Minute))},
		{"wrong scope", regID, dps.NewDeviceSAS("0ne00FFFFFF", regID, derived, hour)},
		{"a token for another registration", "grp-neg-2", dps.NewDeviceSAS(scope, regID, derived, hour)},
		{"another key name", regID, dps.NewSAS(dps.DeviceResource(scope, regID), derived, hour, "iothubowner")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { refused(t, tt.regID, tt.token) })
	}

	// An individual enrollment wins over any group (§5.2): a device with
	// one cannot use a group-derived key.
	_, indiv, _ := e.enrollSymmetricKey(t, "grp-indiv")
	refused(t, "grp-indiv", dps.NewDeviceSAS(scope, "grp-indiv", dps.DeriveDeviceKey(gp, "grp-indiv"), hour))
	if reg := e.registerSAS(t, "grp-indiv", dps.NewDeviceSAS(scope, "grp-indiv", indiv, hour)); reg.final.Status != dps.StatusAssigned {
		t.Errorf("individual enrollment: final %s, want assigned", reg.finalRaw)
	}

	// The cache of group keys follows writes: new keys refuse the old
	// derived key at once and accept the new one; a deleted group refuses.
	reg := e.registerSAS(t, regID, dps.NewDeviceSAS(scope, regID, derived, hour))
	if reg.final.Status != dps.StatusAssigned {
		t.Fatalf("before the key change: final %s, want assigned", reg.finalRaw)
	}
	np := randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "grp", np, gs)
	refused(t, regID, dps.NewDeviceSAS(scope, regID, derived, hour))
	if reg := e.registerSAS(t, regID, dps.NewDeviceSAS(scope, regID, dps.DeriveDeviceKey(np, regID), hour)); reg.final.Status != dps.StatusAssigned {
		t.Errorf("after the key change: final %s, want assigned with the new key", reg.finalRaw)
	}
	if r := e.service(t, http.MethodDelete, "/enrollmentGroups/grp", nil); r.status != http.StatusNoContent {
		t.Fatalf("delete group: %d %s", r.status, r.body)
	}
	refused(t, regID, dps.NewDeviceSAS(scope, regID, dps.DeriveDeviceKey(np, regID), hour))

	// A disabled group: the device authenticates, then its registration
	// ends "disabled" with 401002, and the hub does not know it. It does
	// not fall through to another group with the same keys.
	dp := randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "a-disabled", dp, randomGroupKey(t), func(g *dps.EnrollmentGroup) { g.ProvisioningStatus = dps.ProvisioningDisabled })
	e.putSymmetricKeyGroup(t, "b-enabled", dp, randomGroupKey(t))
	const off = "grp-off-1"
	reg = e.registerSAS(t, off, dps.NewDeviceSAS(scope, off, dps.DeriveDeviceKey(dp, off), hour))
	st := reg.final.RegistrationState
	if reg.final.Status != dps.StatusDisabled || st == nil || st.Status != dps.StatusDisabled || st.ErrorCode != dps.CodeUnauthorized || st.AssignedHub != "" {
		t.Errorf("disabled group: final %s, want status disabled, errorCode 401002, no hub", reg.finalRaw)
	}
	for _, h := range []string{hub1, hub2} {
		if _, err := e.srv.HubDevice(ctx, h, off); err == nil {
			t.Errorf("the hub %s knows the device of the disabled group", h)
		}
	}
	// Enabling the group lets the device in.
	e.putSymmetricKeyGroup(t, "a-disabled", dp, randomGroupKey(t))
	if reg := e.registerSAS(t, off, dps.NewDeviceSAS(scope, off, dps.DeriveDeviceKey(dp, off), hour)); reg.final.Status != dps.StatusAssigned {
		t.Errorf("enabled again: final %s, want assigned", reg.finalRaw)
	}
}

func TestMQTTSymmetricKeyGroup(t *testing.T) {
	e := startMQTT(t)
	scope := e.srv.IDScope()
	gp := randomGroupKey(t)
	e.putSymmetricKeyGroup(t, "mqtt-line", gp, randomGroupKey(t))
	const regID = "mqtt-grp-1"
	key := dps.DeriveDeviceKey(gp, regID)
	c, ch := e.mustDialDPS(t, regID, dps.NewDeviceSAS(scope, regID, key, time.Now().Add(time.Hour)))
	body, _ := json.Marshal(dps.DeviceRegistration{RegistrationID: regID})
	final := registerMQTT(t, c, ch, regID, body)
	st := final.op.RegistrationState
	if final.op.Status != dps.StatusAssigned || st == nil || st.DeviceID != regID || st.AssignedHub == "" {
		t.Fatalf("final %s: want assigned", final.raw)
	}
	if !bytes.Contains(final.raw, []byte(`"registrationState":{"symmetricKey":{"enrollmentGroupId":"mqtt-line"},`)) {
		t.Errorf("final %s: want the group in registrationState.symmetricKey", final.raw)
	}
	hd, err := e.srv.HubDevice(t.Context(), st.AssignedHub, regID)
	if err != nil || !bytes.Equal(hd.PrimaryKey, key) {
		t.Errorf("hub device %v, %v: want the derived key", hd, err)
	}

	// A key derived for another registration ID: CONNACK refused.
	bad := dps.NewDeviceSAS(scope, "mqtt-grp-2", dps.DeriveDeviceKey(gp, regID), time.Now().Add(time.Hour))
	if cl, code, err := e.dialDPS(t, "tls://"+e.srv.MQTTAddr(), "mqtt-grp-2", dpsUsername(scope, "mqtt-grp-2"), bad); err == nil {
		cl.Disconnect(0)
		t.Errorf("a foreign derived key connected (CONNACK %d)", code)
	}
}

// BenchmarkSymmetricKeyGroupLookup measures the device lookup (POST
// /{idScope}/registrations/{regId}, on a kept-alive HTTPS connection) of
// devices of a symmetric-key enrollment group, found among the 100 groups
// DPS allows with their group last, against the same lookup by a device
// of an individual enrollment in the same run:
//
//   - group-us/op and x-individual: a device that authenticated before
//     (polls, lookups, registering again), whose key is remembered;
//   - first-us/op and x-individual-first: a device never seen, so every
//     group's keys are tried (the lookup answers 404: no registration yet);
//     its baseline is an enrolled device that never registered.
func BenchmarkSymmetricKeyGroupLookup(b *testing.B) {
	e := start(b, devserver.Config{})
	scope := e.srv.IDScope()
	var last []byte
	for i := range devserver.MaxSymmetricKeyGroups {
		last = randomGroupKey(b)
		e.putSymmetricKeyGroup(b, fmt.Sprintf("bench-%03d", i), last, randomGroupKey(b))
	}
	hour := time.Now().Add(time.Hour)
	const grpID, indID, freshInd = "bench-grp-dev", "bench-ind-dev", "bench-ind-new"
	grpTok := dps.NewDeviceSAS(scope, grpID, dps.DeriveDeviceKey(last, grpID), hour)
	_, key, _ := e.enrollSymmetricKey(b, indID)
	indTok := dps.NewDeviceSAS(scope, indID, key, hour)
	_, key2, _ := e.enrollSymmetricKey(b, freshInd)
	freshIndTok := dps.NewDeviceSAS(scope, freshInd, key2, hour)
	e.registerSAS(b, grpID, grpTok)
	e.registerSAS(b, indID, indTok)
	lookup := func(regID, tok string, want int) time.Duration {
		t0 := time.Now()
		if r := e.do(b, http.MethodPost, "/"+scope+"/registrations/"+regID+"?api-version=2019-03-31", tok, nil); r.status != want {
			b.Fatalf("lookup %s: %d %s, want %d", regID, r.status, r.body, want)
		}
		return time.Since(t0)
	}
	var grp, ind, first, indFirst time.Duration
	n := 0
	b.ResetTimer()
	for b.Loop() {
		grp += lookup(grpID, grpTok, http.StatusOK)
		ind += lookup(indID, indTok, http.StatusOK)
		id := fmt.Sprintf("bench-new-%06d", n)
		n++
		first += lookup(id, dps.NewDeviceSAS(scope, id, dps.DeriveDeviceKey(last, id), hour), http.StatusNotFound)
		indFirst += lookup(freshInd, freshIndTok, http.StatusNotFound)
	}
	b.ReportMetric(float64(grp.Microseconds())/float64(n), "group-us/op")
	b.ReportMetric(float64(grp)/float64(ind), "x-individual")
	b.ReportMetric(float64(first.Microseconds())/float64(n), "first-us/op")
	b.ReportMetric(float64(first)/float64(indFirst), "x-individual-first")
}
