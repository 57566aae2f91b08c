package station

import (
	"context"
	"time"
)

// PushOp is what a push item does to its target.
type PushOp string

// The push operations.
const (
	PushEnroll PushOp = "enroll" // create (or bring up to date) the enrollment
	PushEnable PushOp = "enable" // set the enrollment's provisioningStatus to enabled
)

// PushState is where one item of a push is. An item is marked sent before
// its request leaves, so an item found sent after a crash is one whose fate
// is unknown: the pusher reads it back from the target before sending it
// again.
type PushState string

// The push item states.
const (
	PushPending PushState = "pending" // to be sent
	PushSent    PushState = "sent"    // sent; the answer was not recorded (yet)
	PushDone    PushState = "done"    // the target holds it
	PushFailed  PushState = "failed"  // the target refused it; Error says why
)

// PushStates lists the push item states.
var PushStates = []PushState{PushPending, PushSent, PushDone, PushFailed}

// The modes of a pending push item, as DPS bulk operations spell them.
const (
	PushModeCreate = "create"
	PushModeUpdate = "update"
)

// PushItem is one entry of the durable outbox of a batch push: one
// enrollment (Key is its registration ID) or the batch's enrollment group
// (Key is "group:" and the group ID).
type PushItem struct {
	BatchID   int64     `json:"batch_id"`
	Op        PushOp    `json:"op"`
	Key       string    `json:"key"`
	Serial    string    `json:"serial,omitempty"` // the unit; "" for a group
	State     PushState `json:"state"`
	Mode      string    `json:"mode,omitempty"`       // PushModeCreate or PushModeUpdate while pending
	ETag      string    `json:"etag,omitempty"`       // the target's ETag, when known
	ErrorCode int       `json:"error_code,omitempty"` // the DPS errorCode of a refusal (401002, 400000, ...)
	Error     string    `json:"error,omitempty"`      // why it failed, for a person
	Attempts  int       `json:"attempts"`             // requests that carried it
	Updated   time.Time `json:"updated"`
}

// Outbox is the durable record of pushes in progress: what is to be sent,
// what was sent and what the target answered, so that a push stopped at any
// point (kill -9 included) resumes without sending anything twice blindly.
// Implementations are safe for concurrent use.
type Outbox interface {
	// AddPushItems inserts items; an item (batch, op, key) that exists
	// already is left as it is, so calling it again on a resume is safe.
	// Kinds: NotFound (no such batch).
	AddPushItems(ctx context.Context, items []PushItem) error
	// PushItems returns the items of batch id and op in state (every state
	// when ""), in the order they were added.
	PushItems(ctx context.Context, id int64, op PushOp, state PushState) ([]PushItem, error)
	// UpdatePushItems writes the State, Mode, ETag, ErrorCode, Error,
	// Attempts and Updated of items, all in one transaction. Kinds:
	// NotFound when an item does not exist.
	UpdatePushItems(ctx context.Context, items []PushItem) error
	// PushCounts returns how many items of batch id and op are in each
	// state.
	PushCounts(ctx context.Context, id int64, op PushOp) (map[PushState]int, error)
}
