// Package link is the DUT link: the framed, versioned request/response
// protocol between a Kiln station and the agent on a device under test,
// carried over a serial line (115200 8N1 by default).
//
// Frames are COBS-encoded with 0x00 delimiters and protected by CRC-32C; they
// carry a frame type, a sequence number and a command code. The station side
// is Client (a station.Link); the device side is Serve with a Handler. The
// protocol is specified in docs/dut-link.md.
package link

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
)

// FrameVersion is the frame-format version written in byte 0 of every frame.
// Frames of any other version are dropped as bad frames.
const FrameVersion = 1

// The protocol versions this package speaks. The protocol version (the
// meaning of commands and payloads) is negotiated in HELLO; it is distinct
// from FrameVersion.
const (
	MinProtocol = 1
	MaxProtocol = 1
)

// Frame size limits, in decoded bytes (header, payload and CRC).
const (
	// DefaultMaxFrame is the largest frame a side accepts unless configured.
	DefaultMaxFrame = 16 << 10
	// MinMaxFrame is the smallest frame limit a side may configure; every
	// implementation accepts frames of this size, HELLO included.
	MinMaxFrame = 512
	// LimitMaxFrame is the largest frame limit a side may configure.
	LimitMaxFrame = 1 << 20
)

const (
	headerLen = 5 // version, type, seq (2), command
	crcLen    = 4
	// MinFrame is the size of a frame with an empty payload: header and CRC.
	MinFrame = headerLen + crcLen
	// minEncoded is the smallest COBS encoding of a MinFrame frame. Shorter
	// runs of bytes between delimiters are line noise: counted, never NAKed.
	minEncoded = MinFrame + 1
)

