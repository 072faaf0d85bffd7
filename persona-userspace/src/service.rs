//! Running under systemd (`Type=notify`): readiness once the API serves, a watchdog
//! kept only while the datapath answers, and the state in `systemctl status`. Outside
//! systemd (no NOTIFY_SOCKET) all of it does nothing.
use std::sync::Arc;

use sd_notify::NotifyState;
use tracing::warn;

use crate::orchestrator::Orchestrator;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "telling systemd");
    }
}

pub fn ready(devices: usize) {
    let status = format!("serving; {devices} devices");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its interval while the datapath thread answers: a
/// daemon whose datapath hangs is restarted by systemd, and the programs keep the
/// traffic flowing meanwhile.
pub async fn watchdog(orchestrator: Arc<Orchestrator>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        let answered = tokio::time::timeout(
            interval / 2,
            orchestrator.datapath().call(|dp| dp.attached()),
        )
        .await;
        match answered {
            Ok(Ok(_)) => notify(&[NotifyState::Watchdog]),
            Ok(Err(e)) => warn!(error = %e, "the datapath failed: the watchdog is not kept"),
            Err(_) => warn!("the datapath does not answer: the watchdog is not kept"),
        }
    }
}
