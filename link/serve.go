package link

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/kilnworks/kiln/station"
)

// Handler answers the commands of the DUT link on the device side. Serve
// calls it from one goroutine, one command at a time.
//
// Errors are sent to the station as error frames carrying
// station.KindOf(err) and err's message, so they should say what to do.
type Handler interface {
	// Info returns what the device says about itself in HELLO. Serve sets
	// Protocol to the negotiated version.
	Info(ctx context.Context) (station.DeviceInfo, error)
	// TPM runs one raw TPM 2.0 command and returns the raw response. Kinds:
	// NotFound when the device has no TPM, Unavailable when it did not answer.
	TPM(ctx context.Context, cmd []byte) ([]byte, error)
}

// HandlerFunc answers one command: it gets the request payload and returns
// the response payload.
type HandlerFunc func(ctx context.Context, payload []byte) ([]byte, error)

// ServeConfig configures Serve. The zero value is usable.
type ServeConfig struct {
	// MaxFrame is the largest frame (decoded bytes) this side accepts;
	// 0 means DefaultMaxFrame.
	MaxFrame int
	// MinVersion and MaxVersion bound the protocol versions offered; zero
	// means MinProtocol and MaxProtocol.
	MinVersion, MaxVersion int
	// Commands adds commands beyond HELLO and TPM (or replaces TPM); HELLO
	// is always answered by Serve itself.
	Commands map[Command]HandlerFunc
	// Streams adds commands that report progress as event frames while they
	// run (see StreamFunc); a code in both maps is answered by Streams.
	Streams map[Command]StreamFunc
	// Logger receives protocol events; nil discards them.
	Logger *slog.Logger
}

// StreamFunc answers one command that runs long and reports its progress:
// each call of emit sends an event frame carrying payload, with the
// request's sequence number and command code, before the answer. emit may
// be called only from the goroutine running the StreamFunc and only until it
// returns; it fails (and sends nothing) when the payload does not fit the
// station's frame limit or the line fails.
type StreamFunc func(ctx context.Context, payload []byte, emit func(payload []byte) error) ([]byte, error)

type readResult struct {
	f   Frame
	err error
}

// Serve answers the station's requests on rw until ctx is done or reading
// fails, and returns why (ctx.Err() or the read error). Each frame is written
// with a single Write call.
//
// Serve runs one command at a time. It answers a corrupt frame with a NAK,
// and a repeated request (same sequence number, command and payload as the
// last one) with its cached answer without running the command again. When
// ctx is done and rw has a SetReadDeadline method (an *os.File on a pty, a
// net.Conn), Serve interrupts its pending read and returns with no goroutine
// left behind; otherwise that read ends when the caller closes rw.
func Serve(ctx context.Context, rw io.ReadWriter, h Handler, cfg ServeConfig) error {
	s := &server{
		rw:       rw,
		h:        h,
		maxFrame: clampMaxFrame(cfg.MaxFrame),
		minV:     cfg.MinVersion,
		maxV:     cfg.MaxVersion,
		cmds:     cfg.Commands,
		streams:  cfg.Streams,
		log:      cfg.Logger,
	}
	if s.minV == 0 {
		s.minV = MinProtocol
	}
	if s.maxV == 0 {
		s.maxV = MaxProtocol
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "link")

	frames := make(chan readResult)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		dec := NewDecoder(rw, s.maxFrame)
		for {
			f, err := dec.Next()
			select {
			case frames <- readResult{f, err}:
			case <-stop:
				return
			}
			var fe *FrameError
			if err != nil && !errors.As(err, &fe) {
				return
			}
		}
	}()
	defer func() {
		close(stop)
		if d, ok := rw.(interface{ SetReadDeadline(time.Time) error }); ok {
			if d.SetReadDeadline(time.Unix(1, 0)) == nil {
				wg.Wait()
			}
		}
	}()

	for {
		var r readResult
		select {
		case <-ctx.Done():
			return ctx.Err()
		case r = <-frames:
		}
		if r.err != nil {
			var fe *FrameError
			if !errors.As(r.err, &fe) {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return fmt.Errorf("read DUT link: %w", r.err)
			}
			s.log.Debug("dropped bad frame", "err", r.err)
			if fe.Damaged {
				if err := s.write(Frame{Type: TypeNAK}); err != nil {
					return err
				}
			}
			continue
		}
		if err := s.handle(ctx, r.f); err != nil {
			return err
		}
	}
}

type server struct {
	rw         io.ReadWriter
	h          Handler
	maxFrame   int
	minV, maxV int
	cmds       map[Command]HandlerFunc
	streams    map[Command]StreamFunc
	log        *slog.Logger

	hello    bool   // a HELLO succeeded in this session
	peerMax  int    // the station's frame limit, from HELLO
	version  int    // the negotiated protocol version
	wbuf     []byte // encoding buffer
	cacheOK  bool   // the cache holds an answer
	cacheSeq uint16
	cacheCmd Command
	cacheReq []byte // payload of the cached request
	cacheAns []byte // the encoded answer, as written
}

func (s *server) write(f Frame) error {
	s.wbuf = AppendFrame(s.wbuf[:0], f)
	if _, err := s.rw.Write(s.wbuf); err != nil {
		return fmt.Errorf("write DUT link: %w", err)
	}
	return nil
}

