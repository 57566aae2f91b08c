package dps

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"strings"

	"github.com/kilnworks/kiln/station"
)

// NormalizeRegistrationID returns a registration ID as Kiln keeps it: lower
// case (DPS registration IDs are case-insensitive, §4.2), checked against
// DPS's rules by station.ValidRegistrationID. Kinds: Invalid.
func NormalizeRegistrationID(id string) (string, error) {
	id = strings.ToLower(id)
	if err := station.ValidRegistrationID(id); err != nil {
		return "", err
	}
	return id, nil
}

// NewOperationID returns a fresh operation ID in real DPS's form,
// "4.<16 hex digits>.<UUID v4>" (§1.4). Clients treat it as opaque; it holds
// no '$' or '&', so it is safe in MQTT topics. random is crypto/rand.Reader
// when nil. Kinds: Internal (no randomness).
func NewOperationID(random io.Reader) (string, error) {
	if random == nil {
		random = rand.Reader
	}
	var b [24]byte
	if _, err := io.ReadFull(random, b[:]); err != nil {
		return "", station.E("make operation ID", station.KindInternal, err)
	}
	u := b[8:]
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
	return fmt.Sprintf("4.%s.%x-%x-%x-%x-%x", hex.EncodeToString(b[:8]), u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}
