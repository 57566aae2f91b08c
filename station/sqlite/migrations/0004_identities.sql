-- 0004: the identities of the X.509 and symmetric-key methods. A unit of
-- the X.509 method keeps the leaf the station CA issued, its serial and
-- SHA-256 thumbprint (unique: one certificate, one unit) and where the DUT
-- keeps its key; a unit of the symmetric-key method keeps its enrollment
-- group and its device key's SHA-256 (never the key: it is derived from
-- the group key).
ALTER TABLE units ADD COLUMN certificate BLOB;
ALTER TABLE units ADD COLUMN cert_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE units ADD COLUMN cert_thumbprint TEXT CHECK (cert_thumbprint <> '');
ALTER TABLE units ADD COLUMN key_storage TEXT NOT NULL DEFAULT '';
ALTER TABLE units ADD COLUMN enrollment_group TEXT NOT NULL DEFAULT '';
ALTER TABLE units ADD COLUMN symkey_sha256 TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX units_cert_thumbprint ON units (cert_thumbprint) WHERE cert_thumbprint IS NOT NULL;
