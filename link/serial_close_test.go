package link_test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/kilnworks/kiln/link"
	"github.com/kilnworks/kiln/station"
)

// Closing a link whose reader waits on an idle line returns promptly, again
// and again, while the process keeps opening and closing other files (whose
// descriptors would take over a port closed under a read).
func TestCloseIdleSerialLink(t *testing.T) {
	for i := range 30 {
		master, slave, err := pty.Open()
		if err != nil {
			t.Fatal(err)
		}
		c, err := link.Open(t.Context(), slave.Name(), link.Config{})
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		go func() { // churn descriptors, as a busy station does
			for {
				select {
				case <-stop:
					return
				default:
				}
				if r, w, err := os.Pipe(); err == nil {
					r.Close()
					w.Close()
				}
			}
		}()
		time.Sleep(time.Duration(i%5) * 10 * time.Millisecond)
		done := make(chan error, 1)
		go func() { done <- c.Close() }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("close %d: Close did not return within 5 s", i)
		}
		close(stop)
		slave.Close()
		master.Close()
	}
}

// A port open in this process cannot be opened again (two readers would
// steal each other's bytes); once closed, it can.
func TestOpenPortTwice(t *testing.T) {
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	defer slave.Close()
	c, err := link.Open(t.Context(), slave.Name(), link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = link.Open(t.Context(), slave.Name(), link.Config{})
	if station.KindOf(err) != station.KindConflict || !strings.Contains(err.Error(), "already open") {
		t.Errorf("second open: %v, want a Conflict saying the port is open", err)
	}
	c.Close()
	c2, err := link.Open(t.Context(), slave.Name(), link.Config{})
	if err != nil {
		t.Fatalf("open after close: %v", err)
	}
	c2.Close()
}
