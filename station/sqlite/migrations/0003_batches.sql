-- 0003: batches of recorded units, and which units are in them.
--
-- A batch's target is named by target_id only; the target's connection
-- string is a secret and is not kept in this table. The enrollment template
-- is station.EnrollmentTemplate as JSON.

CREATE TABLE batches (
	id        INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: batch ids are quoted to customers
	name      TEXT    NOT NULL CHECK (name <> ''),
	state     TEXT    NOT NULL CHECK (state IN ('open', 'sealed', 'pushing', 'pushed', 'exported')),
	target_id TEXT    NOT NULL DEFAULT '',
	template  TEXT    NOT NULL DEFAULT '{}',
	created   TEXT    NOT NULL,
	sealed    TEXT,   -- when first sealed
	pushed    TEXT    -- when pushed or exported
);

-- At most one batch is open: passing units join it.
CREATE UNIQUE INDEX batches_one_open ON batches (state) WHERE state = 'open';
CREATE INDEX batches_state_created ON batches (state, created);

-- A unit is in one batch at most. The rowid orders units as they joined.
CREATE TABLE batch_units (
	batch_id INTEGER NOT NULL REFERENCES batches (id),
	serial   TEXT    NOT NULL UNIQUE REFERENCES units (serial),
	added    TEXT    NOT NULL
);

CREATE INDEX batch_units_batch_id ON batch_units (batch_id);
