package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/kilnworks/kiln/station"
	"github.com/kilnworks/kiln/ui"
)

// guiBatches is the Batches screen's backend: listing, units and sealing on
// the station's BatchStore.
//
// TODO(lead): Push, Export, Enable and UnitErrors belong to cloudsync's
// push engine, which is written on another branch. Wire them here when it
// lands (the engine's progress callback maps to ui.BatchProgress). Until
// then they say so to the supervisor with Kind Unavailable.
type guiBatches struct {
	store station.BatchStore
	log   *slog.Logger
}

var _ ui.BatchActions = (*guiBatches)(nil)

func (g *guiBatches) Batches(ctx context.Context, f station.BatchFilter) ([]*station.Batch, error) {
	return g.store.Batches(ctx, f)
}

func (g *guiBatches) Batch(ctx context.Context, id int64) (*station.Batch, error) {
	return g.store.Batch(ctx, id)
}

func (g *guiBatches) BatchUnits(ctx context.Context, id int64) ([]*station.Unit, error) {
	return g.store.BatchUnits(ctx, id)
}

func (g *guiBatches) Seal(ctx context.Context, id int64) error {
	if err := g.store.Transition(ctx, id, station.BatchOpen, station.BatchSealed); err != nil {
		return err
	}
	g.log.Info("batch sealed", "batch", id)
	return nil
}

// errNoEngine is what the push engine's actions answer until cloudsync is
// wired.
func errNoEngine(op string) error {
	return station.Errorf(op, station.KindUnavailable, "this kiln build has no batch push engine yet (cloudsync): the batch is unchanged; push or export it with a kiln build that has one")
}

func (g *guiBatches) Push(context.Context, int64, func(ui.BatchProgress)) error {
	return errNoEngine("push batch")
}

func (g *guiBatches) Export(context.Context, int64, string, string, func(ui.BatchProgress)) error {
	return errNoEngine("export batch")
}

func (g *guiBatches) Enable(context.Context, int64, func(ui.BatchProgress)) error {
	return errNoEngine("enable batch")
}

func (g *guiBatches) UnitErrors(context.Context, int64) ([]ui.UnitError, error) { return nil, nil }

// ExportFormats are the formats of cloudsync's export (ARCHITECTURE.md).
func (g *guiBatches) ExportFormats() []ui.ExportFormat {
	return []ui.ExportFormat{
		{ID: "dps-json", Label: "DPS bulk enrollment (JSON)", Ext: ".json"},
		{ID: "csv", Label: "CSV", Ext: ".csv"},
		{ID: "manifest", Label: "Signed manifest", Ext: ".manifest.json"},
	}
}

// outboxStatus is the Outbox health tile: the units sealed or being pushed
// that have not left the station yet.
func outboxStatus(ctx context.Context, bs station.BatchStore) (string, error) {
	units, batches := 0, 0
	for _, st := range []station.BatchState{station.BatchSealed, station.BatchPushing} {
		list, err := bs.Batches(ctx, station.BatchFilter{State: st, Limit: 10000})
		if err != nil {
			return "", station.Errorf("outbox", station.KindOf(err), "the batches cannot be read (%v): check the Records store tile", err)
		}
		for _, b := range list {
			units += b.Units
			batches++
		}
	}
	if batches == 0 {
		return "empty", nil
	}
	return fmt.Sprintf("%d units in %d batches", units, batches), nil
}

// cloudStatus is the Cloud target tile: whether the production DPS the
// station points units at answers on TCP 443. Without one configured the
// tile says so and is normal.
func cloudStatus(ctx context.Context, prod *station.DeviceConfig, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (string, error) {
	if prod == nil || prod.GlobalEndpoint == "" {
		return "none configured", nil
	}
	addr := prod.GlobalEndpoint
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(strings.TrimSuffix(addr, "/"), "443")
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return "", station.Errorf("cloud target", station.KindUnavailable, "%s does not answer: check the network or the production endpoint in Settings", addr)
	}
	conn.Close()
	return "reachable", nil
}