// damaged reports whether an encoded run of n bytes beginning with head
// (its first bytes, at least 3 when available) looks like a damaged frame.
func damaged(head []byte, n int) bool {
	return n >= minEncoded && len(head) >= 3 && head[0] >= 3 && head[1] == FrameVersion &&
		Type(head[2]) >= TypeRequest && Type(head[2]) <= TypeEvent
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Type is the frame type (byte 1 of a frame).
type Type uint8

// The frame types.
const (
	TypeRequest  Type = 1 // station → agent: run a command
	TypeResponse Type = 2 // agent → station: the command's result
	TypeError    Type = 3 // agent → station: the command failed (kind + message)
	TypeNAK      Type = 4 // agent → station: a corrupt frame arrived; retransmit now
	TypeEvent    Type = 5 // agent → station: progress of a running command (PROVISION)
)

var typeNames = [...]string{"", "request", "response", "error", "NAK", "event"}

func (t Type) String() string {
	if t > 0 && int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Command is a command code (byte 4 of a frame).
type Command uint8

// The command codes. CmdFactoryReset is reserved with the meaning given and
// is answered with an "unknown command" error until it is implemented; the
// others are implemented (the identity commands 0x10–0x13 by agents set up
// with AddIdentity). Codes 0x80–0xFF are for vendor extensions.
const (
	CmdNone           Command = 0x00 // used by NAK frames; never a request
	CmdHello          Command = 0x01 // version negotiation and device info
	CmdTPM            Command = 0x02 // raw TPM 2.0 command in, raw response out
	CmdKeyCSR         Command = 0x10 // generate a key pair and return a CSR
	CmdWriteCertChain Command = 0x11 // store the issued certificate chain
	CmdWriteSymKey    Command = 0x12 // store a symmetric (DPS) key
	CmdReadIdentity   Command = 0x13 // read back the chain, key storage and symmetric key fingerprint
	CmdWriteConfig    Command = 0x20 // write config (ID scope, endpoint, registration ID, trust bundle)
	CmdReadConfig     Command = 0x21 // read the config back
	CmdProvision      Command = 0x30 // register with DPS and send telemetry now, progress streamed as events
	CmdFactoryReset   Command = 0x40 // reserved: erase provisioning data
)

var cmdNames = map[Command]string{
	CmdNone: "none", CmdHello: "hello", CmdTPM: "TPM command", CmdKeyCSR: "key+CSR",
	CmdWriteCertChain: "write cert chain", CmdWriteSymKey: "write symmetric key", CmdReadIdentity: "read identity",
	CmdWriteConfig: "write config", CmdReadConfig: "read config", CmdProvision: "provision",
	CmdFactoryReset: "factory reset",
}

func (c Command) String() string {
	if s, ok := cmdNames[c]; ok {
		return s
	}
	return fmt.Sprintf("command 0x%02x", uint8(c))
}

// Frame is one decoded frame.
type Frame struct {
	Type    Type
	Seq     uint16
	Cmd     Command
	Payload []byte
}

// FrameError reports a frame that was dropped: bad COBS encoding, bad CRC,
// too short, oversize or of an unknown version or type. Decoding continues
// after it.
type FrameError struct {
	Reason string // what was wrong, e.g. "CRC mismatch"
	Len    int    // encoded bytes dropped (between two delimiters)
	// Damaged reports that the dropped bytes began like a frame (at least
	// 10 bytes whose first COBS block starts with the frame version and a
	// valid type): a frame hurt on the way rather than line noise. Only
	// damaged frames are answered with a NAK or a retransmission.
	Damaged bool
}

func (e *FrameError) Error() string {
	return fmt.Sprintf("bad frame (%d bytes dropped): %s", e.Len, e.Reason)
}

// MaxEncodedLen returns the largest COBS encoding of n decoded bytes,
// delimiters excluded: n + ⌊n/254⌋ + 1.
func MaxEncodedLen(n int) int { return n + n/254 + 1 }

// AppendFrame appends f to dst as it goes on the line: a 0x00 delimiter, the
// COBS encoding of header, payload and CRC-32C, and a closing 0x00.
func AppendFrame(dst []byte, f Frame) []byte {
	hdr := [headerLen]byte{FrameVersion, byte(f.Type), byte(f.Seq >> 8), byte(f.Seq), byte(f.Cmd)}
	crc := crc32.Update(0, castagnoli, hdr[:])
	crc = crc32.Update(crc, castagnoli, f.Payload)
	var tail [crcLen]byte
	binary.BigEndian.PutUint32(tail[:], crc)

	dst = slices.Grow(dst, MaxEncodedLen(headerLen+len(f.Payload)+crcLen)+2)
	dst = append(dst, 0)
	e := cobsEncoder{dst: dst}
	e.start()
	e.write(hdr[:])
	e.write(f.Payload)
	e.write(tail[:])
	return append(e.finish(), 0)
}

// cobsEncoder appends the COBS encoding of the bytes written to it to dst.
type cobsEncoder struct {
	dst    []byte
	codeAt int
	code   byte
}

func (e *cobsEncoder) start() {
	e.codeAt = len(e.dst)
	e.dst = append(e.dst, 0)
	e.code = 1
}

func (e *cobsEncoder) write(p []byte) {
	for _, b := range p {
		if b == 0 {
			e.dst[e.codeAt] = e.code
			e.start()
			continue
		}
		e.dst = append(e.dst, b)
		e.code++
		if e.code == 0xFF {
			e.dst[e.codeAt] = e.code
			e.start()
		}
	}
}

func (e *cobsEncoder) finish() []byte {
	e.dst[e.codeAt] = e.code
	return e.dst
}

// cobsDecode appends the decoding of src to dst. dst may be src[:0]: the
// decoding never overtakes the encoding.
func cobsDecode(dst, src []byte) ([]byte, error) {
	for i := 0; i < len(src); {
		c := int(src[i])
		if c == 0 {
			return dst, fmt.Errorf("0x00 inside a frame at offset %d", i)
		}
		i++
		end := i + c - 1
		if end > len(src) {
			return dst, fmt.Errorf("COBS block at offset %d runs %d bytes past the end", i-1, end-len(src))
		}
		dst = append(dst, src[i:end]...)
		i = end
		if c != 0xFF && i < len(src) {
			dst = append(dst, 0)
		}
	}
	return dst, nil
}

// DecodeFrame decodes one encoded frame without its delimiters (b contains
// no 0x00). Errors are *FrameError.
func DecodeFrame(b []byte) (Frame, error) {
	raw, err := cobsDecode(make([]byte, 0, len(b)), b)
	if err != nil {
		return Frame{}, &FrameError{Reason: err.Error(), Len: len(b), Damaged: damaged(b, len(b))}
	}
	return parseFrame(raw, len(b), damaged(b, len(b)))
}

// parseFrame checks and splits a decoded frame that was encLen bytes on the
// line; dmg is whether those began like a frame. The payload is copied, so
// raw may be reused.
func parseFrame(raw []byte, encLen int, dmg bool) (Frame, error) {
	bad := func(reason string) error { return &FrameError{Reason: reason, Len: encLen, Damaged: dmg} }
	if len(raw) < MinFrame {
		return Frame{}, bad(fmt.Sprintf("%d bytes is shorter than the %d-byte minimum", len(raw), MinFrame))
	}
	body, tail := raw[:len(raw)-crcLen], raw[len(raw)-crcLen:]
	if got, want := binary.BigEndian.Uint32(tail), crc32.Checksum(body, castagnoli); got != want {
		return Frame{}, bad(fmt.Sprintf("CRC mismatch (frame says %08x, content gives %08x)", got, want))
	}
	if body[0] != FrameVersion {
		return Frame{}, bad(fmt.Sprintf("unsupported frame format version %d (this side speaks %d)", body[0], FrameVersion))
	}
	t := Type(body[1])
	if t < TypeRequest || t > TypeEvent {
		return Frame{}, bad(fmt.Sprintf("unknown frame type %d", body[1]))
	}
	f := Frame{Type: t, Seq: binary.BigEndian.Uint16(body[2:4]), Cmd: Command(body[4])}
	if p := body[headerLen:]; len(p) > 0 {
		f.Payload = append([]byte(nil), p...)
	}
	return f, nil
}
