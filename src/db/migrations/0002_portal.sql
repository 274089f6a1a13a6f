-- The registration portal: owners' accounts, their one-time invites, server-side sessions and
-- activity, and when each client secret was last used. Times are Unix seconds. Nothing here
-- notifies the replicas: sessions and accounts are read from the database on every portal request.

ALTER TABLE fhir_edge_client_secrets
    ADD COLUMN description text CHECK (length(description) <= 100);

CREATE TABLE fhir_edge_portal_accounts (
    account_id text PRIMARY KEY,
    email text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    -- Tenant GUIDs the owner manages clients for.
    tenants text[] NOT NULL CHECK (cardinality(tenants) >= 1),
    -- argon2id PHC string; NULL until the invite is accepted (or after a reset).
    password_hash text,
    -- RFC 6238 shared secret (base32) once TOTP is enabled.
    totp_secret text,
    -- The last time step accepted, so a code is never accepted twice.
    totp_last_step bigint NOT NULL DEFAULT 0,
    -- SHA-256 (hex) of each unused recovery code.
    recovery_codes text[] NOT NULL DEFAULT '{}',
    disabled boolean NOT NULL DEFAULT false,
    created bigint NOT NULL
);

CREATE UNIQUE INDEX fhir_edge_portal_accounts_email ON fhir_edge_portal_accounts (lower(email));

CREATE TABLE fhir_edge_portal_invites (
    -- SHA-256 (hex) of the link's token: the token itself is never stored.
    token_hash text PRIMARY KEY,
    account_id text NOT NULL REFERENCES fhir_edge_portal_accounts ON DELETE CASCADE,
    expires bigint NOT NULL
);

CREATE TABLE fhir_edge_portal_sessions (
    -- SHA-256 (hex) of the cookie's value.
    id_hash text PRIMARY KEY,
    account_id text NOT NULL REFERENCES fhir_edge_portal_accounts ON DELETE CASCADE,
    csrf text NOT NULL,
    created bigint NOT NULL,
    last_seen bigint NOT NULL
);

CREATE INDEX fhir_edge_portal_sessions_account ON fhir_edge_portal_sessions (account_id);

CREATE TABLE fhir_edge_portal_activity (
    id bigserial PRIMARY KEY,
    account_id text NOT NULL REFERENCES fhir_edge_portal_accounts ON DELETE CASCADE,
    at bigint NOT NULL,
    source text,
    action text NOT NULL,
    client_id text,
    secret_id text
);

CREATE INDEX fhir_edge_portal_activity_account ON fhir_edge_portal_activity (account_id, id DESC);

-- Failed sign-ins per e-mail address given (SHA-256 of it, lower case; whether or not an account has
-- it), in a window starting at the first failure: one count for the whole fleet, cleared by a
-- successful sign-in.
CREATE TABLE fhir_edge_portal_login_failures (
    key_hash text PRIMARY KEY,
    failures integer NOT NULL,
    since bigint NOT NULL
);

-- Outside the secrets table, so recording a use does not notify every replica.
CREATE TABLE fhir_edge_secret_usage (
    client_id text NOT NULL,
    secret_id text NOT NULL,
    last_used bigint NOT NULL,
    PRIMARY KEY (client_id, secret_id)
);
