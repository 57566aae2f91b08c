package devserver

import (
	"net/http"
	"slices"
	"strings"

	"github.com/kilnworks/kiln/dps"
	"github.com/kilnworks/kiln/station"
)

// Right is a right of a service shared access policy (§7.5).
type Right string

// The rights of DPS shared access policies.
const (
	RightServiceConfig           Right = "ServiceConfig"
	RightEnrollmentRead          Right = "EnrollmentRead"
	RightEnrollmentWrite         Right = "EnrollmentWrite"
	RightRegistrationStatusRead  Right = "RegistrationStatusRead"
	RightRegistrationStatusWrite Right = "RegistrationStatusWrite"
)

var rights = []Right{RightServiceConfig, RightEnrollmentRead, RightEnrollmentWrite, RightRegistrationStatusRead, RightRegistrationStatusWrite}

// checkRights checks Config.ServiceRights: each names a policy the server
// has and only known rights. Kinds: Invalid.
func (s *Server) checkRights() error {
	const op = "start devserver"
	for name, rs := range s.cfg.ServiceRights {
		if _, ok := s.serviceKeys[strings.ToLower(name)]; !ok {
			return station.Errorf(op, station.KindInvalid, "Config.ServiceRights names policy %q, which has no key: add it to ServiceKeys", name)
		}
		for _, r := range rs {
			if !slices.ContainsFunc(rights, func(k Right) bool { return strings.EqualFold(string(k), string(r)) }) {
				return station.Errorf(op, station.KindInvalid, "policy %q: unknown right %q: use %v", name, r, rights)
			}
		}
	}
	return nil
}

// authorize checks a service API request's SAS token (authorizeService)
// and that its policy has right: a policy listed in Config.ServiceRights
// has the rights listed there, any other every right. Kinds: Unauthorized.
func (s *Server) authorize(r *http.Request, right Right) error {
	if err := s.authorizeService(r); err != nil {
		return err
	}
	tok, err := dps.ParseSAS(r.Header.Get("Authorization"))
	if err != nil { // parsed already by authorizeService
		return station.E("authorize service request", station.KindUnauthorized, err)
	}
	for name, rs := range s.cfg.ServiceRights {
		if !strings.EqualFold(name, tok.KeyName) {
			continue
		}
		if !slices.ContainsFunc(rs, func(k Right) bool { return strings.EqualFold(string(k), string(right)) }) {
			return station.Errorf("authorize service request", station.KindUnauthorized,
				"shared access policy %q lacks the %s right for %s %s: use a policy that has it", tok.KeyName, right, r.Method, r.URL.Path)
		}
	}
	return nil
}

// readOrWrite is the right a request needs: read for GET (and POST of
// queries and attestation mechanisms, which read), write for the others.
func readOrWrite(r *http.Request, read, write Right) Right {
	if r.Method == http.MethodGet {
		return read
	}
	return write
}
