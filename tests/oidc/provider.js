// A real OpenID provider (npm `oidc-provider`) for fhir-edge's integration tests (tests/idp.rs).
// Test-only: plain http on 127.0.0.1, in-memory storage, committed private keys.
//
//   node tests/oidc/provider.js [--port N] [--keys oidc-k1,oidc-k2] [--signing-kid oidc-k1]
//
// Environment instead of flags: OIDC_PORT, OIDC_KEYS, OIDC_SIGNING_KID. Port 0 takes a free port.
// The first line on stdout is `PORT <bound port>` (everything else the provider says goes to stderr).
//
// Keys: each name in --keys is a PEM file in ./keys (kid = the name), all published in the JWKS
// (`/jwks`, announced by `/.well-known/openid-configuration`), RS256, `use: sig`. To rotate to a key
// the relying party has not seen yet, stop the process and start it on the same port with a key list
// that includes the new one.
//
// Clients: `fhir-edge-tests-client` / `fhir-edge-tests-secret`, client_secret_basic,
// client_credentials only. Access tokens are JWTs (RS256, typ at+jwt) with aud `fhir-edge-tests`, the
// granted scopes, and a `tid` claim: the first tenant GUID among them (or the one set through
// /test/tid).
//
// Test-only routes (not part of the provider):
//   POST /test/signing-kid?kid=K   sign the next access tokens with key K (one of --keys)
//   POST /test/tid?tid=G           put `tid: G` in the next tokens (empty: the first GUID scope again)
//   GET  /test/state               {signing_kid, keys, tid, requests: {discovery, jwks, token}}

import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { createPrivateKey } from 'node:crypto';
import { fileURLToPath } from 'node:url';

import Provider from 'oidc-provider';

// Only the `PORT` line goes to stdout: the provider's own notices use console.info.
console.info = (...args) => console.error(...args);

const HERE = path.dirname(fileURLToPath(import.meta.url));

function option(flag, envName, fallback) {
  const i = process.argv.indexOf(flag);
  if (i !== -1 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (process.env[envName] !== undefined && process.env[envName] !== '') return process.env[envName];
  return fallback;
}

const port = Number(option('--port', 'OIDC_PORT', '0'));
const keyNames = option('--keys', 'OIDC_KEYS', 'oidc-k1,oidc-k2').split(',').map((s) => s.trim()).filter(Boolean);
let signingKid = option('--signing-kid', 'OIDC_SIGNING_KID', keyNames[0]);

const AUDIENCE = 'fhir-edge-tests';
const CLIENT_ID = 'fhir-edge-tests-client';
const CLIENT_SECRET = 'fhir-edge-tests-secret';
// The tenants of tests/support/mod.rs (TENANT_A, _B, _C, _UNKNOWN), as scopes a client may ask for.
const TENANTS = [
  '145f4184-1b0b-41c7-ba24-b3c1291bfda1',
  '3c2f9d6e-8a41-4b7e-9f0d-2a6c5e1b7d34',
  '0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d',
  '99999999-9999-4999-8999-999999999999',
];
const SCOPES = ['system/*.read', 'system/*.rs', ...TENANTS];
const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const keys = keyNames.map((name) => {
  const pem = fs.readFileSync(path.join(HERE, 'keys', `${name}.pem`));
  return { ...createPrivateKey(pem).export({ format: 'jwk' }), kid: name, alg: 'RS256', use: 'sig' };
});
if (!keyNames.includes(signingKid)) {
  console.error(`--signing-kid ${signingKid} is not one of --keys ${keyNames.join(',')}`);
  process.exit(2);
}

let tidOverride = null;
const requests = { discovery: 0, jwks: 0, token: 0 };

const server = http.createServer();
server.on('error', (err) => {
  console.error(`provider.js: ${err.message}`);
  process.exit(1);
});

server.listen(port, '127.0.0.1', () => {
  const bound = server.address().port;
  const issuer = `http://127.0.0.1:${bound}`;

  const provider = new Provider(issuer, {
    clients: [{
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
      scope: SCOPES.join(' '),
    }],
    // Every scope a client may ask for must be here too, or registration fails (invalid_client_metadata).
    scopes: SCOPES,
    jwks: { keys },
    cookies: { keys: ['fhir-edge-tests-cookie-key'] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => `urn:${AUDIENCE}`,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: SCOPES.join(' '),
          audience: AUDIENCE,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          // Read per token request, so /test/signing-kid takes effect on the next token.
          jwt: { sign: { alg: 'RS256', kid: signingKid } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => {
      const tid = tidOverride ?? (token.scope || '').split(' ').find((s) => GUID.test(s));
      return tid ? { tid } : undefined;
    },
  });
  provider.on('server_error', (ctx, err) => console.error(`server_error: ${err.stack || err}`));

  const callback = provider.callback();
  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname.startsWith('/test/')) {
      testRoute(req, res, url);
      return;
    }
    if (url.pathname === '/.well-known/openid-configuration') requests.discovery += 1;
    if (url.pathname === '/jwks') requests.jwks += 1;
    if (url.pathname === '/token') requests.token += 1;
    callback(req, res);
  });

  process.stdout.write(`PORT ${bound}\n`);
  console.error(`oidc test provider: issuer ${issuer}, keys ${keyNames.join(',')}, signing with ${signingKid}`);
});

function testRoute(req, res, url) {
  const reply = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname === '/test/state' && req.method === 'GET') {
    reply(200, { signing_kid: signingKid, keys: keyNames, tid: tidOverride, requests });
  } else if (url.pathname === '/test/signing-kid' && req.method === 'POST') {
    const kid = url.searchParams.get('kid');
    if (!keyNames.includes(kid)) {
      reply(400, { error: `unknown kid ${kid}; keys: ${keyNames.join(',')}` });
      return;
    }
    signingKid = kid;
    reply(200, { signing_kid: signingKid });
  } else if (url.pathname === '/test/tid' && req.method === 'POST') {
    tidOverride = url.searchParams.get('tid') || null;
    reply(200, { tid: tidOverride });
  } else {
    reply(404, { error: 'no such test route' });
  }
}

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => process.exit(0));
}
