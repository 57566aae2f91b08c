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
