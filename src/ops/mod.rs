//! What operators see: Prometheus [`metrics`], the PHI-free [`audit`] log, the [`admin`] listener
//! (`/metrics`, `/healthz`, `/readyz`) and the process [`logging`] with Pingora's records fenced off.

pub mod admin;
pub mod audit;
pub mod logging;
pub mod metrics;
