package devserver_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kilnworks/kiln/devserver"
)

// The service keeps why it refused a device (for the station's FAIL
// reason), under the tracking ID it gave the device, and nothing for a
// device it never refused.
func TestLastRefusal(t *testing.T) {
	e := start(t, devserver.Config{})
	_, _, _ = e.enrollSymmetricKey(t, "refused-unit")
	if _, ok := e.srv.LastRefusal("refused-unit"); ok {
		t.Fatal("a refusal before any request")
	}
	wrong := rawSAS(e.srv.IDScope()+"/registrations/refused-unit", []byte("not the device key at all!!"), time.Now().Add(time.Hour))
	r := e.do(t, http.MethodPut, registerPath(e.srv.IDScope(), "refused-unit"), wrong, map[string]string{"registrationId": "refused-unit"})
	body := r.errorBody(t, http.StatusUnauthorized)
	rf, ok := e.srv.LastRefusal("REFUSED-UNIT")
	if !ok {
		t.Fatal("no refusal kept")
	}
	if rf.TrackingID != body.TrackingID || rf.Reason == "" || strings.Contains(body.Message, rf.Reason) {
		t.Errorf("refusal %+v; the device was told %q", rf, body.Message)
	}
	if time.Since(rf.At) > time.Minute {
		t.Errorf("refusal at %v", rf.At)
	}
}
