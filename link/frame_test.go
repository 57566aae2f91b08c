package link_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/kilnworks/kiln/link"
)

// helloExample is the HELLO request of docs/dut-link.md: seq 1, versions 1–1,
// station frame limit 16384.
var helloExample = link.Frame{Type: link.TypeRequest, Seq: 1, Cmd: link.CmdHello, Payload: []byte{1, 1, 0x00, 0x00, 0x40, 0x00}}

const helloExampleHex = "00 03 01 01 05 01 01 01 01 01 02 40 05 ff ff a9 c2 00"

func TestHelloExampleMatchesDoc(t *testing.T) {
	got := spacedHex(link.AppendFrame(nil, helloExample))
	if got != helloExampleHex {
		t.Errorf("encoded HELLO = %s, want %s", got, helloExampleHex)
	}
	doc, err := os.ReadFile("../docs/dut-link.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), helloExampleHex) {
		t.Errorf("docs/dut-link.md does not show the encoded HELLO frame %q", helloExampleHex)
	}
}

func spacedHex(b []byte) string {
	s := hex.EncodeToString(b)
	var sb strings.Builder
	for i := 0; i < len(s); i += 2 {
		if i > 0 {
			sb.WriteByte(' ')
		}
		sb.WriteString(s[i : i+2])
	}
	return sb.String()
}

func TestCRC32CIsCastagnoli(t *testing.T) {
	// The check value of CRC-32C (RFC 3720 B.4) for "123456789".
	if got := crc32.Checksum([]byte("123456789"), crc32.MakeTable(crc32.Castagnoli)); got != 0xe3069283 {
		t.Fatalf("CRC-32C check value = %08x", got)
	}
}

func run(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestFrameRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		payload []byte
	}{
		{"empty", nil},
		{"zeros", run(10, 0)},
		{"253 nonzero", run(253, 7)},
		{"254 nonzero", run(254, 7)},
		{"255 nonzero", run(255, 7)},
		{"508 nonzero", run(508, 0xff)},
		{"mixed", append(append(run(300, 1), 0, 0), run(600, 2)...)},
		{"max", run(link.DefaultMaxFrame-link.MinFrame, 0x5a)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := link.Frame{Type: link.TypeResponse, Seq: 0xbeef, Cmd: link.CmdTPM, Payload: tt.payload}
			enc := link.AppendFrame([]byte("prefix"), f)
			enc = enc[len("prefix"):]
			if enc[0] != 0 || enc[len(enc)-1] != 0 || bytes.IndexByte(enc[1:len(enc)-1], 0) >= 0 {
				t.Fatalf("frame not delimited by exactly two 0x00: % x", enc)
			}
			if max := link.MaxEncodedLen(link.MinFrame+len(tt.payload)) + 2; len(enc) > max {
				t.Errorf("encoded %d bytes, more than the bound %d", len(enc), max)
			}
			got, err := link.DecodeFrame(enc[1 : len(enc)-1])
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(f, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("DecodeFrame (-want +got):\n%s", diff)
			}
			dec := link.NewDecoder(bytes.NewReader(enc), 0)
			got, err = dec.Next()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(f, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Decoder (-want +got):\n%s", diff)
			}
			if _, err := dec.Next(); err != io.EOF {
				t.Errorf("after the frame: %v, want EOF", err)
			}
		})
	}
}

func TestOverheadOf1KiBResponse(t *testing.T) {
	p := make([]byte, 1024)
	for i := range p {
		p[i] = byte(i % 7) // a zero every 7 bytes, as in TPM structures
	}
	f := link.Frame{Type: link.TypeResponse, Seq: 9, Cmd: link.CmdTPM, Payload: p}
	if got, want := len(link.AppendFrame(nil, f))-len(p), 12; got != want {
		t.Errorf("overhead with zeros = %d bytes, want %d", got, want)
	}
	for i := range p {
		p[i] = 0xaa
	}
	if got, want := len(link.AppendFrame(nil, f))-len(p), 16; got != want {
		t.Errorf("worst-case overhead = %d bytes, want %d", got, want)
	}
}

