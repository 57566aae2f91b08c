package station

import (
	"context"
	"encoding/json"
	"strings"
	"time"
)

// BatchState is where a batch is in its lifecycle. See CheckTransition for
// the moves between states.
type BatchState string

// The batch states.
const (
	BatchOpen     BatchState = "open"     // passing units join it
	BatchSealed   BatchState = "sealed"   // closed to new units; ready to push or export
	BatchPushing  BatchState = "pushing"  // being pushed to its DPS target
	BatchPushed   BatchState = "pushed"   // every unit is enrolled in the target
	BatchExported BatchState = "exported" // handed over as files instead of pushed
)

// BatchStates lists the batch states in lifecycle order.
var BatchStates = []BatchState{BatchOpen, BatchSealed, BatchPushing, BatchPushed, BatchExported}

// Valid reports whether s is one of the batch states.
func (s BatchState) Valid() bool {
	for _, x := range BatchStates {
		if s == x {
			return true
		}
	}
	return false
}

// transitions are the legal moves of a batch: the one table CheckTransition
// reads.
var transitions = map[BatchState][]BatchState{
	BatchOpen:    {BatchSealed},
	BatchSealed:  {BatchPushing, BatchExported},
	BatchPushing: {BatchPushed, BatchSealed}, // back to sealed when a push is aborted
}

// CheckTransition reports whether a batch may go from state from to state to:
// open → sealed → pushing → pushed, sealed → exported, and pushing → sealed
// when a push is aborted. Kinds: Conflict, naming both states, when the move
// is not legal; Invalid when either is not a batch state.
func CheckTransition(from, to BatchState) error {
	const op = "change batch state"
	for _, s := range []BatchState{from, to} {
		if !s.Valid() {
			return Errorf(op, KindInvalid, "%q is not a batch state: use one of %s", s, joinStates(BatchStates))
		}
	}
	next := transitions[from]
	for _, s := range next {
		if s == to {
			return nil
		}
	}
	if len(next) == 0 {
		return Errorf(op, KindConflict, "a batch cannot go from %s to %s: a %s batch is final", from, to, from)
	}
	return Errorf(op, KindConflict, "a batch cannot go from %s to %s: from %s it can only go to %s", from, to, from, joinStates(next))
}

func joinStates(ss []BatchState) string {
	parts := make([]string, len(ss))
	for i, s := range ss {
		parts[i] = string(s)
	}
	return strings.Join(parts, ", ")
}

// ProvisioningStatus is whether a DPS enrollment lets its device register.
type ProvisioningStatus string

// The provisioning statuses, as DPS spells them.
const (
	ProvisioningEnabled  ProvisioningStatus = "enabled"
	ProvisioningDisabled ProvisioningStatus = "disabled"
)

// The DPS allocation policies.
const (
	AllocationHashed     = "hashed"
	AllocationGeoLatency = "geoLatency"
	AllocationStatic     = "static"
	AllocationCustom     = "custom"
)

// Capabilities are the device capabilities of a DPS enrollment.
type Capabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// ReprovisionPolicy says what DPS does when a registered device registers
// again.
type ReprovisionPolicy struct {
	UpdateHubAssignment bool `json:"updateHubAssignment"`
	MigrateDeviceData   bool `json:"migrateDeviceData"`
}

// EnrollmentTemplate is what every enrollment of a batch gets besides the
// unit's own identity. Zero fields leave the DPS defaults.
type EnrollmentTemplate struct {
	AllocationPolicy   string             `json:"allocationPolicy,omitempty"` // hashed, geoLatency, static or custom
	IoTHubs            []string           `json:"iotHubs,omitempty"`          // host names of the hubs to allocate among
	InitialTwin        json.RawMessage    `json:"initialTwin,omitempty"`      // a JSON object, as DPS takes it
	Capabilities       Capabilities       `json:"capabilities,omitzero"`
	ReprovisionPolicy  *ReprovisionPolicy `json:"reprovisionPolicy,omitempty"` // nil: the DPS default
	ProvisioningStatus ProvisioningStatus `json:"provisioningStatus,omitempty"`
}

