//! The listening sockets: bound here from the config (with SO_REUSEPORT when `reuse_port` is
//! on), or inherited from whoever started lclb: systemd's socket activation, or the lclb being
//! upgraded (the upgrade module), both by the `LISTEN_FDS` protocol.
//!
//! Inherited sockets are taken when `LISTEN_FDS` is set and `LISTEN_PID` is this process's pid
//! (systemd), or `LISTEN_PID` is unset and `LCLB_UPGRADE_FROM` names this process's parent (an
//! upgrading lclb, which cannot know its child's pid before the child runs). The first socket
//! (fd 3) is the TLS listener, the second the metrics listener; with `LISTEN_FDNAMES`, the one
//! named `metrics` is the metrics listener and the other one the TLS listener. Each must be a
//! listening TCP socket.
//!
//! Every listening socket gets a receive timeout of [`ACCEPT_POLL`], which bounds `accept`: an
//! accept loop that is told to stop without a wake-up connection notices within that time.
//! That matters once two processes share one socket (an upgrade): a wake-up connection could be
//! accepted by the other process, and the one stopping would wait on.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// The longest an idle `accept` blocks before its loop looks at its stop flag again.
pub const ACCEPT_POLL: Duration = Duration::from_secs(1);

/// The accept queue asked for; the kernel caps it at `net.core.somaxconn` (4096 by default).
const BACKLOG: i32 = 4096;

/// The environment variable an upgrading lclb sets to its own pid for the child it starts.
pub const UPGRADE_FROM_ENV: &str = "LCLB_UPGRADE_FROM";

/// Binds `addr` for listening, with SO_REUSEADDR (as std does: a restart binds despite
/// connections in TIME_WAIT) and, if `reuse_port`, SO_REUSEPORT.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        rustix::net::sockopt::set_socket_reuseport(&socket, true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    let listener = TcpListener::from(socket);
    poll_accepts(&listener)?;
    Ok(listener)
}

/// Bounds each `accept` on `listener` by [`ACCEPT_POLL`] (see the module documentation).
fn poll_accepts(listener: &TcpListener) -> io::Result<()> {
    SockRef::from(listener).set_read_timeout(Some(ACCEPT_POLL))
}

/// Undoes, on an accepted socket, what it inherited from [`poll_accepts`]: Linux copies the
/// listener's receive timeout to the sockets it accepts.
pub fn accepted(sock: &TcpStream) -> io::Result<()> {
    sock.set_read_timeout(None)
}

/// Whether `e`, from `accept`, is only [`ACCEPT_POLL`] passing with no connection.
pub fn is_poll_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Who passed the inherited sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passer {
    /// systemd (`LISTEN_PID` is this process).
    Systemd,
    /// The lclb process being upgraded, with this pid.
    Upgrade(u32),
}

impl fmt::Display for Passer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Passer::Systemd => f.write_str("systemd"),
            Passer::Upgrade(pid) => write!(f, "the lclb being upgraded (pid {pid})"),
        }
    }
}

/// The listening sockets inherited through `LISTEN_FDS`.
#[derive(Debug)]
pub struct Inherited {
    /// Who passed them.
    pub from: Passer,
    /// The TLS listener.
    pub listen: TcpListener,
    /// The metrics listener, if a second socket was passed.
    pub metrics: Option<TcpListener>,
}

/// Why the inherited sockets cannot be used.
#[derive(Debug)]
pub struct InheritError(String);

impl fmt::Display for InheritError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LISTEN_FDS: {}", self.0)
    }
}

impl std::error::Error for InheritError {}

/// The sockets passed to this process, if any were (see the module documentation); an error
/// when some were but they are not two or fewer listening TCP sockets. Reads and then unsets
/// `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`, so no process lclb starts sees them: call
/// it before any thread is started.
pub fn inherited() -> Result<Option<Inherited>, InheritError> {
    let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(count) = var("LISTEN_FDS") else {
        return Ok(None);
    };
    let from = match (var("LISTEN_PID"), var(UPGRADE_FROM_ENV)) {
        (Some(pid), _) if pid == std::process::id().to_string() => Passer::Systemd,
        (Some(pid), _) => {
            log::info!(
                "LISTEN_FDS is for process {pid}, not this one: binding the config's addresses"
            );
            return Ok(None);
        }
        (None, Some(parent)) if parent == std::os::unix::process::parent_id().to_string() => {
            Passer::Upgrade(std::os::unix::process::parent_id())
        }
        (None, _) => {
            log::warn!(
                "LISTEN_FDS is set without LISTEN_PID (nor {UPGRADE_FROM_ENV} naming the parent): \
                 ignored, binding the config's addresses"
            );
            return Ok(None);
        }
    };
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    // listenfd checks LISTEN_PID again (equal, or unset) and unsets both variables.
    let mut fds = listenfd::ListenFd::from_env();
    std::env::remove_var("LISTEN_FDNAMES");
    let (listen_at, metrics_at) =
        roles(fds.len(), &names).map_err(|e| InheritError(format!("LISTEN_FDS={count}: {e}")))?;
    let mut take = |i: usize| {
        let name = names.get(i).map_or(String::new(), |n| format!(" ({n:?})"));
        let fd = 3 + i;
        let listener = fds
            .take_tcp_listener(i)
            .map_err(|e| {
                InheritError(format!(
                    "{e}{name}; lclb takes listening TCP sockets (a socket unit's ListenStream=)"
                ))
            })?
            .ok_or_else(|| InheritError(format!("fd {fd}{name} was already taken")))?;
        match rustix::net::sockopt::socket_acceptconn(&listener) {
            Ok(true) => {}
            Ok(false) => {
                return Err(InheritError(format!(
                    "fd {fd}{name} is a TCP socket but not a listening one (a systemd socket \
                     unit with Accept=yes passes connections; lclb needs Accept=no)"
                )))
            }
            Err(e) => return Err(InheritError(format!("fd {fd}{name}: {e}"))),
        }
        poll_accepts(&listener).map_err(|e| InheritError(format!("fd {fd}{name}: {e}")))?;
        Ok::<_, InheritError>(listener)
    };
    let listen = take(listen_at)?;
    let metrics = metrics_at.map(&mut take).transpose()?;
    Ok(Some(Inherited {
        from,
        listen,
        metrics,
    }))
}

