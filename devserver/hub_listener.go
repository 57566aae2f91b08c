package devserver

import (
	"crypto/tls"
	"log/slog"
	"net"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
)

// hubListener is the hub's mochi listener: TLS over a TCP listener opened
// by Hub.Start. Unlike mochi's TCP listener it bounds the TLS handshake and
// the wait for CONNECT, and Close closes connections that have not become
// MQTT clients yet and waits for every goroutine it started, so that a
// half-open connection can neither hold Close nor leak.
type hubListener struct {
	id  string
	ln  net.Listener
	tls *tls.Config
	log *slog.Logger

	conns connSet
}

var _ listeners.Listener = (*hubListener)(nil)

func (l *hubListener) ID() string       { return l.id }
func (l *hubListener) Address() string  { return l.ln.Addr().String() }
func (l *hubListener) Protocol() string { return "mqtts" }

// Init is called by mochi when the listener is added; the socket is open
// already.
func (l *hubListener) Init(*slog.Logger) error { return nil }

// Serve accepts connections until Close, and runs each one's TLS handshake
// and MQTT session on its own goroutine.
func (l *hubListener) Serve(establish listeners.EstablishFn) {
	if !l.conns.add() {
		return
	}
	defer l.conns.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(c, l.tls)
		if !l.conns.track(tc) {
			_ = c.Close()
			return
		}
		go func() {
			defer l.conns.untrack(tc)
			defer tc.Close()
			_ = tc.SetDeadline(time.Now().Add(hubConnectTimeout)) // mochi resets it after CONNECT
			if err := tc.Handshake(); err != nil {
				l.log.Debug("TLS handshake failed", "remote", c.RemoteAddr().String(), "error", err)
				return
			}
			if err := establish(l.id, tc); err != nil {
				l.log.Debug("connection ended", "remote", c.RemoteAddr().String(), "error", err)
			}
		}()
	}
}

// Close stops accepting, disconnects mochi's clients, closes the
// connections still in handshake or CONNECT and waits for all goroutines.
func (l *hubListener) Close(closeClients listeners.CloseFn) {
	l.conns.close(func() { _ = l.ln.Close() }, func() { closeClients(l.id) })
}
