package main

import (
	"context"
	"io"
	"net"
	"net/url"
	"time"

	"github.com/kilnworks/kiln/cloudsync"
	"github.com/kilnworks/kiln/station"
)

// This file holds what kiln batch and the GUI's Batches screen share of
// the batch engine (cloudsync) beyond batchEnv and pusherFor in batch.go.

// The export formats, as kiln batch export --format names them.
const (
	exportBulk     = "bulk"
	exportCSV      = "csv"
	exportManifest = "manifest"
)

// writeBatchExport writes the units of batch b to w in format (exportBulk,
// exportCSV or exportManifest). group covers the batch's X.509 and
// symmetric-key units in the bulk format; step, when set, is called as
// units are written. The manifest is signed with the station's signing key.
// Kinds: Invalid (an unknown format; a unit that cannot be enrolled as
// recorded), those of the signing key.
func writeBatchExport(be *batchEnv, w io.Writer, b *station.Batch, units []*station.Unit, format string, group *cloudsync.Group, perUnit bool, step func(done int)) error {
	if step == nil {
		step = func(int) {}
	}
	switch format {
	case exportBulk:
		f, err := cloudsync.BulkExport(b, units, group, perUnit)
		if err != nil {
			return err
		}
		if err := cloudsync.WriteBulkJSON(w, f); err != nil {
			return err
		}
		step(len(units))
		return nil
	case exportCSV:
		return cloudsync.WriteCSV(w, b, units, step)
	case exportManifest:
		s, err := be.signer()
		if err != nil {
			return err
		}
		m, err := cloudsync.SignManifest(b, units, s, time.Now(), step)
		if err != nil {
			return err
		}
		return cloudsync.WriteManifest(w, m)
	}
	return station.Errorf("export batch", station.KindInvalid, "export format %q is unknown: use bulk, csv or manifest", format)
}

// defaultTarget is the target a batch without one goes to: the target
// chosen in the configuration (batch_target), or the only target when
// there is exactly one; "" when neither.
func defaultTarget(ctx context.Context, be *batchEnv, chosen string) (string, error) {
	if chosen != "" {
		return chosen, nil
	}
	ts, err := be.store.Targets(ctx)
	if err != nil {
		return "", err
	}
	if len(ts) == 1 {
		return ts[0].Name, nil
	}
	return "", nil
}

// targetAddr is the host:port a target's service API listens on: its
// BaseURL's, or its HostName's (port 443 unless the name carries one).
func targetAddr(t *station.Target) string {
	host := t.HostName
	if t.BaseURL != "" {
		if u, err := url.Parse(t.BaseURL); err == nil && u.Host != "" {
			host = u.Host
		}
	}
	if _, _, err := net.SplitHostPort(host); err != nil {
		host = net.JoinHostPort(host, "443")
	}
	return host
}
