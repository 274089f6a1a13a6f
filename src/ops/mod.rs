//! What operators see: Prometheus [`metrics`], the PHI-free [`audit`] log, the [`admin`] listener
//! (`/metrics`, `/healthz`, `/readyz`) and the process [`logging`] with Pingora's records fenced off.

pub(crate) mod admin;
pub(crate) mod audit;
pub(crate) mod logging;
pub(crate) mod metrics;
