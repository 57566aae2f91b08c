package station

import (
	"errors"
	"fmt"
)

// Kind classifies an error so that callers can branch on it without
// inspecting messages. The enum is append-only: values are stored in records.
type Kind uint8

// The kinds of error. Adapters translate their own errors into these at their
// boundary and nowhere else.
const (
	KindOther        Kind = iota // unclassified
	KindInvalid                  // bad input: the request or the data cannot be used as it is
	KindNotFound                 // the thing asked for does not exist
	KindConflict                 // it exists already, or clashes with what exists (duplicates)
	KindUnauthorized             // a signature, chain or credential did not check out
	KindUnavailable              // a device, link or service did not answer; retrying may help
	KindInternal                 // a bug or a broken invariant in Kiln itself
)

var kindNames = [...]string{"other", "invalid", "not found", "conflict", "unauthorized", "unavailable", "internal"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Error is the one domain error type: the operation that failed, its kind and
// the underlying cause. Its message is meant for a person.
type Error struct {
	Op   string // what was being done, e.g. "read EK"
	Kind Kind
	Err  error
}

// Errorf returns an *Error for op of the given kind whose cause is formatted
// like fmt.Errorf (so %w wraps).
func Errorf(op string, kind Kind, format string, args ...any) error {
	return &Error{Op: op, Kind: kind, Err: fmt.Errorf(format, args...)}
}

// E wraps err as an *Error of the given kind. It returns nil when err is nil.
func E(op string, kind Kind, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Kind: kind, Err: err}
}

func (e *Error) Error() string {
	switch {
	case e.Op != "" && e.Err != nil:
		return e.Op + ": " + e.Err.Error()
	case e.Err != nil:
		return e.Err.Error()
	default:
		return e.Op + ": " + e.Kind.String()
	}
}

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the kind of the outermost *Error in err's chain whose kind
// is not KindOther, or KindOther when there is none.
func KindOf(err error) Kind {
	for err != nil {
		var e *Error
		if !errors.As(err, &e) {
			return KindOther
		}
		if e.Kind != KindOther {
			return e.Kind
		}
		err = e.Err
	}
	return KindOther
}
