-- 0005: DPS targets of batch pushes, and the durable outbox of pushes.
--
-- A target's connection string holds a key: it is stored sealed
-- (AES-256-GCM under a key file kept outside the database), never in the
-- clear.

CREATE TABLE targets (
	name              TEXT    PRIMARY KEY CHECK (name <> ''),
	host_name         TEXT    NOT NULL DEFAULT '',
	sealed_connection BLOB    NOT NULL,
	trust_pem         BLOB,
	base_url          TEXT    NOT NULL DEFAULT '',
	ops_per_minute    INTEGER NOT NULL DEFAULT 0,
	created           TEXT    NOT NULL
);

-- One row per item of a push: an enrollment (key = registration ID) or a
-- batch's enrollment group (key = 'group:' || id), for each operation.
CREATE TABLE push_items (
	batch_id   INTEGER NOT NULL REFERENCES batches (id),
	op         TEXT    NOT NULL CHECK (op IN ('enroll', 'enable')),
	key        TEXT    NOT NULL CHECK (key <> ''),
	serial     TEXT    NOT NULL DEFAULT '',
	state      TEXT    NOT NULL CHECK (state IN ('pending', 'sent', 'done', 'failed')),
	mode       TEXT    NOT NULL DEFAULT '',
	etag       TEXT    NOT NULL DEFAULT '',
	error_code INTEGER NOT NULL DEFAULT 0,
	error      TEXT    NOT NULL DEFAULT '',
	attempts   INTEGER NOT NULL DEFAULT 0,
	updated    TEXT    NOT NULL,
	PRIMARY KEY (batch_id, op, key)
);

CREATE INDEX push_items_state ON push_items (batch_id, op, state);
