-- 0001: runs, their steps, and provisioned units.
--
-- Times are UTC text in a fixed-width layout (2006-01-02T15:04:05.000000000Z),
-- so they sort and compare as text and stay readable in the sqlite3 shell.
-- A zero time is NULL. Durations are integer nanoseconds.

CREATE TABLE runs (
	id              INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: run ids are quoted on records
	serial          TEXT    NOT NULL DEFAULT '',
	port            TEXT    NOT NULL DEFAULT '',
	station         TEXT    NOT NULL DEFAULT '',
	operator        TEXT    NOT NULL DEFAULT '',
	method          TEXT    NOT NULL DEFAULT '',
	started         TEXT    NOT NULL,
	finished        TEXT,
	result          TEXT    NOT NULL DEFAULT 'running',
	error_kind      INTEGER NOT NULL DEFAULT 0, -- station.Kind
	error           TEXT    NOT NULL DEFAULT '',
	model           TEXT    NOT NULL DEFAULT '',
	firmware        TEXT    NOT NULL DEFAULT '',
	registration_id TEXT    NOT NULL DEFAULT '',
	ek_hash         TEXT    NOT NULL DEFAULT '',
	bytes_out       INTEGER NOT NULL DEFAULT 0,
	bytes_in        INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX runs_started         ON runs (started);
CREATE INDEX runs_serial          ON runs (serial, started);
CREATE INDEX runs_result          ON runs (result, started);
CREATE INDEX runs_ek_hash         ON runs (ek_hash);
CREATE INDEX runs_registration_id ON runs (registration_id);

CREATE TABLE steps (
	run_id      INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
	seq         INTEGER NOT NULL, -- 1, 2, ... in the order the steps were added
	name        TEXT    NOT NULL,
	status      TEXT    NOT NULL,
	started     TEXT,
	duration_ns INTEGER NOT NULL DEFAULT 0,
	detail      TEXT    NOT NULL DEFAULT '',
	error       TEXT    NOT NULL DEFAULT '',
	PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE units (
	id              INTEGER PRIMARY KEY AUTOINCREMENT,
	serial          TEXT    NOT NULL UNIQUE CHECK (serial <> ''),
	registration_id TEXT    NOT NULL DEFAULT '',
	method          TEXT    NOT NULL DEFAULT '',
	model           TEXT    NOT NULL DEFAULT '',
	firmware        TEXT    NOT NULL DEFAULT '',
	ek_hash         TEXT    UNIQUE CHECK (ek_hash <> ''), -- NULL for units without a TPM identity
	ek_public       BLOB,   -- TPM2B_PUBLIC
	ek_key          BLOB,   -- PKIX DER
	srk_public      BLOB,   -- TPM2B_PUBLIC
	ek_cert         BLOB,   -- DER
	run_id          INTEGER REFERENCES runs (id),
	station         TEXT    NOT NULL DEFAULT '',
	operator        TEXT    NOT NULL DEFAULT '',
	created         TEXT    NOT NULL
);

CREATE INDEX units_registration_id ON units (registration_id);
CREATE INDEX units_run_id          ON units (run_id);
