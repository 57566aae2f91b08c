package hsm_test

import (
	"context"
	"encoding/binary"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kilnworks/kiln/hsm/tpmsim"
	"github.com/kilnworks/kiln/station"
)

// openSim opens the simulator for one test. Only one simulator exists per
// process at a time, so tests using it do not run in parallel.
func openSim(t *testing.T) transport.TPMCloser {
	t.Helper()
	sim, err := tpmsim.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sim.Close() })
	return sim
}

// counter counts the commands and bytes crossing a transport.
type counter struct {
	next         transport.TPM
	mu           sync.Mutex
	sends        int
	bytesOut     int
	bytesIn      int
	commandCodes []uint32
}

func (c *counter) Send(cmd []byte) ([]byte, error) {
	rsp, err := c.next.Send(cmd)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sends++
	c.bytesOut += len(cmd)
	c.bytesIn += len(rsp)
	if len(cmd) >= 10 {
		c.commandCodes = append(c.commandCodes, binary.BigEndian.Uint32(cmd[6:10]))
	}
	return rsp, err
}

// simLink is a station.Link whose TPM passthrough goes straight to a
// transport: the agent's side of the link without the serial line.
type simLink struct {
	tpm   transport.TPM
	stats station.LinkStats
}

func (l *simLink) Info(ctx context.Context) (station.DeviceInfo, error) {
	return station.DeviceInfo{Serial: "SIM-1", Capabilities: []string{"tpm"}, Protocol: 1}, nil
}

func (l *simLink) TPM(ctx context.Context, cmd []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, station.E("tpm passthrough", station.KindUnavailable, err)
	}
	rsp, err := l.tpm.Send(cmd)
	l.stats.Requests++
	l.stats.BytesOut += int64(len(cmd))
	l.stats.BytesIn += int64(len(rsp))
	return rsp, err
}

func (l *simLink) Stats() station.LinkStats { return l.stats }
func (l *simLink) Close() error             { return nil }

func wantKind(t *testing.T, err error, want station.Kind) {
	t.Helper()
	if got := station.KindOf(err); got != want {
		t.Fatalf("error kind = %v, want %v (error: %v)", got, want, err)
	}
}
