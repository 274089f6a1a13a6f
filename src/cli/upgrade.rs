//! The running process's side of a binary upgrade under a service manager, and its readiness.
//!
//! Pingora's graceful upgrade is two processes: a new one started with `--upgrade` waits on the
//! upgrade socket, then `SIGQUIT` makes the old one hand over its listening sockets and drain. Under
//! systemd the new process must be started *inside* the service (a process started from a shell is
//! not part of it) and must become the service's main process before the old one exits. So on
//! `SIGUSR2` the running process starts its successor itself (the binary at the path it was started
//! from, which a package upgrade has replaced, with the same configuration and environment), waits
//! until the successor has loaded its configuration and waits on the upgrade socket, then hands over
//! as on `SIGQUIT`. A successor that exits first (a bad configuration, a broken binary) abandons the
//! upgrade: this process keeps serving, and says so in its log.
//!
//! With `NOTIFY_SOCKET` set (systemd's `Type=notify`), each process sends `READY=1` with
//! `MAINPID=` its own pid once it serves; with `NotifyAccess=all` the successor's message makes it
//! the service's main process, so the old one's exit does not stop the service.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long a successor may take to load its configuration and wait on the upgrade socket.
const SUCCESSOR_START: Duration = Duration::from_secs(60);

/// Pingora's own signals, and `SIGUSR2`: start a successor, then hand over to it.
#[derive(Clone)]
pub(crate) struct UpgradeSignals {
    /// The binary to start: the path this process was started from.
    pub exe: OsString,
    pub config: PathBuf,
    pub upgrade_sock: PathBuf,
}

fn listen(kind: SignalKind) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            log::error!("cannot listen for signal {}: {e}", kind.as_raw_value());
            None
        }
    }
}

async fn next(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[async_trait]
impl ShutdownSignalWatch for UpgradeSignals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = listen(SignalKind::quit());
        let mut term = listen(SignalKind::terminate());
        let mut int = listen(SignalKind::interrupt());
        let mut usr2 = listen(SignalKind::user_defined2());
        loop {
            tokio::select! {
                _ = next(&mut quit) => return ShutdownSignal::GracefulUpgrade,
                _ = next(&mut term) => return ShutdownSignal::GracefulTerminate,
                _ = next(&mut int) => return ShutdownSignal::FastShutdown,
                _ = next(&mut usr2) => {
                    log::info!("SIGUSR2 received: starting the new binary to hand over to");
                    let started = self.clone();
                    match tokio::task::spawn_blocking(move || started.start_successor()).await {
                        Ok(Ok(pid)) => {
                            log::info!("process {pid} waits for the listening sockets: handing over");
                            return ShutdownSignal::GracefulUpgrade;
                        }
                        Ok(Err(e)) => {
                            log::error!("upgrade abandoned, this process keeps serving: {e}")
                        }
                        Err(e) => log::error!("upgrade abandoned, this process keeps serving: {e}"),
                    }
                }
            }
        }
    }
}

impl UpgradeSignals {
    /// Starts the successor and waits until it waits on the upgrade socket (it creates the socket
    /// anew after loading its configuration). Returns its pid.
    fn start_successor(&self) -> Result<u32, String> {
        let since = SystemTime::now();
        let mut child = Command::new(&self.exe)
            .arg("run")
            .arg("--upgrade")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.to_string_lossy()))?;
        let deadline = Instant::now() + SUCCESSOR_START;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the new process exited ({status}) before taking over"
                ));
            }
            let fresh = std::fs::metadata(&self.upgrade_sock)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since);
            if fresh {
                // It lives on after this process exits; nothing here waits for it.
                return Ok(child.id());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new process did not wait on {} within {} s",
                    self.upgrade_sock.display(),
                    SUCCESSOR_START.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Tells the service manager (when `NOTIFY_SOCKET` is set) that this process serves and is the
/// service's main process, once Pingora runs its services and `probe` (a listener) accepts.
pub(crate) fn notify_when_serving(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    probe: Option<std::net::SocketAddr>,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("service notify".into())
        .spawn(move || {
            loop {
                match phases.blocking_recv() {
                    Ok(ExecutionPhase::Running) => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
            if let Some(addr) = probe {
                let deadline = Instant::now() + Duration::from_secs(30);
                while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .is_err()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let pid = std::process::id();
            if let Err(e) = sd_notify::notify(&[
                sd_notify::NotifyState::MainPid(pid),
                sd_notify::NotifyState::Ready,
            ]) {
                log::warn!("could not tell the service manager this process is ready: {e}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("could not start the service notification thread: {e}");
    }
}
