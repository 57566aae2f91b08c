package link

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.bug.st/serial"

	"github.com/kilnworks/kiln/station"
)

// Default timeouts and retry budget of a Client.
const (
	DefaultHelloTimeout = 2 * time.Second
	DefaultTPMTimeout   = 30 * time.Second
	// DefaultConfigTimeout bounds WRITE CONFIG and READ CONFIG.
	DefaultConfigTimeout = 10 * time.Second
	// DefaultProvisionTimeout is how long PROVISION may go without a sign
	// of life (an event) from the agent.
	DefaultProvisionTimeout = 120 * time.Second
	// DefaultProvisionStartTimeout is how long the station waits for the
	// first event of PROVISION, which the agent sends as soon as it starts.
	DefaultProvisionStartTimeout = 5 * time.Second
	DefaultAttempts              = 3
	DefaultBaudRate              = 115200
)

// Config configures a Client. The zero value is usable.
type Config struct {
	// Port names the line in messages for a person, e.g. "/dev/ttyUSB0".
	// Open sets it to the path it opened.
	Port string
	// BaudRate is the line rate Open sets (8N1); 0 means 115200.
	BaudRate int
	// MaxFrame is the largest frame (decoded bytes) the station accepts;
	// 0 means DefaultMaxFrame.
	MaxFrame int
	// MinVersion and MaxVersion bound the protocol versions offered in
	// HELLO; zero means MinProtocol and MaxProtocol.
	MinVersion, MaxVersion int
	// HelloTimeout and TPMTimeout are per-attempt timeouts; zero means
	// DefaultHelloTimeout and DefaultTPMTimeout.
	HelloTimeout, TPMTimeout time.Duration
	// ConfigTimeout is the per-attempt timeout of WRITE CONFIG and READ
	// CONFIG; zero means DefaultConfigTimeout.
	ConfigTimeout time.Duration
	// KeyGenTimeout is the per-attempt timeout of GENERATE KEY; zero means
	// DefaultKeyGenTimeout. WRITE CERT CHAIN, WRITE SYMMETRIC KEY and READ
	// IDENTITY use ConfigTimeout.
	KeyGenTimeout time.Duration
	// ProvisionTimeout is how long PROVISION may run without an event from
	// the agent (each event restarts it); zero means
	// DefaultProvisionTimeout.
	ProvisionTimeout time.Duration
	// ProvisionStartTimeout is how long the station waits for PROVISION's
	// first event before it sends the request again; zero means
	// DefaultProvisionStartTimeout.
	ProvisionStartTimeout time.Duration
	// Attempts is how many times a request is sent before the DUT is
	// declared unavailable; 0 means DefaultAttempts.
	Attempts int
	// Logger receives protocol events; nil discards them.
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	c.MaxFrame = clampMaxFrame(c.MaxFrame)
	if c.BaudRate == 0 {
		c.BaudRate = DefaultBaudRate
	}
	if c.MinVersion == 0 {
		c.MinVersion = MinProtocol
	}
	if c.MaxVersion == 0 {
		c.MaxVersion = MaxProtocol
	}
	if c.HelloTimeout <= 0 {
		c.HelloTimeout = DefaultHelloTimeout
	}
	if c.TPMTimeout <= 0 {
		c.TPMTimeout = DefaultTPMTimeout
	}
	if c.ConfigTimeout <= 0 {
		c.ConfigTimeout = DefaultConfigTimeout
	}
	if c.KeyGenTimeout <= 0 {
		c.KeyGenTimeout = DefaultKeyGenTimeout
	}
	if c.ProvisionTimeout <= 0 {
		c.ProvisionTimeout = DefaultProvisionTimeout
	}
	if c.ProvisionStartTimeout <= 0 {
		c.ProvisionStartTimeout = DefaultProvisionStartTimeout
	}
	if c.Attempts <= 0 {
		c.Attempts = DefaultAttempts
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Client is the station side of a DUT link. It implements station.Link; its
// methods may be called from several goroutines but run one request at a
// time.
type Client struct {
	rwc io.ReadWriteCloser
	cfg Config
	log *slog.Logger
	dut string // "DUT on /dev/ttyUSB0", for messages

	mu      sync.Mutex // serialises requests
	seq     uint16
	hello   bool
	info    station.DeviceInfo
	peerMax int
	wbuf    []byte

	pmu     sync.Mutex
	pending *pending

	done    chan struct{} // closed when the reader stops
	readErr error         // why the reader stopped; set before done is closed
	wg      sync.WaitGroup

	closeOnce sync.Once
	closed    atomic.Bool
	closeErr  error

	bytesOut, bytesIn           atomic.Int64
	requests, retries, badFrame atomic.Int64
}

var _ station.Link = (*Client)(nil)

// pending is the one request a Client waits for.
type pending struct {
	seq   uint16
	resp  chan Frame    // the answer (response or error frame)
	poke  chan struct{} // a NAK or a corrupt frame arrived: retransmit now
	event chan Frame    // event frames for this request: the agent is alive
}

// eventQueue is how many events of a request wait to be handled before
// more are dropped (the timer is restarted all the same).
const eventQueue = 64

// Open opens the serial port at path (8N1 at cfg.BaudRate, 115200 by
// default) and returns a Client on it. DTR and RTS are raised best-effort
// (ptys refuse them). Kinds: NotFound (no such port), Conflict (port busy),
// Unauthorized (no permission), Unavailable.
func Open(ctx context.Context, path string, cfg Config) (*Client, error) {
	const op = "open DUT link"
	if err := ctx.Err(); err != nil {
		return nil, station.E(op, station.KindOther, err)
	}
	cfg.setDefaults()
	cfg.Port = path
	release, err := claimPort(path)
	if err != nil {
		return nil, err
	}
	port, err := serial.Open(path, &serial.Mode{
		BaudRate: cfg.BaudRate,
		DataBits: 8,
		Parity:   serial.NoParity,
		StopBits: serial.OneStopBit,
	})
	if err != nil {
		release()
		var pe *serial.PortError
		if errors.As(err, &pe) {
			switch pe.Code() {
			case serial.PortNotFound:
				return nil, station.Errorf(op, station.KindNotFound, "no serial port %s: check the cable and the port name", path)
			case serial.PortBusy:
				return nil, station.Errorf(op, station.KindConflict, "serial port %s is in use by another program: close it and try again", path)
			case serial.PermissionDenied:
				return nil, station.Errorf(op, station.KindUnauthorized, "no permission to open %s: add the station user to the dialout group", path)
			}
		}
		return nil, station.Errorf(op, station.KindUnavailable, "open %s: %w: check the cable and the port name", path, err)
	}
	line := &serialLine{Port: port, release: release}
	if err := port.SetDTR(true); err != nil {
		cfg.Logger.Debug("DTR not set (normal on a pty)", "port", path, "err", err)
	}
	if err := port.SetRTS(true); err != nil {
		cfg.Logger.Debug("RTS not set (normal on a pty)", "port", path, "err", err)
	}
	if err := port.ResetInputBuffer(); err != nil {
		cfg.Logger.Debug("input buffer not flushed", "port", path, "err", err)
	}
	if err := port.SetReadTimeout(readWake); err != nil {
		line.Close()
		return nil, station.Errorf(op, station.KindUnavailable, "set the read timeout of %s: %w", path, err)
	}
	return NewClient(line, cfg), nil
}

// openPorts are the serial ports this process has open, by resolved path.
// Two readers on one port steal each other's bytes (and root ignores the
// port's exclusive-access flag), so a second Open of a port is refused.
var openPorts = struct {
	sync.Mutex
	m map[string]bool
}{m: make(map[string]bool)}

// claimPort marks path open in this process and returns its release.
// Kinds: Conflict when it is open already.
func claimPort(path string) (func(), error) {
	key := filepath.Clean(path)
	if r, err := filepath.EvalSymlinks(path); err == nil {
		key = r
	}
	openPorts.Lock()
	defer openPorts.Unlock()
	if openPorts.m[key] {
		return nil, station.Errorf("open DUT link", station.KindConflict, "serial port %s is already open in this station (another slot or run uses it): give each slot its own port", path)
	}
	openPorts.m[key] = true
	return func() {
		openPorts.Lock()
		defer openPorts.Unlock()
		delete(openPorts.m, key)
	}, nil
}

// readWake is how often a read of a serial line wakes up to see whether the
// line is being closed.
const readWake = 10 * time.Millisecond

// serialLine is a serial port that is never closed under a read in
// progress. The port library closes the descriptor before it wakes blocked
// readers, so a read that loses that race can go on with a descriptor number
// the process has meanwhile given to another file, and block for ever (with
// Close waiting for it). Reads here wake every readWake (an idle port costs
// a hundred selects a second, and Close waits at most that long); Close
// marks the line closing, waits for the read in progress to return, and
// only then closes the port.
type serialLine struct {
	serial.Port
	mu      sync.RWMutex // held for reading by Read, for writing by Close
	closing atomic.Bool
	release func() // gives the port back to claimPort
	once    sync.Once
}

func (s *serialLine) Read(p []byte) (int, error) {
	for {
		if s.closing.Load() {
			return 0, io.EOF
		}
		s.mu.RLock()
		var n int
		var err error
		if !s.closing.Load() {
			n, err = s.Port.Read(p)
		}
		s.mu.RUnlock()
		if n > 0 || err != nil {
			return n, err
		}
	}
}

func (s *serialLine) Close() error {
	s.closing.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.Port.Close()
	s.once.Do(s.release)
	return err
}

// NewClient returns a Client speaking the DUT link over rwc, which it owns:
// Close closes rwc, and closing rwc must make a pending Read return.
func NewClient(rwc io.ReadWriteCloser, cfg Config) *Client {
	cfg.setDefaults()
	c := &Client{
		rwc:  rwc,
		cfg:  cfg,
		log:  cfg.Logger.With("component", "link", "port", cfg.Port),
		dut:  "DUT",
		seq:  uint16(rand.N(1 << 16)),
		done: make(chan struct{}),
	}
	if cfg.Port != "" {
		c.dut = "DUT on " + cfg.Port
	}
	c.wg.Add(1)
	go c.readLoop()
	return c
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (r countingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.n.Add(int64(n))
	return n, err
}

func (c *Client) readLoop() {
	defer c.wg.Done()
	dec := NewDecoder(countingReader{c.rwc, &c.bytesIn}, c.cfg.MaxFrame)
	for {
		f, err := dec.Next()
		var fe *FrameError
		switch {
		case errors.As(err, &fe):
			c.badFrame.Add(1)
			c.log.Debug("dropped bad frame", "err", err)
			if fe.Damaged {
				c.signal(func(p *pending) chan struct{} { return p.poke })
			}
			continue
		case err != nil:
			c.readErr = err
			close(c.done)
			return
		}
		switch f.Type {
		case TypeNAK:
			c.log.Debug("NAK from the agent")
			c.signal(func(p *pending) chan struct{} { return p.poke })
		case TypeEvent:
			c.pmu.Lock()
			if p := c.pending; p != nil && p.seq == f.Seq {
				select {
				case p.event <- f:
				default:
					c.log.Debug("dropped an event: the station is not keeping up", "seq", f.Seq)
				}
			} else {
				c.log.Debug("ignored event of a request not waited for", "seq", f.Seq)
			}
			c.pmu.Unlock()
		case TypeResponse, TypeError:
			c.pmu.Lock()
			p := c.pending
			if p != nil && p.seq == f.Seq {
				select {
				case p.resp <- f:
				default: // answered already: a duplicate
				}
			} else {
				c.log.Debug("ignored answer to a request not waited for", "seq", f.Seq)
			}
			c.pmu.Unlock()
		default:
			c.log.Debug("ignored frame", "type", f.Type, "seq", f.Seq)
		}
	}
}

func (c *Client) signal(ch func(*pending) chan struct{}) {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if c.pending != nil {
		select {
		case ch(c.pending) <- struct{}{}:
		default:
		}
	}
}

// roundTrip sends one request and waits for its answer, retransmitting it
// with the same sequence number after a timeout, a NAK or a corrupt frame,
// up to cfg.Attempts sends in all.
func (c *Client) roundTrip(ctx context.Context, op string, cmd Command, payload []byte, timeout time.Duration) (Frame, error) {
	return c.roundTripEvents(ctx, op, cmd, payload, timeout, timeout, nil)
}

// roundTripEvents is roundTrip for a command that streams events: each
// attempt waits first for the first event or the answer, then idle between
// events; each event of the request restarts the timer and is passed to
// onEvent (when not nil) on the caller's goroutine, in order.
func (c *Client) roundTripEvents(ctx context.Context, op string, cmd Command, payload []byte, first, idle time.Duration, onEvent func(Frame)) (Frame, error) {
	if c.closed.Load() {
		return Frame{}, station.Errorf(op, station.KindUnavailable, "the link to the %s is closed", c.dut)
	}
	if err := ctx.Err(); err != nil {
		return Frame{}, station.E(op, station.KindOther, err)
	}
	limit := MinMaxFrame // all an agent promises before HELLO
	if c.hello {
		limit = c.peerMax
	}
	if n := MinFrame + len(payload); n > limit {
		return Frame{}, station.Errorf(op, station.KindInvalid, "a %d-byte request does not fit the %s's %d-byte frame limit", n, c.dut, limit)
	}
	c.seq++
	p := &pending{seq: c.seq, resp: make(chan Frame, 1), poke: make(chan struct{}, 1), event: make(chan Frame, eventQueue)}
	c.pmu.Lock()
	c.pending = p
	c.pmu.Unlock()
	defer func() {
		c.pmu.Lock()
		c.pending = nil
		c.pmu.Unlock()
	}()

	c.wbuf = AppendFrame(c.wbuf[:0], Frame{Type: TypeRequest, Seq: p.seq, Cmd: cmd, Payload: payload})
	send := func() error {
		n, err := c.rwc.Write(c.wbuf)
		c.bytesOut.Add(int64(n))
		if err != nil {
			if c.closed.Load() {
				return station.Errorf(op, station.KindUnavailable, "the link to the %s was closed", c.dut)
			}
			return station.Errorf(op, station.KindUnavailable, "cannot write to the %s (%v): check the cable and that the agent is running", c.dut, err)
		}
		return nil
	}
	if err := send(); err != nil {
		return Frame{}, err
	}
	attempts := 1
	timeout := first
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	retry := func(why string) error {
		attempts++
		c.retries.Add(1)
		c.log.Debug("retransmitting", "cmd", cmd, "seq", p.seq, "attempt", attempts, "why", why)
		timer.Reset(timeout)
		return send()
	}
	for {
		select {
		case f := <-p.resp:
			// Events the agent sent before its answer were queued before it.
			for drained := false; !drained; {
				select {
				case e := <-p.event:
					if onEvent != nil && e.Cmd == cmd {
						onEvent(e)
					}
				default:
					drained = true
				}
			}
			c.requests.Add(1)
			if f.Cmd != cmd {
				return Frame{}, station.Errorf(op, station.KindInvalid, "the %s answered %v to a %v request: the agent is faulty", c.dut, f.Cmd, cmd)
			}
			if f.Type == TypeError {
				k, msg := parseErrorPayload(f.Payload)
				return f, station.Errorf(op, k, "%s: %s", c.dut, msg)
			}
			return f, nil
		case <-p.poke:
			if attempts < c.cfg.Attempts {
				if err := retry("NAK or corrupt frame"); err != nil {
					return Frame{}, err
				}
			}
		case f := <-p.event:
			timeout = idle
			timer.Reset(timeout)
			if onEvent != nil && f.Cmd == cmd {
				onEvent(f)
			}
		case <-timer.C:
			if attempts >= c.cfg.Attempts {
				return Frame{}, station.Errorf(op, station.KindUnavailable,
					"%s stopped answering (%d attempts, %v each): check the cable and that the agent is running",
					c.dut, attempts, timeout)
			}
			if err := retry("timeout"); err != nil {
				return Frame{}, err
			}
		case <-c.done:
			if c.closed.Load() {
				return Frame{}, station.Errorf(op, station.KindUnavailable, "the link to the %s was closed", c.dut)
			}
			return Frame{}, station.Errorf(op, station.KindUnavailable,
				"%s dropped the line (%s): check the cable and that the agent is running", c.dut, hangup(c.readErr))
		case <-ctx.Done():
			return Frame{}, station.E(op, station.KindOther, ctx.Err())
		}
	}
}

// Info runs the HELLO exchange: it offers the station's protocol versions
// and frame limit and returns what the device says about itself, Protocol
// being the version the agent chose. Kinds: Unavailable (no answer),
// Invalid (no common protocol version, malformed answer).
func (c *Client) Info(ctx context.Context) (station.DeviceInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.helloLocked(ctx)
}

func (c *Client) helloLocked(ctx context.Context) (station.DeviceInfo, error) {
	const op = "hello"
	c.hello = false
	req := helloRequest{MinVersion: uint8(c.cfg.MinVersion), MaxVersion: uint8(c.cfg.MaxVersion), MaxFrame: uint32(c.cfg.MaxFrame)}
	f, err := c.roundTrip(ctx, op, CmdHello, req.append(nil), c.cfg.HelloTimeout)
	if err != nil {
		return station.DeviceInfo{}, err
	}
	resp, err := parseHelloResponse(f.Payload)
	if err != nil {
		return station.DeviceInfo{}, station.Errorf(op, station.KindInvalid, "%s: %v: the agent is faulty or of another make", c.dut, err)
	}
	if v := int(resp.Version); v < c.cfg.MinVersion || v > c.cfg.MaxVersion {
		return station.DeviceInfo{}, station.Errorf(op, station.KindInvalid,
			"no common protocol version: the %s chose version %d, this station speaks %d–%d: update the %s",
			c.dut, v, c.cfg.MinVersion, c.cfg.MaxVersion, older(c.cfg.MaxVersion, v))
	}
	c.hello, c.info, c.peerMax = true, resp.Info, clampMaxFrame(int(min(resp.MaxFrame, LimitMaxFrame)))
	c.log.Info("HELLO", "serial", resp.Info.Serial, "model", resp.Info.Model, "version", resp.Version, "dut_max_frame", c.peerMax)
	return resp.Info, nil
}

// TPM sends one raw TPM 2.0 command to the DUT's TPM and returns the raw
// response. It runs HELLO first if no HELLO has succeeded on this Client.
// Kinds: Unavailable, Invalid, NotFound (no TPM on the DUT).
func (c *Client) TPM(ctx context.Context, cmd []byte) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.hello {
		if _, err := c.helloLocked(ctx); err != nil {
			return nil, err
		}
	}
	f, err := c.roundTrip(ctx, "TPM command", CmdTPM, cmd, c.cfg.TPMTimeout)
	if err != nil {
		if station.KindOf(err) == station.KindUnavailable {
			c.hello = false // the DUT may have restarted: negotiate again next time
		}
		return nil, err
	}
	return f.Payload, nil
}

// Stats reports what has crossed the link so far: bytes written and read
// (framing, retransmissions and garbage included), answers received,
// retransmissions and dropped frames.
func (c *Client) Stats() station.LinkStats {
	return station.LinkStats{
		BytesOut:  c.bytesOut.Load(),
		BytesIn:   c.bytesIn.Load(),
		Requests:  int(c.requests.Load()),
		Retries:   int(c.retries.Load()),
		BadFrames: int(c.badFrame.Load()),
	}
}

// Close closes the line and waits for the reader goroutine to stop. It is
// idempotent; a request in progress fails with KindUnavailable.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		if err := c.rwc.Close(); err != nil {
			c.closeErr = station.Errorf("close DUT link", station.KindUnavailable, "close %s: %w", c.cfg.Port, err)
		}
		c.wg.Wait()
	})
	return c.closeErr
}

// hangup describes why a line stopped delivering bytes, for a person.
func hangup(err error) string {
	var pe *serial.PortError
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) || (errors.As(err, &pe) && pe.Code() == serial.PortClosed) {
		return "the line hung up"
	}
	return err.Error()
}
