//! fhir-edge's own endpoints, dispatched from `request_filter`: the public CapabilityStatement
//! (`{base}/metadata`), the token endpoint, the JWKS, the SMART configuration, the authorization
//! endpoint (which always refuses) and client self-service. Each always answers itself.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;

use super::{FhirEdge, RequestCtx};
use crate::fhir::classify::{self, OwnEndpoint};
use crate::fhir::discovery;
use crate::outcome::{OAuthError, Outcome};
use crate::token::endpoint::{Issued, RequestView, TokenService, MAX_FORM_BYTES};
use crate::token::manage;

/// A successful answer: status and JSON body.
type Answer = std::result::Result<(u16, Bytes), OAuthError>;

/// An own endpoint detached from the request path it was found in (serving needs the session
/// mutably), with the management resource parsed out of that path.
pub(super) type Detached = (OwnEndpoint<'static>, Option<manage::Resource>);

/// Detaches `e` from the request path.
pub(super) fn detach(e: OwnEndpoint<'_>) -> Detached {
    match e {
        OwnEndpoint::Token => (OwnEndpoint::Token, None),
        OwnEndpoint::Jwks => (OwnEndpoint::Jwks, None),
        OwnEndpoint::SmartConfiguration => (OwnEndpoint::SmartConfiguration, None),
        OwnEndpoint::Authorize => (OwnEndpoint::Authorize, None),
        OwnEndpoint::Manage(rest) => (OwnEndpoint::Manage(b""), manage::parse(rest)),
    }
}

fn get_or_head(m: &http::Method) -> bool {
    m == http::Method::GET || m == http::Method::HEAD
}

impl FhirEdge {
    /// `GET|HEAD {base}/metadata`: the CapabilityStatement from [`discovery::Discovery`], without a
    /// token.
    pub(super) async fn serve_metadata(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        ctx.template = Some("/metadata");
        let req = session.req_header();
        let format = format_parameter(classify::split_target(req.raw_path()).1);
        let accept = req
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let Some(content_type) = discovery::negotiate(format.as_deref(), accept) else {
            return self.reject(session, ctx, Outcome::NotAcceptable).await;
        };
        let Ok(body) = self.discovery.metadata().await else {
            return self
                .reject(session, ctx, Outcome::UpstreamUnavailable)
                .await;
        };
        let mut h = ResponseHeader::build(200, Some(4))?;
        h.insert_header("content-type", content_type)?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header("x-request-id", ctx.request_id.as_str())?;
        let head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(h), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }

    /// Serves the token endpoint, the JWKS, the SMART configuration, the authorization endpoint and
    /// client self-service.
    pub(super) async fn serve_own(
        &self,
        svc: Arc<TokenService>,
        (which, resource): Detached,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let source = ctx.client_ip;
        let method = &session.req_header().method;
        let result = match which {
            OwnEndpoint::SmartConfiguration => {
                ctx.template = Some(classify::SMART_CONFIGURATION_PATH);
                match self.discovery.smart_configuration() {
                    Some(doc) if get_or_head(method) => Ok((200, doc)),
                    Some(_) => Err(OAuthError::MethodNotAllowed { allow: "GET, HEAD" }),
                    None => Err(OAuthError::NotFound),
                }
            }
            OwnEndpoint::Authorize => {
                // Client credentials never uses the authorization endpoint; answer directly, never by
                // redirecting to an unvalidated redirect_uri.
                ctx.template = Some(classify::AUTHORIZE_PATH);
                Err(OAuthError::UnsupportedResponseType)
            }
            OwnEndpoint::Jwks => {
                ctx.template = Some(classify::JWKS_PATH);
                if get_or_head(method) {
                    Ok((200, svc.settings.keys.jwks.clone()))
                } else {
                    Err(OAuthError::MethodNotAllowed { allow: "GET, HEAD" })
                }
            }
            OwnEndpoint::Token => {
                ctx.template = Some("/token");
                self.token(&svc, session, ctx, source).await?
            }
            OwnEndpoint::Manage(_) => manage(svc, resource, session, ctx, source).await,
        };
        match result {
            Ok((status, body)) => {
                crate::outcome::respond_json(session, status, body, &ctx.request_id, &[]).await?;
                Ok(true)
            }
            Err(e) => {
                self.metrics
                    .token_failures
                    .with_label_values(&[e.label()])
                    .inc();
                self.reject(session, ctx, Outcome::OAuth(e)).await
            }
        }
    }

    /// Reads and answers a token request; counts the tokens issued.
    async fn token(
        &self,
        svc: &TokenService,
        session: &mut Session,
        ctx: &mut RequestCtx,
        source: Option<IpAddr>,
    ) -> Result<Answer> {
        fn view(req: &RequestHeader, source: Option<IpAddr>) -> RequestView<'_> {
            RequestView {
                method: &req.method,
                query: classify::split_target(req.raw_path()).1,
                headers: &req.headers,
                source,
            }
        }
        if let Err(e) = svc.precheck(&view(session.req_header(), source)) {
            return Ok(Err(e));
        }
        let Some(body) = read_body(session, MAX_FORM_BYTES).await? else {
            return Ok(Err(OAuthError::BodyTooLarge));
        };
        let now = crate::time::now_unix();
        let issued: Issued = match svc.token(&view(session.req_header(), source), &body, now) {
            Ok(issued) => issued,
            Err(e) => return Ok(Err(e)),
        };
        // Only clients in the registry get tokens, so the label set is bounded.
        self.metrics
            .tokens_issued
            .with_label_values(&[&issued.client_id])
            .inc();
        ctx.client_id = Some(issued.client_id);
        ctx.tenant = Some(issued.tenant);
        Ok(Ok((200, issued.body)))
    }
}

/// Client self-service below the management path.
async fn manage(
    svc: Arc<TokenService>,
    resource: Option<manage::Resource>,
    session: &Session,
    ctx: &mut RequestCtx,
    source: Option<IpAddr>,
) -> Answer {
    let Some(resource) = resource else {
        ctx.template = Some("/register/{other}");
        return Err(OAuthError::NotFound);
    };
    ctx.template = Some(match resource {
        manage::Resource::Client(_) => "/register/{client_id}",
        manage::Resource::Secrets(_) => "/register/{client_id}/secrets",
        manage::Resource::Secret(..) => "/register/{client_id}/secrets/{secret_id}",
    });
    let req = session.req_header();
    let (method, headers) = (req.method.clone(), req.headers.clone());
    let now = crate::time::now_unix();
    svc.manage(&method, &resource, &headers, source, now)
        .await
        .map(|reply| (reply.status, reply.body))
}

/// The decoded value of the first `_format` query parameter (FHIR R4 §3.1.0.1.7).
fn format_parameter(query: Option<&[u8]>) -> Option<String> {
    query?.split(|&b| b == b'&').find_map(|pair| {
        let mut it = pair.splitn(2, |&b| b == b'=');
        let name = crate::fhir::pct::decode(it.next().unwrap_or_default(), true);
        (name == b"_format").then(|| {
            let value = crate::fhir::pct::decode(it.next().unwrap_or_default(), true);
            String::from_utf8_lossy(&value).into_owned()
        })
    })
}

/// Reads the whole request body, or `None` when it is longer than `limit`.
pub(super) async fn read_body(session: &mut Session, limit: usize) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}
