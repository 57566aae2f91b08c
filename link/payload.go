package link

import (
	"encoding/binary"
	"fmt"
	"unicode/utf8"

	"github.com/kilnworks/kiln/station"
)

// HELLO request payload: min version, max version, the station's max frame.
const helloRequestLen = 6

type helloRequest struct {
	MinVersion, MaxVersion uint8
	MaxFrame               uint32
}

func (h helloRequest) append(dst []byte) []byte {
	dst = append(dst, h.MinVersion, h.MaxVersion)
	return binary.BigEndian.AppendUint32(dst, h.MaxFrame)
}

func parseHelloRequest(p []byte) (helloRequest, error) {
	if len(p) < helloRequestLen {
		return helloRequest{}, fmt.Errorf("HELLO request of %d bytes is shorter than %d", len(p), helloRequestLen)
	}
	h := helloRequest{MinVersion: p[0], MaxVersion: p[1], MaxFrame: binary.BigEndian.Uint32(p[2:6])}
	if h.MinVersion == 0 || h.MinVersion > h.MaxVersion {
		return h, fmt.Errorf("HELLO offers an empty version range %d–%d", h.MinVersion, h.MaxVersion)
	}
	return h, nil
}

// TLV tags of the HELLO response. Unknown tags are skipped by readers.
const (
	tagVersion    = 0x01 // u8: the chosen protocol version
	tagMaxFrame   = 0x02 // u32: the largest frame the agent accepts
	tagSerial     = 0x03 // UTF-8
	tagModel      = 0x04 // UTF-8
	tagFirmware   = 0x05 // UTF-8
	tagCapability = 0x06 // UTF-8, repeated once per capability
)

type helloResponse struct {
	Version  uint8
	MaxFrame uint32
	Info     station.DeviceInfo
}

func appendTLV(dst []byte, tag byte, v []byte) []byte {
	if len(v) > 0xFFFF {
		v = v[:0xFFFF]
	}
	dst = append(dst, tag)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(v)))
	return append(dst, v...)
}

func (h helloResponse) append(dst []byte) []byte {
	dst = appendTLV(dst, tagVersion, []byte{h.Version})
	dst = appendTLV(dst, tagMaxFrame, binary.BigEndian.AppendUint32(nil, h.MaxFrame))
	dst = appendTLV(dst, tagSerial, []byte(h.Info.Serial))
	dst = appendTLV(dst, tagModel, []byte(h.Info.Model))
	dst = appendTLV(dst, tagFirmware, []byte(h.Info.Firmware))
	for _, c := range h.Info.Capabilities {
		dst = appendTLV(dst, tagCapability, []byte(c))
	}
	return dst
}

func parseHelloResponse(p []byte) (helloResponse, error) {
	var h helloResponse
	for len(p) > 0 {
		if len(p) < 3 {
			return h, fmt.Errorf("HELLO response ends inside a TLV header")
		}
		tag, n := p[0], int(binary.BigEndian.Uint16(p[1:3]))
		if len(p) < 3+n {
			return h, fmt.Errorf("HELLO response TLV 0x%02x of %d bytes runs past the end", tag, n)
		}
		v := p[3 : 3+n]
		p = p[3+n:]
		if tag >= tagSerial && tag <= tagCapability && !utf8.Valid(v) {
			return h, fmt.Errorf("HELLO response TLV 0x%02x is not UTF-8", tag)
		}
		switch tag {
		case tagVersion:
			if n != 1 {
				return h, fmt.Errorf("HELLO response version TLV has %d bytes, want 1", n)
			}
			h.Version = v[0]
		case tagMaxFrame:
			if n != 4 {
				return h, fmt.Errorf("HELLO response max-frame TLV has %d bytes, want 4", n)
			}
			h.MaxFrame = binary.BigEndian.Uint32(v)
		case tagSerial:
			h.Info.Serial = string(v)
		case tagModel:
			h.Info.Model = string(v)
		case tagFirmware:
			h.Info.Firmware = string(v)
		case tagCapability:
			h.Info.Capabilities = append(h.Info.Capabilities, string(v))
		}
	}
	if h.Version == 0 {
		return h, fmt.Errorf("HELLO response names no protocol version")
	}
	if h.MaxFrame < MinMaxFrame {
		return h, fmt.Errorf("HELLO response announces a frame limit of %d bytes, below the %d-byte minimum", h.MaxFrame, MinMaxFrame)
	}
	h.Info.Protocol = int(h.Version)
	return h, nil
}

// Error payload: one byte of kind (the station.Kind value), then a UTF-8
// message for a person.
func appendErrorPayload(dst []byte, kind station.Kind, msg string) []byte {
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	dst = append(dst, byte(kind))
	return append(dst, msg...)
}

func parseErrorPayload(p []byte) (station.Kind, string) {
	if len(p) == 0 {
		return station.KindOther, "the agent reported an error without a message"
	}
	k := station.Kind(p[0])
	if k > station.KindInternal {
		k = station.KindOther
	}
	msg := string(p[1:])
	if !utf8.ValidString(msg) {
		msg = fmt.Sprintf("%q", msg)
	}
	return k, msg
}