func (s *server) handle(ctx context.Context, f Frame) error {
	if f.Type != TypeRequest {
		s.log.Debug("ignored frame that is not a request", "type", f.Type, "seq", f.Seq)
		return nil
	}
	if f.Cmd == CmdHello {
		return s.helloCmd(ctx, f)
	}
	if !s.hello {
		return s.write(s.errorFrame(f, station.KindUnavailable,
			"the agent has not seen a HELLO in this session (did the DUT restart?): start again with HELLO"))
	}
	if s.cacheOK && f.Seq == s.cacheSeq && f.Cmd == s.cacheCmd && bytes.Equal(f.Payload, s.cacheReq) {
		s.log.Debug("repeated request answered from cache", "seq", f.Seq, "cmd", f.Cmd)
		if _, err := s.rw.Write(s.cacheAns); err != nil {
			return fmt.Errorf("write DUT link: %w", err)
		}
		return nil
	}

	var (
		out []byte
		err error
	)
	sfn, stream := s.streams[f.Cmd]
	switch fn, ok := s.cmds[f.Cmd]; {
	case stream:
		out, err = s.stream(ctx, f, sfn)
	case ok:
		out, err = fn(ctx, f.Payload)
	case f.Cmd == CmdTPM:
		out, err = s.h.TPM(ctx, f.Payload)
	default:
		err = station.Errorf("", station.KindInvalid,
			"unknown command 0x%02x (this agent speaks protocol version %d): update the agent", uint8(f.Cmd), s.version)
	}
	ans := Frame{Type: TypeResponse, Seq: f.Seq, Cmd: f.Cmd, Payload: out}
	if err != nil {
		s.log.Info("command failed", "cmd", f.Cmd, "seq", f.Seq, "err", err)
		ans = s.errorFrame(f, station.KindOf(err), err.Error())
	} else if MinFrame+len(out) > s.peerMax {
		ans = s.errorFrame(f, station.KindInternal, fmt.Sprintf(
			"the %d-byte answer does not fit the station's %d-byte frame limit: raise the station's MaxFrame", len(out), s.peerMax))
	}
	s.wbuf = AppendFrame(s.wbuf[:0], ans)
	s.cacheOK, s.cacheSeq, s.cacheCmd = true, f.Seq, f.Cmd
	s.cacheReq = append(s.cacheReq[:0], f.Payload...)
	s.cacheAns = append(s.cacheAns[:0], s.wbuf...)
	if _, err := s.rw.Write(s.wbuf); err != nil {
		return fmt.Errorf("write DUT link: %w", err)
	}
	return nil
}

// stream runs a StreamFunc, giving it an emit that writes event frames for
// request f until it returns.
func (s *server) stream(ctx context.Context, f Frame, fn StreamFunc) ([]byte, error) {
	var (
		buf  []byte
		done bool
	)
	emit := func(p []byte) error {
		if done {
			return errors.New("the command has answered already: events go before the answer")
		}
		if MinFrame+len(p) > s.peerMax {
			return fmt.Errorf("a %d-byte event does not fit the station's %d-byte frame limit", len(p), s.peerMax)
		}
		buf = AppendFrame(buf[:0], Frame{Type: TypeEvent, Seq: f.Seq, Cmd: f.Cmd, Payload: p})
		if _, err := s.rw.Write(buf); err != nil {
			return fmt.Errorf("write DUT link: %w", err)
		}
		return nil
	}
	defer func() { done = true }()
	return fn(ctx, f.Payload, emit)
}

func (s *server) errorFrame(req Frame, k station.Kind, msg string) Frame {
	return Frame{Type: TypeError, Seq: req.Seq, Cmd: req.Cmd, Payload: appendErrorPayload(nil, k, msg)}
}

// helloCmd negotiates the version. HELLO is always run, never answered from
// the cache, and starts a new session: it empties the cache.
func (s *server) helloCmd(ctx context.Context, f Frame) error {
	s.cacheOK = false
	s.hello = false
	req, err := parseHelloRequest(f.Payload)
	if err != nil {
		s.log.Warn("bad HELLO", "err", err)
		return s.write(s.errorFrame(f, station.KindInvalid, err.Error()+": the station and agent disagree on HELLO; update both"))
	}
	v := min(int(req.MaxVersion), s.maxV)
	if v < int(req.MinVersion) || v < s.minV {
		msg := fmt.Sprintf("no common protocol version: the station speaks %d–%d, this agent speaks %d–%d: update the %s",
			req.MinVersion, req.MaxVersion, s.minV, s.maxV, older(int(req.MaxVersion), s.maxV))
		s.log.Error("HELLO failed", "err", msg)
		return s.write(s.errorFrame(f, station.KindInvalid, msg))
	}
	info, err := s.h.Info(ctx)
	if err != nil {
		return s.write(s.errorFrame(f, station.KindOf(err), err.Error()))
	}
	info.Protocol = v
	s.hello, s.version = true, v
	s.peerMax = clampMaxFrame(int(min(req.MaxFrame, LimitMaxFrame)))
	s.log.Info("HELLO", "version", v, "station_max_frame", s.peerMax)
	resp := helloResponse{Version: uint8(v), MaxFrame: uint32(s.maxFrame), Info: info}
	return s.write(Frame{Type: TypeResponse, Seq: f.Seq, Cmd: CmdHello, Payload: resp.append(nil)})
}

// older names the side with the older newest version, to be updated.
func older(stationMax, agentMax int) string {
	if stationMax < agentMax {
		return "station"
	}
	return "agent firmware"
}
