package station

import (
	"context"
	"regexp"
	"time"
)

// DefaultOpsPerMinute is the DPS operations quota a target gets when none is
// configured: Azure DPS's 1,000 service operations per minute per unit.
const DefaultOpsPerMinute = 1000

// Target is a DPS service API that batches are pushed to: Azure's or Kiln's
// own devserver. Its connection string holds a key, so the station keeps it
// sealed (encrypted and authenticated under a key that is not in the
// database); the store only ever sees the sealed bytes.
type Target struct {
	Name     string `json:"name"`      // how batches name it; letters, digits, '.', '_' and '-'
	HostName string `json:"host_name"` // the connection string's HostName, for people
	// SealedConnectionString is the service connection string
	// (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…), sealed.
	SealedConnectionString []byte `json:"-"`
	// TrustPEM holds extra TLS roots (PEM) the target's certificate chains
	// to, for a devserver with its own CA; nil: the system roots.
	TrustPEM []byte `json:"trust_pem,omitempty"`
	// BaseURL replaces https://{HostName}, for a service listening on
	// another port; "" for Azure.
	BaseURL string `json:"base_url,omitempty"`
	// OpsPerMinute is the service's operations quota; 0 means
	// DefaultOpsPerMinute.
	OpsPerMinute int       `json:"ops_per_minute,omitempty"`
	Created      time.Time `json:"created"`
}

var targetName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Validate checks t's fields, not its secret. Kinds: Invalid.
func (t *Target) Validate() error {
	const op = "check target"
	if !targetName.MatchString(t.Name) {
		return Errorf(op, KindInvalid, "target name %q: use 1 to 64 letters, digits, '.', '_' or '-'", t.Name)
	}
	if len(t.SealedConnectionString) == 0 {
		return Errorf(op, KindInvalid, "target %s has no connection string: give the DPS's service connection string", t.Name)
	}
	if t.OpsPerMinute < 0 {
		return Errorf(op, KindInvalid, "target %s: an operations quota of %d per minute: give a positive number, or 0 for %d", t.Name, t.OpsPerMinute, DefaultOpsPerMinute)
	}
	return nil
}

// TargetStore keeps the DPS targets and which target a batch goes to.
// Implementations are safe for concurrent use.
type TargetStore interface {
	// PutTarget inserts t, or replaces the target of the same name. A zero
	// Created becomes the current time. Kinds: Invalid.
	PutTarget(ctx context.Context, t *Target) error
	// Target returns the target named name. Kinds: NotFound.
	Target(ctx context.Context, name string) (*Target, error)
	// Targets returns every target, by name.
	Targets(ctx context.Context) ([]*Target, error)
	// SetBatchTarget binds batch id to target and sets its enrollment
	// template. Kinds: NotFound (no such batch or target); Conflict when
	// the batch is neither open nor sealed; Invalid (the template).
	SetBatchTarget(ctx context.Context, id int64, target string, tmpl EnrollmentTemplate) error
}
