-- 0004: CA certificates registered with the service and verified by proof
-- of possession (§6): X.509 enrollment groups name them in
-- attestation.x509.caReferences.
--
-- "id" is the lower-cased name (names compare ignoring case), "name" its
-- spelling at upload. "der" is the certificate (public: not sealed).
-- "verification_code" is the last code generated ('' for none): the
-- subject CN the proof-of-possession certificate must carry.

CREATE TABLE certificates (
	id                TEXT PRIMARY KEY,
	name              TEXT    NOT NULL,
	der               BLOB    NOT NULL,
	verified          INTEGER NOT NULL DEFAULT 0,
	verification_code TEXT    NOT NULL DEFAULT '',
	etag              TEXT    NOT NULL,
	created           TEXT    NOT NULL,
	updated           TEXT    NOT NULL
);

-- Reprovisioning (§10) and the device data DPS keeps with a registration:
-- the initial twin's tags (desired properties are in "twin"), the IoT Edge
-- capability, the payload returned to the device, "data_etag", which
-- changes whenever the device data is (re)set from the enrollment (the hub
-- drops the reported properties it holds for an older one), and
-- "previous_hub", the hub the device data was migrated from ('' for none).
-- An operation keeps the custom payload the device sent with its register.

ALTER TABLE registrations ADD COLUMN tags         TEXT;
ALTER TABLE registrations ADD COLUMN iot_edge     INTEGER NOT NULL DEFAULT 0;
ALTER TABLE registrations ADD COLUMN payload      TEXT;
ALTER TABLE registrations ADD COLUMN data_etag    TEXT    NOT NULL DEFAULT '';
ALTER TABLE registrations ADD COLUMN previous_hub TEXT    NOT NULL DEFAULT '';

ALTER TABLE operations ADD COLUMN payload TEXT;
