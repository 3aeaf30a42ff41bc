//! Upgrading a running lclb to a new binary (or config) without a refused or reset connection.
//!
//! Closing a listening socket resets the connections still in its accept queue, and a second
//! process bound beside it with SO_REUSEPORT does not get them (`net.ipv4.tcp_migrate_req` is
//! off by default). So the new process must accept on the very same socket. The running lclb
//! starts it: it spawns the new binary with its listening sockets as fds 3 and 4, by the
//! `LISTEN_FDS` protocol systemd's socket activation uses (so the new process takes them
//! through [`crate::sockets::inherited`], as it would from systemd). The child's pid is not
//! known before it runs, so `LISTEN_PID` stays unset and `LCLB_UPGRADE_FROM` names the parent
//! instead. Spawning (rather than passing the sockets over a unix socket with SCM_RIGHTS to a
//! process started elsewhere) keeps the new process where the old one was: its stdout and
//! stderr, its cgroup under systemd (which then takes it as the main process by `MAINPID=`),
//! its user and limits.
//!
//! Who asks: `lclb upgrade --pid PID` (what `scripts/upgrade.sh` runs) connects to the control
//! socket of process PID, the abstract unix socket `lclb-upgrade-PID`, which only a process of
//! the same user or root may use (SO_PEERCRED), and names the binary and the config. The old
//! process spawns the binary and waits for it to say it is ready (it connects to the same
//! control socket and sends `ready` once its listeners and signal handlers are in place, just
//! before it accepts). Then the old one answers `ready PID` to the asker, stops accepting
//! (without a wake-up connection, which the new process could take) and drains as on SIGTERM,
//! then exits 0. If the child exits or is not ready within the asker's deadline, it is killed,
//! the asker gets `failed REASON`, and the old process goes on serving as if nothing happened.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use parking_lot::Mutex;

use crate::metrics::MetricsServer;
use crate::server::{Shared, ShutdownHandle};
use crate::sockets::UPGRADE_FROM_ENV;
use crate::systemd;

/// What the new process has, by default, to become ready: start-up loads certificates and
/// CRLs, which on a slow disk takes a while.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on reading a request or writing an answer on the control socket.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the old process looks for the new one's `ready` (or its exit) while it waits.
const READY_POLL: Duration = Duration::from_millis(20);

/// The abstract unix socket through which process `pid` takes upgrade requests.
fn control_address(pid: u32) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("lclb-upgrade-{pid}"))
}

/// What the control thread hands over, and stops, when an upgrade succeeds.
#[derive(Debug)]
pub struct Handover {
    /// The server's state (is it draining?).
    pub shared: Arc<Shared>,
    /// The TLS listener ([`crate::Server::listener`]).
    pub listener: Weak<TcpListener>,
    /// The metrics server, if one runs: its socket is handed over too, and it is stopped.
    pub metrics: Arc<Mutex<Option<MetricsServer>>>,
    /// Stops the server once the new process serves.
    pub shutdown: ShutdownHandle,
}

/// Opens this process's control socket and starts the thread (`lclb-upgrade`) that serves it
/// for the life of the process.
pub fn listen(handover: Handover) -> io::Result<()> {
    let control = UnixListener::bind_addr(&control_address(std::process::id())?)?;
    std::thread::Builder::new()
        .name("lclb-upgrade".into())
        .spawn(move || {
            for conn in control.incoming() {
                match conn {
                    Ok(conn) => serve(&control, &handover, conn),
                    Err(e) => {
                        log::debug!("upgrade control: accept failed: {e}");
                        std::thread::sleep(READY_POLL);
                    }
                }
            }
        })?;
    Ok(())
}