/// Which of `n` passed sockets is the TLS listener and which, if any, the metrics listener
/// (indexes from 0, fd 3), by their `names` (`LISTEN_FDNAMES`, possibly empty): the one named
/// `metrics`, else the second.
fn roles(n: usize, names: &[String]) -> Result<(usize, Option<usize>), String> {
    if n == 0 || n > 2 {
        return Err(format!(
            "{n} socket(s) passed; lclb takes one (the TLS listener) or two (then the metrics \
             listener second, or named \"metrics\" in LISTEN_FDNAMES)"
        ));
    }
    let metrics_at = match names.iter().position(|name| name == "metrics") {
        Some(i) if i >= n => {
            return Err(format!(
                "LISTEN_FDNAMES={:?} names more sockets than the {n} passed",
                names.join(":")
            ))
        }
        Some(i) => Some(i),
        None => (n == 2).then_some(1),
    };
    let listen_at = (0..n)
        .find(|&i| Some(i) != metrics_at)
        .ok_or("the only socket passed is named \"metrics\"; the TLS listener is missing")?;
    Ok((listen_at, metrics_at))
}

/// Logs which inherited socket stands for `key`, and that the config's address for it, if it
/// names another one, is not used.
pub fn log_inherited(
    from: Passer,
    key: &str,
    listener: &TcpListener,
    configured: Option<SocketAddr>,
) {
    let bound = listener.local_addr().ok();
    let shown = bound.map_or("an unknown address".to_string(), |a| a.to_string());
    log::info!("{key}: using the listening socket passed by {from}, on {shown}");
    if let Some(configured) = configured.filter(|c| Some(*c) != bound) {
        log::info!(
            "{key} = \"{configured}\" in the config is not used: the passed socket stands for it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<String> {
        text.split(':')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_first_socket_is_the_listener_and_a_second_one_the_metrics_listener() {
        assert_eq!(roles(1, &names("")), Ok((0, None)));
        assert_eq!(roles(2, &names("")), Ok((0, Some(1))));
        assert_eq!(roles(2, &names("listen:other")), Ok((0, Some(1))));
    }

    #[test]
    fn the_socket_named_metrics_is_the_metrics_listener_wherever_it_comes() {
        assert_eq!(roles(2, &names("metrics:listen")), Ok((1, Some(0))));
        assert_eq!(roles(2, &names("listen:metrics")), Ok((0, Some(1))));
    }

    #[test]
    fn no_socket_three_sockets_or_a_lone_metrics_socket_are_refused() {
        assert!(roles(0, &[]).unwrap_err().contains("0 socket(s) passed"));
        assert!(roles(3, &[]).unwrap_err().contains("3 socket(s) passed"));
        assert!(roles(1, &names("metrics"))
            .unwrap_err()
            .contains("the TLS listener is missing"));
        assert!(roles(1, &names("listen:metrics"))
            .unwrap_err()
            .contains("names more sockets than the 1 passed"));
    }

    #[test]
    fn an_accept_timeout_is_a_poll_tick_and_other_errors_are_not() {
        assert!(is_poll_timeout(&io::Error::from(io::ErrorKind::WouldBlock)));
        assert!(!is_poll_timeout(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }

    #[test]
    fn reuse_port_lets_two_sockets_bind_one_address_and_its_absence_does_not() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).expect("both have SO_REUSEPORT");
        assert_eq!(second.local_addr().unwrap(), addr);
        let e = bind(addr, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn an_accepted_socket_does_not_keep_the_listeners_accept_timeout() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sock, _) = listener.accept().unwrap();
        assert_eq!(
            sock.read_timeout().unwrap(),
            Some(ACCEPT_POLL),
            "Linux copies it"
        );
        accepted(&sock).unwrap();
        assert_eq!(sock.read_timeout().unwrap(), None);
    }
}
