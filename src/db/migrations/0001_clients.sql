-- The client registry: clients and their secrets (salted SHA-256 digests, never the values).
-- Every change to either table notifies channel `fhir_edge_clients` with the client id, so each
-- replica re-reads that client into its in-memory snapshot.

CREATE TABLE fhir_edge_clients (
    client_id text PRIMARY KEY CHECK (client_id ~ '^[A-Za-z0-9._-]{1,128}$'),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    -- Tenant GUIDs, or the single entry '*' for every tenant.
    allowed_tenants text[] NOT NULL CHECK (cardinality(allowed_tenants) >= 1),
    disabled boolean NOT NULL DEFAULT false,
    -- Bumped by every change to the client or its secrets.
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Client ids are unique without regard to case, as in clients.yaml.
CREATE UNIQUE INDEX fhir_edge_clients_id_lower ON fhir_edge_clients (lower(client_id));

CREATE TABLE fhir_edge_client_secrets (
    client_id text NOT NULL REFERENCES fhir_edge_clients (client_id) ON DELETE CASCADE,
    secret_id text NOT NULL CHECK (secret_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    -- sha256:<salt, base64url>:<digest, base64url>
    hash text NOT NULL CHECK (hash LIKE 'sha256:%:%'),
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (client_id, secret_id)
);

CREATE FUNCTION fhir_edge_clients_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('fhir_edge_clients', OLD.client_id);
    ELSE
        PERFORM pg_notify('fhir_edge_clients', NEW.client_id);
        IF TG_OP = 'UPDATE' AND OLD.client_id <> NEW.client_id THEN
            PERFORM pg_notify('fhir_edge_clients', OLD.client_id);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER fhir_edge_clients_changed
    AFTER INSERT OR UPDATE OR DELETE ON fhir_edge_clients
    FOR EACH ROW EXECUTE FUNCTION fhir_edge_clients_notify();

CREATE TRIGGER fhir_edge_client_secrets_changed
    AFTER INSERT OR UPDATE OR DELETE ON fhir_edge_client_secrets
    FOR EACH ROW EXECUTE FUNCTION fhir_edge_clients_notify();
