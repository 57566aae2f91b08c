package devserver

import (
	"net"
	"sync"
)

// connSet tracks the connections (and goroutines) a listener hands to
// mochi, so that closing the listener can end connections that have not
// become MQTT clients yet and wait for every goroutine: a half-open
// connection can neither hold Close nor leak, and mochi's Close never races
// a late connection. The zero value is ready.
type connSet struct {
	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// add counts a goroutine (released with wg.Done) unless the set is closed.
func (s *connSet) add() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// track counts connection c unless the set is closed; untrack releases it.
func (s *connSet) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = make(map[net.Conn]struct{})
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *connSet) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// close closes the set once: stop runs under the lock (e.g. closing the
// socket that accepts), then closeClients (mochi disconnects its clients),
// then the connections still tracked are closed and every goroutine is
// awaited.
func (s *connSet) close(stop, closeClients func()) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	if stop != nil {
		stop()
	}
	s.mu.Unlock()
	closeClients()
	s.mu.Lock()
	for c := range s.conns {
		_ = c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}