// Validate checks t's fields. Kinds: Invalid, saying which field and why.
func (t EnrollmentTemplate) Validate() error {
	const op = "check enrollment template"
	switch t.AllocationPolicy {
	case "", AllocationHashed, AllocationGeoLatency, AllocationStatic, AllocationCustom:
	default:
		return Errorf(op, KindInvalid, "allocation policy %q is unknown: use hashed, geoLatency, static or custom", t.AllocationPolicy)
	}
	if t.AllocationPolicy == AllocationStatic && len(t.IoTHubs) != 1 {
		return Errorf(op, KindInvalid, "the static allocation policy needs exactly one IoT hub, not %d", len(t.IoTHubs))
	}
	for _, h := range t.IoTHubs {
		if strings.TrimSpace(h) == "" {
			return Errorf(op, KindInvalid, "an IoT hub name is empty: give each hub's host name")
		}
	}
	if len(t.InitialTwin) > 0 {
		var twin map[string]json.RawMessage
		if err := json.Unmarshal(t.InitialTwin, &twin); err != nil || twin == nil {
			return Errorf(op, KindInvalid, "the initial twin is not a JSON object: give one like {\"tags\":{},\"properties\":{\"desired\":{}}}")
		}
	}
	switch t.ProvisioningStatus {
	case "", ProvisioningEnabled, ProvisioningDisabled:
	default:
		return Errorf(op, KindInvalid, "provisioning status %q is unknown: use enabled or disabled", t.ProvisioningStatus)
	}
	return nil
}

// Batch is a set of recorded units that leave the station together: pushed to
// a DPS enrollment list or exported as files. At most one batch is open at a
// time; passing units join it.
type Batch struct {
	ID    int64      `json:"id"`
	Name  string     `json:"name"`
	State BatchState `json:"state"`
	// TargetID names the DPS target the batch is pushed to. The target's
	// connection string is a secret and is kept elsewhere, never here.
	TargetID string             `json:"target_id,omitempty"`
	Template EnrollmentTemplate `json:"template"`
	Created  time.Time          `json:"created"`
	Sealed   time.Time          `json:"sealed,omitzero"` // when it was first sealed
	Pushed   time.Time          `json:"pushed,omitzero"` // when it became pushed or exported
	Units    int                `json:"units"`           // how many units are in it; read only
}

// BatchFilter selects batches. Zero fields select everything.
type BatchFilter struct {
	State BatchState // exact state
	Limit int        // at most this many, newest first (0 = 100)
}

// BatchStore keeps batches and which units are in them. Implementations are
// safe for concurrent use.
type BatchStore interface {
	// CreateBatch inserts b and sets b.ID. An empty state becomes open and a
	// zero Created the current time; both are written back to b. Kinds:
	// Conflict when b is open and another batch is open already; Invalid
	// when b has no name, an unknown state or an invalid template.
	CreateBatch(ctx context.Context, b *Batch) error
	// Batch returns batch id. Kinds: NotFound.
	Batch(ctx context.Context, id int64) (*Batch, error)
	// Batches returns the batches matching f, newest first.
	Batches(ctx context.Context, f BatchFilter) ([]*Batch, error)
	// OpenBatch returns the one open batch. Kinds: NotFound when none is open.
	OpenBatch(ctx context.Context) (*Batch, error)
	// AddUnit puts the recorded unit serial into batch batchID. Adding a unit
	// to the batch it is in already does nothing. Kinds: NotFound (no such
	// batch or unit); Conflict when the batch is not open or the unit is in
	// another batch.
	AddUnit(ctx context.Context, batchID int64, serial string) error
	// BatchUnits returns the units of batch id in the order they joined.
	// Kinds: NotFound.
	BatchUnits(ctx context.Context, id int64) ([]*Unit, error)
	// Transition moves batch id from state from to state to, if it is in
	// state from (compare and set). Kinds: NotFound; Conflict when the move
	// is not legal (see CheckTransition) or the batch is not in state from;
	// Invalid for an unknown state.
	Transition(ctx context.Context, id int64, from, to BatchState) error
}

// BatchName is the name given to a batch the station opens by itself: the
// UTC date.
func BatchName(t time.Time) string { return t.UTC().Format(time.DateOnly) }
