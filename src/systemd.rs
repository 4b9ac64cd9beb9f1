//! systemd's service notifications (`Type=notify`, `WatchdogSec=`), through the `sd-notify`
//! crate. Outside systemd (no `NOTIFY_SOCKET`) every call here does nothing.
//!
//! `READY=1` is sent once the port is open and the app is built, so units ordered after
//! cellar start when it answers, not when its process exists. The watchdog ping is a task on
//! the server's runtime: if the runtime stops making progress (every worker blocked), the
//! pings stop and systemd restarts the service.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the service is up; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Replaces the line `systemctl status` shows: how the last reload went, which `systemctl
/// reload` itself cannot say (it only sends the signal).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd the service is shutting down (in-flight requests are finishing).
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its period if the unit has `WatchdogSec=`, for as long as the
/// runtime runs.
pub fn spawn_watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

fn send(state: &[NotifyState]) {
    // A notification that cannot be sent is worth a line, not a failed server: under systemd
    // the unit's start timeout then says what went wrong.
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(cause = %e, "cannot notify systemd");
    }
}
