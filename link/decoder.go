package link

import (
	"bytes"
	"io"
)

// readBufSize is the size of a Decoder's read buffer.
const readBufSize = 4096

// Decoder reads frames from a byte stream. It resynchronises on the 0x00
// delimiter: bytes before a delimiter that do not form a valid frame are
// dropped and reported as a *FrameError, after which decoding continues. It
// buffers at most one encoded frame of the configured maximum size; longer
// runs are discarded up to the next delimiter without being stored.
//
// A Decoder is not safe for concurrent use.
type Decoder struct {
	r        io.Reader
	max      int     // largest decoded frame accepted
	buf      []byte  // read buffer
	pos, end int     // unread bytes are buf[pos:end]
	chunk    []byte  // bytes since the last delimiter, at most cap(chunk)
	over     bool    // the current run exceeded cap(chunk) and is being discarded
	overLen  int     // length of the run being discarded
	head     [3]byte // first bytes of the run being discarded
	headLen  int
	err      error // sticky read error
	empty    int   // consecutive reads that returned nothing
}

// NewDecoder returns a Decoder reading from r that accepts frames of up to
// maxFrame decoded bytes (0 means DefaultMaxFrame; the value is clamped to
// [MinMaxFrame, LimitMaxFrame]).
func NewDecoder(r io.Reader, maxFrame int) *Decoder {
	maxFrame = clampMaxFrame(maxFrame)
	return &Decoder{
		r:     r,
		max:   maxFrame,
		buf:   make([]byte, readBufSize),
		chunk: make([]byte, 0, MaxEncodedLen(maxFrame)),
	}
}

func clampMaxFrame(n int) int {
	switch {
	case n == 0:
		return DefaultMaxFrame
	case n < MinMaxFrame:
		return MinMaxFrame
	case n > LimitMaxFrame:
		return LimitMaxFrame
	}
	return n
}

// Next returns the next frame. A dropped frame is reported as a *FrameError
// and the caller may call Next again; any other error comes from the reader
// (io.EOF included) and is returned again by every later call. Bytes of an
// unfinished frame at a read error are discarded.
func (d *Decoder) Next() (Frame, error) {
	for {
		if d.pos == d.end {
			if d.err != nil {
				return Frame{}, d.err
			}
			n, err := d.r.Read(d.buf)
			d.pos, d.end = 0, n
			if err != nil {
				d.err = err
			}
			if n == 0 && err == nil {
				if d.empty++; d.empty >= 100 {
					d.err = io.ErrNoProgress
				}
			} else {
				d.empty = 0
			}
			continue
		}
		seg := d.buf[d.pos:d.end]
		i := bytes.IndexByte(seg, 0)
		if i < 0 {
			d.take(seg)
			d.pos = d.end
			continue
		}
		d.take(seg[:i])
		d.pos += i + 1
		if d.over {
			n := d.overLen
			d.over, d.overLen = false, 0
			return Frame{}, &FrameError{Reason: "oversize frame", Len: n, Damaged: damaged(d.head[:d.headLen], n)}
		}
		if len(d.chunk) == 0 {
			continue // back-to-back delimiters
		}
		enc := d.chunk
		d.chunk = d.chunk[:0]
		d.headLen = copy(d.head[:], enc)
		raw, err := cobsDecode(enc[:0], enc)
		if err != nil {
			return Frame{}, &FrameError{Reason: err.Error(), Len: len(enc), Damaged: damaged(d.head[:d.headLen], len(enc))}
		}
		if len(raw) > d.max {
			return Frame{}, &FrameError{Reason: "oversize frame", Len: len(enc), Damaged: damaged(d.head[:d.headLen], len(enc))}
		}
		return parseFrame(raw, len(enc), damaged(d.head[:d.headLen], len(enc)))
	}
}

// take appends b to the current run, switching to discarding once the run
// no longer fits.
func (d *Decoder) take(b []byte) {
	if d.over {
		d.overLen += len(b)
		return
	}
	if len(d.chunk)+len(b) > cap(d.chunk) {
		d.headLen = copy(d.head[:], d.chunk)
		d.headLen += copy(d.head[d.headLen:], b)
		d.over = true
		d.overLen = len(d.chunk) + len(b)
		d.chunk = d.chunk[:0]
		return
	}
	d.chunk = append(d.chunk, b...)
}
