-- The license server: signing keys and the licenses issued with them.
-- A key is published in the JWKS from its creation until it is retired, and signs new
-- licenses from activates_ms (publish first, sign later: filters fetch it in between).
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    alg          TEXT NOT NULL,
    private_pem  TEXT NOT NULL,
    public_jwk   TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    activates_ms BIGINT NOT NULL,
    retired_ms   BIGINT
);

-- What each issued license says (the token itself is not kept: it is a credential).
CREATE TABLE issued_licenses (
    license       TEXT PRIMARY KEY,
    account       TEXT NOT NULL,
    plan          TEXT NOT NULL,
    features      TEXT NOT NULL,
    limits        TEXT,
    not_before_ms BIGINT NOT NULL,
    expires_ms    BIGINT NOT NULL,
    kid           TEXT NOT NULL,
    issued_ms     BIGINT NOT NULL
);

CREATE INDEX issued_licenses_by_account ON issued_licenses (account);