/// A request on the control socket: checked, carried out, answered.
fn serve(control: &UnixListener, handover: &Handover, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(EXCHANGE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(EXCHANGE_TIMEOUT));
    let answer = |mut conn: &UnixStream, line: &str| {
        let _ = conn.write_all(format!("{line}\n").as_bytes());
    };
    match rustix::net::sockopt::socket_peercred(&conn) {
        Ok(cred) if cred.uid.is_root() || cred.uid == rustix::process::geteuid() => {}
        Ok(cred) => {
            log::warn!(
                "upgrade control: refused a request from uid {} (pid {}): only root or this \
                 process's user may upgrade it",
                cred.uid.as_raw(),
                cred.pid.as_raw_pid()
            );
            return answer(
                &conn,
                "failed not allowed: only root or lclb's own user may upgrade it",
            );
        }
        Err(e) => return answer(&conn, &format!("failed cannot tell who asks: {e}")),
    }
    let mut lines = BufReader::new(&conn).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    let head = next();
    let Some(timeout) = head
        .strip_prefix("upgrade ")
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
    else {
        return answer(&conn, &format!("failed unknown request {head:?}"));
    };
    let (binary, config) = (next(), next());
    match upgrade(
        control,
        handover,
        Path::new(&binary),
        Path::new(&config),
        timeout,
    ) {
        Ok(pid) => {
            answer(&conn, &format!("ready {pid}"));
            systemd::main_pid(pid);
            log::info!(
                "upgrade: process {pid} ({binary}) serves on the listening sockets; this one \
                 stops accepting and drains"
            );
            // Out of the lock: stopping waits for the metrics accept thread.
            let metrics = handover.metrics.lock().take();
            drop(metrics);
            handover.shutdown.shutdown_quietly();
        }
        Err(why) => {
            log::warn!("upgrade to {binary} failed, still serving: {why}");
            answer(&conn, &format!("failed {why}"));
        }
    }
}

/// Spawns `binary --config config` on this process's listening sockets and waits up to
/// `timeout` for it to be ready: its pid, or why not (the child is then gone).
fn upgrade(
    control: &UnixListener,
    handover: &Handover,
    binary: &Path,
    config: &Path,
    timeout: Duration,
) -> Result<u32, String> {
    if !binary.is_absolute() || !config.is_absolute() {
        return Err(format!(
            "the binary ({}) and the config ({}) must be absolute paths",
            binary.display(),
            config.display()
        ));
    }
    if handover.shared.draining() {
        return Err("this lclb is already draining".into());
    }
    let dup = |l: &TcpListener| l.try_clone().map(OwnedFd::from);
    let listen = handover
        .listener
        .upgrade()
        .ok_or("this lclb no longer accepts")?;
    let mut mappings = vec![FdMapping {
        parent_fd: dup(&listen).map_err(|e| format!("cannot pass the listener: {e}"))?,
        child_fd: 3,
    }];
    drop(listen);
    let metrics = handover
        .metrics
        .lock()
        .as_ref()
        .and_then(|m| m.listener().upgrade());
    let mut names = "listen".to_string();
    if let Some(metrics) = metrics {
        mappings.push(FdMapping {
            parent_fd: dup(&metrics)
                .map_err(|e| format!("cannot pass the metrics listener: {e}"))?,
            child_fd: 4,
        });
        names.push_str(":metrics");
    }
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(config)
        .env("LISTEN_FDS", mappings.len().to_string())
        .env("LISTEN_FDNAMES", names)
        .env_remove("LISTEN_PID")
        .env(UPGRADE_FROM_ENV, std::process::id().to_string())
        // The running lclb's own stdin, not /dev/null: once confined (Landlock) it may not
        // open /dev/null, and lclb reads no input anyway.
        .stdin(Stdio::inherit());
    command
        .fd_mappings(mappings)
        .map_err(|e| format!("cannot map the sockets: {e}"))?;
    let mut child = command.spawn().map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::PermissionDenied {
            " (a confined lclb, security.landlock, may start only files beneath the folders \
                 of its own binary and libraries: put the new binary beside the running one)"
        } else {
            ""
        };
        format!("cannot start {}: {e}{hint}", binary.display())
    })?;
    log::info!(
        "upgrade: started {} as process {}; waiting up to {} for it to be ready",
        binary.display(),
        child.id(),
        humantime::format_duration(timeout)
    );
    let result = wait_ready(control, &mut child, timeout);
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result.map(|()| child.id())
}