func TestDecodeFrameMalformed(t *testing.T) {
	good := link.AppendFrame(nil, helloExample)
	good = good[1 : len(good)-1]
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	// reencode encodes raw decoded bytes (with a correct CRC unless told).
	reencode := func(raw []byte) []byte {
		crc := crc32.Checksum(raw, crc32.MakeTable(crc32.Castagnoli))
		raw = append(raw, byte(crc>>24), byte(crc>>16), byte(crc>>8), byte(crc))
		return cobs(raw)
	}
	tests := []struct {
		name, reason string
		in           []byte
		damaged      bool // began like a frame: NAK it
	}{
		{"empty", "shorter", nil, false},
		{"short", "shorter", reencode([]byte{1, 1, 0}), false},
		{"zero inside", "0x00 inside", mut(func(b []byte) []byte { b[3] = 0; return b }), true},
		{"block past end", "past the end", mut(func(b []byte) []byte { return b[:len(b)-2] }), true},
		{"bad crc", "CRC mismatch", mut(func(b []byte) []byte { b[len(b)-1] ^= 0x40; return b }), true},
		{"flipped payload bit", "", mut(func(b []byte) []byte { b[11] ^= 0x01; return b }), true},
		{"frame version 2", "frame format version 2", reencode([]byte{2, 1, 0, 1, 1}), false},
		{"type 0", "unknown frame type 0", reencode([]byte{1, 0, 0, 1, 1}), false},
		{"type 9", "unknown frame type 9", reencode([]byte{1, 9, 0, 1, 1}), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := link.DecodeFrame(tt.in)
			var fe *link.FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("DecodeFrame(% x) = %v, want a *FrameError", tt.in, err)
			}
			if !strings.Contains(fe.Reason, tt.reason) {
				t.Errorf("reason %q does not mention %q", fe.Reason, tt.reason)
			}
			if fe.Damaged != tt.damaged {
				t.Errorf("Damaged = %v, want %v", fe.Damaged, tt.damaged)
			}
			if fe.Len != len(tt.in) {
				t.Errorf("Len = %d, want %d", fe.Len, len(tt.in))
			}
		})
	}
}

// cobs is an independent, plain COBS encoder for the tests.
func cobs(raw []byte) []byte {
	var out []byte
	for {
		i := bytes.IndexByte(raw, 0)
		blk := raw
		if i >= 0 {
			blk = raw[:i]
		}
		for len(blk) >= 254 {
			out = append(append(out, 0xff), blk[:254]...)
			blk = blk[254:]
			raw = raw[254:]
			i -= 254
		}
		out = append(append(out, byte(len(blk)+1)), blk...)
		if i < 0 {
			return out
		}
		raw = raw[i+1:]
	}
}

func TestIndependentCOBSAgrees(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		p := make([]byte, r.IntN(2000))
		for i := range p {
			if r.IntN(50) != 0 {
				p[i] = byte(r.IntN(256))
			}
		}
		f := link.Frame{Type: link.TypeEvent, Seq: uint16(r.IntN(65536)), Cmd: link.Command(r.IntN(256)), Payload: p}
		enc := link.AppendFrame(nil, f)
		enc = enc[1 : len(enc)-1]
		got, err := link.DecodeFrame(cobs(mustRaw(t, enc)))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Payload, p) || got.Seq != f.Seq || got.Cmd != f.Cmd {
			t.Fatalf("independent encoding did not round-trip")
		}
	}
}

// mustRaw decodes COBS independently of the package.
func mustRaw(t *testing.T, enc []byte) []byte {
	t.Helper()
	var out []byte
	for i := 0; i < len(enc); {
		c := int(enc[i])
		out = append(out, enc[i+1:i+c]...)
		i += c
		if c != 0xff && i < len(enc) {
			out = append(out, 0)
		}
	}
	return out
}

