package devserver

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/dps"
)

// TestRegisterPayloadReachesAssignment checks the seam custom allocation
// uses: the payload a device sends with its register is kept with the
// operation, and a registration's payload is returned in its state after
// etag (§1.4).
func TestRegisterPayloadReachesAssignment(t *testing.T) {
	s, err := New(Config{DataDir: t.TempDir(), Hubs: []LinkedHub{{Name: "hub.kiln.test", ApplyAllocationPolicy: true}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	ts := httptest.NewTLSServer(s.Handler())
	t.Cleanup(ts.Close)
	ctx := t.Context()
	key := bytes.Repeat([]byte{7}, 32)
	e := dps.IndividualEnrollment{RegistrationID: "payload-dev", Attestation: dps.AttestationMechanism{
		Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: dps.EncodeKey(key)},
	}}
	if _, err := s.db.putEnrollment(ctx, e, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	payload := `{"modelId":"dtmi:kiln:unit;1","slot":4}`
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, ts.URL+"/"+s.IDScope()+"/registrations/payload-dev/register?api-version=2019-03-31",
		strings.NewReader(`{"registrationId":"payload-dev","payload":`+payload+`}`))
	req.Header.Set("Authorization", dps.NewDeviceSAS(s.IDScope(), "payload-dev", key, time.Now().Add(time.Hour)))
	rsp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer rsp.Body.Close()
	var op dps.RegistrationOperationStatus
	if err := json.NewDecoder(rsp.Body).Decode(&op); err != nil || rsp.StatusCode != http.StatusAccepted {
		t.Fatalf("register: %d %v", rsp.StatusCode, err)
	}
	o, err := s.db.operation(ctx, op.OperationID, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if string(o.Payload) != payload {
		t.Errorf("operation payload %s, want %s", o.Payload, payload)
	}

	r := &registration{RegistrationID: "payload-dev", Status: dps.StatusAssigned, ETag: "e", Payload: json.RawMessage(`{"route":"b"}`)}
	b, _ := json.Marshal(r.state())
	if !bytes.HasSuffix(b, []byte(`"etag":"e","payload":{"route":"b"}}`)) {
		t.Errorf("state %s: want the payload last, after etag", b)
	}
}
