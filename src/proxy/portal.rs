//! The registration portal's glue: which connections and paths it serves, reading the form body,
//! and writing the portal's reply (see [`crate::portal`], which knows nothing of Pingora).

use std::sync::Arc;

use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::{FhirEdge, RequestCtx};
use crate::portal::{self, Portal, Reply};

/// What a request is to the portal.
pub(super) enum PortalTarget {
    /// Not the portal's: the proxy goes on.
    No,
    /// The portal's, with the path below its prefix.
    Serve(String),
    /// On a portal-only listener, outside the portal: not found.
    Outside,
}

impl FhirEdge {
    /// Whether `session` is for the portal.
    pub(super) fn portal_target(
        &self,
        portal: &Portal,
        session: &Session,
        path: &[u8],
    ) -> PortalTarget {
        let own = &portal.cfg.listen;
        let on_own = !own.is_empty()
            && session
                .as_downstream()
                .server_addr()
                .and_then(|a| a.as_inet())
                .is_some_and(|a| {
                    own.iter().any(|l| {
                        l.port() == a.port() && (l.ip().is_unspecified() || l.ip() == a.ip())
                    })
                });
        match portal.below(path) {
            Some(rest) if on_own || own.is_empty() => {
                PortalTarget::Serve(String::from_utf8_lossy(rest).into_owned())
            }
            None if on_own => PortalTarget::Outside,
            _ => PortalTarget::No,
        }
    }

    /// Serves one portal request.
    pub(super) async fn serve_portal(
        &self,
        portal: Arc<Portal>,
        below: Option<String>,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let req = session.req_header();
        let method = req.method.clone();
        let query = crate::fhir::classify::split_target(req.raw_path())
            .1
            .map(|q| String::from_utf8_lossy(q).into_owned());
        let headers = req.headers.clone();
        let source = ctx.client_ip;
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let reply = match below {
            None => portal.not_found(),
            Some(path) => {
                let body = if method == http::Method::POST {
                    super::own::read_body(session, portal::MAX_FORM_BYTES).await?
                } else {
                    Some(Vec::new())
                };
                match body {
                    None => portal.too_large(),
                    Some(body) => {
                        portal
                            .handle(portal::Request {
                                method: method.clone(),
                                path,
                                query,
                                headers,
                                body,
                                source,
                                tls,
                            })
                            .await
                    }
                }
            }
        };
        if let Some(action) = reply.action {
            self.metrics
                .portal_actions
                .with_label_values(&[action])
                .inc();
        }
        ctx.template = Some(reply.template);
        ctx.portal_action = reply.action;
        ctx.portal_account = reply.account.clone();
        ctx.client_id = reply.client_id.clone();
        self.write_portal_reply(session, ctx, reply, method == http::Method::HEAD)
            .await?;
        Ok(true)
    }

    async fn write_portal_reply(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        reply: Reply,
        head: bool,
    ) -> Result<()> {
        let mut h = ResponseHeader::build(reply.status, Some(reply.headers.len() + 2))?;
        for (name, value) in reply.headers {
            h.append_header(name, value)?;
        }
        h.insert_header("content-length", reply.body.len().to_string())?;
        h.insert_header("x-request-id", ctx.request_id.as_str())?;
        session.write_response_header(Box::new(h), head).await?;
        if !head {
            session.write_response_body(Some(reply.body), true).await?;
        }
        Ok(())
    }
}
