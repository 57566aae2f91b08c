package devserver

import (
	"context"
	"database/sql"
	"sync"

	"github.com/kilnworks/kiln/station"
)

// rowCount is the number of rows of a table that a count limit of Quotas
// is checked against, kept so that a create does not count a million rows.
// It is an upper bound: creates through the store add to it before they
// commit, while deletes (which may cascade to rows the store does not see)
// leave it alone; a create that finds it at the limit counts the table
// again. A write that does not commit forgets it, and so does a write
// outside the store's own methods (forget).
type rowCount struct {
	mu    sync.Mutex
	n     int
	known bool
}

// reserve makes room for one new row of table in tx under limit (zero: no
// limit) and counts it. The caller must call settle with whether the
// transaction committed. Kinds: Conflict (errQuota), Unavailable, Internal.
func (c *rowCount) reserve(ctx context.Context, tx *sql.Tx, op, table, what string, limit int) error {
	if limit <= 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.known || c.n >= limit {
		var n int
		// table is one of our constants.
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM `+table).Scan(&n); err != nil {
			return dbError(op, err)
		}
		c.n, c.known = n, true
	}
	if c.n >= limit {
		return station.Errorf(op, station.KindConflict,
			"%w: the service holds %d %s already, its limit: delete some first, or raise the limit", errQuota, c.n, what)
	}
	c.n++
	return nil
}

// settle forgets the count when the transaction of a reserve did not
// commit (*committed false).
func (c *rowCount) settle(committed *bool) {
	if !*committed {
		c.forget()
	}
}

// forget makes the next reserve count the table again.
func (c *rowCount) forget() {
	c.mu.Lock()
	c.known = false
	c.mu.Unlock()
}