func TestDecoderResynchronises(t *testing.T) {
	f1 := link.Frame{Type: link.TypeRequest, Seq: 1, Cmd: link.CmdTPM, Payload: []byte{0x80, 0x01, 0, 0, 0, 0x0c}}
	f2 := link.Frame{Type: link.TypeResponse, Seq: 2, Cmd: link.CmdTPM, Payload: run(600, 3)}
	e1, e2 := link.AppendFrame(nil, f1), link.AppendFrame(nil, f2)
	var stream []byte
	stream = append(stream, "boot log: U-Boot 2024.01\r\n"...) // garbage before
	stream = append(stream, e1...)
	stream = append(stream, 0x55, 0x13, 0x00, 0x7e) // garbage between, with a 0x00
	stream = append(stream, e2[:200]...)            // a frame cut short...
	stream = append(stream, 0x00)                   // ...by a delimiter
	stream = append(stream, e2...)
	stream = append(stream, e1[:len(e1)-1]...) // and one unfinished at EOF

	var frames []link.Frame
	bad := 0
	dec := link.NewDecoder(&oneByteReader{stream}, 0)
	for {
		f, err := dec.Next()
		var fe *link.FrameError
		if errors.As(err, &fe) {
			bad++
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		frames = append(frames, f)
	}
	if diff := cmp.Diff([]link.Frame{f1, f2}, frames); diff != "" {
		t.Errorf("frames (-want +got):\n%s", diff)
	}
	// The boot log, 0x55 0x13, 0x7e (ended by the cut frame's leading
	// delimiter) and the cut frame.
	if bad != 4 {
		t.Errorf("bad frames = %d, want 4", bad)
	}
}

// oneByteReader returns one byte per Read, the worst case for a decoder.
type oneByteReader struct{ b []byte }

func (r *oneByteReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	p[0] = r.b[0]
	r.b = r.b[1:]
	return 1, nil
}

func TestDecoderDropsOversize(t *testing.T) {
	const max = 1024
	big := link.AppendFrame(nil, link.Frame{Type: link.TypeRequest, Seq: 1, Cmd: link.CmdTPM, Payload: run(max, 9)})
	fits := link.Frame{Type: link.TypeRequest, Seq: 2, Cmd: link.CmdTPM, Payload: run(max-link.MinFrame, 9)}
	stream := append(append(bytes.Clone(big), run(100000, 0x41)...), link.AppendFrame(nil, fits)...)
	dec := link.NewDecoder(bytes.NewReader(stream), max)
	var fe *link.FrameError
	if _, err := dec.Next(); !errors.As(err, &fe) || fe.Reason != "oversize frame" {
		t.Fatalf("first Next = %v, want oversize", err)
	}
	if _, err := dec.Next(); !errors.As(err, &fe) || fe.Reason != "oversize frame" || fe.Len != 100000 {
		t.Fatalf("second Next = %v, want oversize of 100000 bytes", err)
	}
	got, err := dec.Next()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(fits, got); diff != "" {
		t.Errorf("frame after oversize ones (-want +got):\n%s", diff)
	}
}

func TestDecoderMemoryIsBounded(t *testing.T) {
	const max = 4096
	// 8 MiB of noise, no delimiter: nothing may be kept of it.
	r := io.LimitReader(noise{}, 8<<20)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	dec := link.NewDecoder(r, max)
	for {
		_, err := dec.Next()
		var fe *link.FrameError
		if errors.As(err, &fe) {
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if got, limit := after.TotalAlloc-before.TotalAlloc, uint64(64<<10); got > limit {
		t.Errorf("decoding 8 MiB of noise allocated %d bytes, more than %d", got, limit)
	}
}

type noise struct{}

func (noise) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(i%255) + 1
	}
	return len(p), nil
}

func FuzzDecodeFrame(f *testing.F) {
	e := link.AppendFrame(nil, helloExample)
	f.Add(e[1 : len(e)-1])
	f.Add([]byte{})
	f.Add([]byte{0xff, 1, 2})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := link.DecodeFrame(b)
		if err != nil {
			var fe *link.FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a *FrameError", err)
			}
			return
		}
		// Whatever decodes re-encodes to a frame that decodes the same.
		enc := link.AppendFrame(nil, fr)
		again, err := link.DecodeFrame(enc[1 : len(enc)-1])
		if err != nil {
			t.Fatalf("re-encoded frame does not decode: %v", err)
		}
		if diff := cmp.Diff(fr, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}

func FuzzDecoder(f *testing.F) {
	f.Add(link.AppendFrame(nil, helloExample), uint16(1), []byte{1, 2, 3})
	f.Add([]byte("garbage\x00\x01\x02"), uint16(0xffff), []byte{})
	f.Fuzz(func(t *testing.T, noise []byte, seq uint16, payload []byte) {
		const max = 600
		want := link.Frame{Type: link.TypeResponse, Seq: seq, Cmd: link.CmdTPM, Payload: payload}
		fits := link.MinFrame+len(payload) <= max
		// Arbitrary bytes, then a frame: the frame must come out (when it
		// fits), nothing may panic, and no frame may exceed the limit.
		stream := link.AppendFrame(bytes.Clone(noise), want)
		dec := link.NewDecoder(bytes.NewReader(stream), max)
		found := false
		for {
			got, err := dec.Next()
			var fe *link.FrameError
			if errors.As(err, &fe) {
				continue
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if link.MinFrame+len(got.Payload) > max {
				t.Fatalf("decoded a %d-byte payload past the %d-byte limit", len(got.Payload), max)
			}
			found = cmp.Equal(got, want, cmpopts.EquateEmpty())
		}
		if fits && !found {
			t.Fatalf("frame after %d bytes of noise was not decoded last", len(noise))
		}
	})
}