/// Waits for `child`'s `ready` on `control`; other requests meanwhile are turned away.
fn wait_ready(control: &UnixListener, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout).unwrap_or(started);
    control
        .set_nonblocking(true)
        .map_err(|e| format!("control socket: {e}"))?;
    let result = loop {
        match control.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(EXCHANGE_TIMEOUT));
                let from_child = rustix::net::sockopt::socket_peercred(&conn)
                    .is_ok_and(|c| c.pid.as_raw_pid() as u32 == child.id());
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                if from_child && line.trim_end() == "ready" {
                    break Ok(());
                }
                let _ = (&conn).write_all(b"failed busy: an upgrade is in progress\n");
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::debug!("upgrade control: accept failed: {e}"),
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                break Err(format!(
                    "the new process exited ({status}) before it was ready; its log lines say why"
                ))
            }
            Ok(None) => {}
            Err(e) => break Err(format!("cannot watch the new process: {e}")),
        }
        if Instant::now() >= deadline {
            break Err(format!(
                "the new process (pid {}) was not ready within {}; stopped it",
                child.id(),
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(READY_POLL);
    };
    let _ = control.set_nonblocking(false);
    result
}

/// In a process an upgrade started (`LCLB_UPGRADE_FROM` is its parent): tells the parent it is
/// ready, so that the parent stops accepting. Call once the listeners are open and the signal
/// handlers in place, just before accepting. Returns whether this process was started so.
pub fn report_ready() -> bool {
    let parent = std::os::unix::process::parent_id();
    if std::env::var(UPGRADE_FROM_ENV).ok() != Some(parent.to_string()) {
        return false;
    }
    let sent = control_address(parent)
        .and_then(|addr| UnixStream::connect_addr(&addr))
        .and_then(|mut conn| {
            conn.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
            conn.write_all(b"ready\n")
        });
    match sent {
        Ok(()) => log::info!("upgrade: ready; told process {parent}, which now drains"),
        Err(e) => log::warn!(
            "upgrade: cannot tell process {parent} that this one is ready ({e}); it will stop \
             this one at its deadline"
        ),
    }
    true
}

/// Asks lclb process `pid` to upgrade to `binary` with `config` (both made absolute here),
/// waiting up to `timeout` for the new process: its pid, or why the upgrade did not happen
/// (then `pid` still serves).
pub fn request(pid: u32, binary: &Path, config: &Path, timeout: Duration) -> Result<u32, String> {
    let absolute = |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
    let (binary, config) = (absolute(binary)?, absolute(config)?);
    let mut conn = control_address(pid)
        .and_then(|addr| UnixStream::connect_addr(&addr))
        .map_err(|e| {
            format!("cannot reach the upgrade control socket of process {pid} (is it a running lclb?): {e}")
        })?;
    let wait = timeout.saturating_add(EXCHANGE_TIMEOUT);
    conn.set_read_timeout(Some(wait))
        .and_then(|()| conn.set_write_timeout(Some(EXCHANGE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "upgrade {}\n{}\n{}\n",
        timeout.as_millis(),
        binary.display(),
        config.display()
    );
    conn.write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request to process {pid}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from process {pid}: {e}"))?;
    let line = line.trim_end();
    if let Some(new) = line.strip_prefix("ready ") {
        return new
            .parse()
            .map_err(|_| format!("process {pid} answered {line:?}"));
    }
    match line.strip_prefix("failed ") {
        Some(why) => Err(why.to_string()),
        None if line.is_empty() => Err(format!(
            "process {pid} closed the connection without an answer"
        )),
        None => Err(format!("process {pid} answered {line:?}")),
    }
}
