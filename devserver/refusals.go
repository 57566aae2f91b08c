package devserver

import (
	"strings"
	"sync"
	"time"
)

// Refusal is why the service last refused a device's register or poll: the
// detail a DPS never tells the device (it answers 401 and a code), kept for
// whoever runs the service — the station puts it in a unit's FAIL reason.
type Refusal struct {
	At         time.Time
	TrackingID string
	Reason     string
}

// refusalLimit bounds how many registration IDs' last refusals are kept.
const refusalLimit = 1024

// refusals keeps the last refusal of each recent registration ID.
type refusals struct {
	mu    sync.Mutex
	m     map[string]Refusal
	order []string // oldest first, for eviction
}

func (r *refusals) note(regID string, rf Refusal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = make(map[string]Refusal)
	}
	if _, ok := r.m[regID]; !ok {
		r.order = append(r.order, regID)
		if len(r.order) > refusalLimit {
			delete(r.m, r.order[0])
			r.order = r.order[1:]
		}
	}
	r.m[regID] = rf
}

// LastRefusal returns why the service last refused a request of the device
// registrationID, if it refused one recently.
func (s *Server) LastRefusal(registrationID string) (Refusal, bool) {
	s.refused.mu.Lock()
	defer s.refused.mu.Unlock()
	rf, ok := s.refused.m[strings.ToLower(registrationID)]
	return rf, ok
}

// noteRefusal keeps why d was refused.
func (s *Server) noteRefusal(d *deviceRequest, err error) {
	if d == nil || d.registrationID == "" || err == nil {
		return
	}
	s.refused.note(strings.ToLower(d.registrationID), Refusal{At: s.now(), TrackingID: d.trackingID, Reason: err.Error()})
}
