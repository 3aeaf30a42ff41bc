//! Telling a service manager what lclb is doing, by `sd_notify` datagrams to `NOTIFY_SOCKET`
//! (unset: every call here does nothing): `READY=1` once it listens, `RELOADING=1` then
//! `READY=1` around each reload, `STOPPING=1` when it starts draining, and `MAINPID=` when an
//! upgrade hands the service to a new process. A failed notification is logged at debug level
//! and otherwise ignored: the service manager's view is an aid, not something serving waits on.

use sd_notify::NotifyState;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("sd_notify to NOTIFY_SOCKET failed: {e}");
    }
}

/// Start-up is done: the listeners are open and connections are about to be accepted.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts; [`reloaded`] follows. `MONOTONIC_USEC` is what systemd's `notify-reload`
/// services must send with it; older systemd ignores it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// A reload ended, taken or refused (then `status` says so): serving goes on either way.
pub fn reloaded(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The drain starts: no new connections; the process exits once those in flight are done.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The service's main process is now `pid` (an upgrade's new lclb); this one is leaving.
pub fn main_pid(pid: u32) {
    notify(&[
        NotifyState::MainPid(pid),
        NotifyState::Status("upgraded: handed over to a new process"),
    ]);
}
