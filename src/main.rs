//! The `lclb` command: parses arguments, loads the config, runs the server. Errors leave through
//! one place, printed once with their causes, with a non-zero exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lclb::config::LogFormat;
use lclb::MetricsServer;
use lclb::{Config, Server};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};

const USAGE: &str = "\
lclb: a least-connection TCP load balancer with mutual TLS

Usage: lclb [--config PATH] [--check-config | --print-default-config]
       lclb explain [--config PATH] --cert CLIENT.pem [--chain INTERMEDIATES.pem] [--json]
       lclb status [--config PATH | --url URL] [--healthz]
       lclb upgrade --pid PID [--config PATH] [--binary PATH] [--timeout DURATION]

Options:
  -c, --config PATH         config file (default: lclb.toml); relative paths inside it
                            are taken relative to its folder
      --check-config        validate the config and every file it names (certificates,
                            key, CA), then exit 0 if usable or 1 if not
      --print-default-config
                            print a commented config with every key at its default
  -h, --help                print this help
  -V, --version             print the version

explain: says, offline and without the client's key, whether a client presenting
CLIENT.pem (leaf first; more certificates in it, or in --chain, are sent as its
intermediates) would be admitted now: the chain's verdict and its CA, each
[[client]] entry tried and why it did not match, the entry that does, its groups,
upstreams and limits. Exit 0 if admitted, 1 if refused, 2 on a usage or config
error. --json prints one JSON object instead.

status: asks a running lclb for its /status (on metrics_listen) and prints it as a
table: upstreams and their state, clients and their refusals. The address is
--url (http://HOST:PORT), else the config's metrics_listen (the config is
lclb.toml by default; without that file, http://127.0.0.1:9100). --healthz asks
/healthz instead: exit 0 if lclb accepts connections, 1 if it is draining or
cannot be reached (for a container HEALTHCHECK). Exit 2 on a usage or config
error.

upgrade: asks the running lclb PID to start BINARY (default: this lclb's own binary)
with --config (default lclb.toml) on its listening sockets; once the new process
is ready, the old one stops accepting, drains and exits 0. Prints the new PID. If
the new process is not ready within --timeout (default 30s), it is stopped and
the old one keeps serving: exit 1. scripts/upgrade.sh wraps it.

Signals: SIGHUP reloads the config (a bad one is refused and the old one kept; with
[reload] watch = true, file changes reload too);
SIGTERM or SIGINT stops accepting and drains (a second one exits at once).
Logging: RUST_LOG=debug|info|warn|error (default info); log_format = \"json\" in the
config for one JSON object per line.
";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
enum Command {
    Run {
        config: PathBuf,
    },
    Check {
        config: PathBuf,
    },
    PrintDefault,
    Explain {
        config: PathBuf,
        cert: PathBuf,
        chain: Option<PathBuf>,
        json: bool,
    },
    Status {
        source: StatusSource,
        healthz: bool,
    },
    Upgrade {
        pid: u32,
        config: PathBuf,
        binary: Option<PathBuf>,
        timeout: std::time::Duration,
    },
    Help,
    Version,
}

fn parse_upgrade(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from(lclb::config::DEFAULT_CONFIG_PATH);
    let (mut pid, mut binary, mut timeout) = (None, None, lclb::upgrade::DEFAULT_READY_TIMEOUT);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--pid" => {
                let v = value("the pid of the running lclb")?;
                pid = Some(v.parse().map_err(|_| format!("--pid {v:?} is not a pid"))?);
            }
            "-c" | "--config" => config = PathBuf::from(value("a file path")?),
            "--binary" => binary = Some(PathBuf::from(value("the new lclb binary")?)),
            "--timeout" => {
                let v = value("a duration such as 30s")?;
                timeout =
                    humantime::parse_duration(&v).map_err(|e| format!("--timeout {v:?}: {e}"))?;
            }
            other => {
                return Err(format!(
                    "upgrade: unknown argument {other:?} (see lclb --help)"
                ))
            }
        }
    }
    let pid = pid.ok_or("upgrade needs --pid PID (see lclb --help)")?;
    Ok(Command::Upgrade {
        pid,
        config,
        binary,
        timeout,
    })
}

/// Where `lclb status` finds the running lclb.
#[derive(Debug, PartialEq)]
enum StatusSource {
    /// `--url`.
    Url(String),
    /// `--config PATH`: its `metrics_listen`; `explicit` is false for the default path,
    /// which may be missing.
    Config { path: PathBuf, explicit: bool },
}

fn parse_status(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let (mut url, mut config, mut healthz) = (None, None, false);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "-c" | "--config" => config = Some(PathBuf::from(value("a file path")?)),
            "--url" => url = Some(value("a URL such as http://127.0.0.1:9100")?),
            "--healthz" => healthz = true,
            other => {
                return Err(format!(
                    "status: unknown argument {other:?} (see lclb --help)"
                ))
            }
        }
    }
    let source = match (url, config) {
        (Some(_), Some(_)) => {
            return Err("status takes --config or --url, not both (see lclb --help)".into())
        }
        (Some(url), None) => StatusSource::Url(url),
        (None, Some(path)) => StatusSource::Config {
            path,
            explicit: true,
        },
        (None, None) => StatusSource::Config {
            path: PathBuf::from(lclb::config::DEFAULT_CONFIG_PATH),
            explicit: false,
        },
    };
    Ok(Command::Status { source, healthz })
}

fn parse_explain(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from(lclb::config::DEFAULT_CONFIG_PATH);
    let (mut cert, mut chain, mut json) = (None, None, false);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{arg} needs {what}"))
        };
        match arg.as_str() {
            "-c" | "--config" => config = value("a file path")?,
            "--cert" => cert = Some(value("a PEM certificate file")?),
            "--chain" => chain = Some(value("a PEM file of intermediates")?),
            "--json" => json = true,
            other => {
                return Err(format!(
                    "explain: unknown argument {other:?} (see lclb --help)"
                ))
            }
        }
    }
    let cert = cert.ok_or("explain needs --cert CLIENT.pem (see lclb --help)")?;
    Ok(Command::Explain {
        config,
        cert,
        chain,
        json,
    })
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from(lclb::config::DEFAULT_CONFIG_PATH);
    let mut check = false;
    let mut args = args.into_iter().peekable();
    match args.peek().map(String::as_str) {
        Some("explain") => {
            args.next();
            return parse_explain(args);
        }
        Some("status") => {
            args.next();
            return parse_status(args);
        }
        Some("upgrade") => {
            args.next();
            return parse_upgrade(args);
        }
        _ => {}
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--check-config" => check = true,
            "--print-default-config" => return Ok(Command::PrintDefault),
            "-c" | "--config" => {
                config = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{arg} needs a file path"))?;
            }
            other => {
                if let Some(path) = other.strip_prefix("--config=") {
                    config = PathBuf::from(path);
                } else {
                    return Err(format!("unknown argument {other:?} (see lclb --help)"));
                }
            }
        }
    }
    Ok(if check {
        Command::Check { config }
    } else {
        Command::Run { config }
    })
}

/// Runs `command`; its exit code, or the error to print (exit 1).
fn run(command: Command) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match command {
        Command::Help => print!("{USAGE}"),
        Command::Version => println!("lclb {}", env!("CARGO_PKG_VERSION")),
        Command::PrintDefault => print!("{}", lclb::config::DEFAULT_CONFIG),
        Command::Explain {
            config,
            cert,
            chain,
            json,
        } => return Ok(explain(&config, &cert, chain.as_deref(), json)),
        Command::Status { source, healthz } => return Ok(status::run(&source, healthz)),
        Command::Upgrade {
            pid,
            config,
            binary,
            timeout,
        } => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe()?,
            };
            let new = lclb::upgrade::request(pid, &binary, &config, timeout)
                .map_err(|why| format!("upgrade of process {pid}: {why}; it keeps serving"))?;
            println!("{new}");
        }
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            lclb::TlsContext::load(&loaded.tls)?;
            lclb::GroupTls::load(&loaded)?;
            if let Some(cluster) = &loaded.cluster {
                lclb::Cluster::check(cluster)?;
            }
            for warning in loaded.shadowed_clients() {
                eprintln!("lclb: warning: {warning}");
            }
            println!(
                "{}: configuration OK ({} upstream(s), {} client(s))",
                config.display(),
                loaded.upstreams.len(),
                loaded.clients.len()
            );
        }
        Command::Run { config } => {
            // Before any thread: it unsets the LISTEN_* variables.
            let inherited = lclb::inherited()?;
            let loaded = Config::load(&config)?;
            raise_fd_limit(loaded.limits.max_connections);
            let metrics_addr = loaded.metrics_listen;
            let reuse_port = loaded.reuse_port;
            let confinement = loaded
                .security
                .landlock
                .then(|| lclb::Confinement::for_config(&config, &loaded));
            let (server, metrics_socket) = match inherited {
                Some(passed) => {
                    lclb::log_inherited(passed.from, "listen", &passed.listen, Some(loaded.listen));
                    if let Some(m) = &passed.metrics {
                        lclb::log_inherited(passed.from, "metrics_listen", m, metrics_addr);
                    }
                    (
                        Server::unstarted_with_listener(loaded, passed.listen)?,
                        passed.metrics,
                    )
                }
                None => (Server::bind_unstarted(loaded)?, None),
            };
            let metrics = match (metrics_socket, metrics_addr) {
                (Some(socket), _) => Some(lclb::MetricsListener::inherited(socket)?),
                (None, Some(addr)) => Some(MetricsServer::bind(addr, reuse_port)?),
                (None, None) => None,
            };
            // Landlock confines the calling thread and the threads it starts afterwards, never
            // those already running: so here, with every file read and every socket bound, and
            // before the first thread (health, expiry, cluster, metrics, watcher, signals,
            // upgrade control) starts.
            match confinement {
                Some(confinement) => drop(confinement.apply()?),
                None => {
                    log::info!("landlock: off (security.landlock = false): lclb runs unconfined")
                }
            }
            let server = server.start()?;
            let metrics = match metrics {
                Some(listener) => Some(listener.serve(server.shared())?),
                None => None,
            };
            let metrics = std::sync::Arc::new(parking_lot::Mutex::new(metrics));
            // Every reload runs on the watch thread, so two never interleave.
            let watcher = lclb::Watcher::spawn(server.shared(), config)?;
            handle_signals(&server, watcher.requests())?;
            let handover = lclb::upgrade::Handover {
                shared: server.shared(),
                listener: server.listener(),
                metrics: metrics.clone(),
                shutdown: server.shutdown_handle(),
            };
            if let Err(e) = lclb::upgrade::listen(handover) {
                log::warn!("upgrades unavailable: cannot open the control socket: {e}");
            }
            // A process an upgrade started is not yet the service's main process: the old
            // one hands that over (MAINPID=) once told this one is ready.
            if !lclb::upgrade::report_ready() {
                lclb::systemd::ready(&format!("serving on {}", server.local_addr()));
            }
            server.run();
            drop(metrics);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Raises the soft fd limit to the hard one: each connection needs two fds (client and
/// upstream), and the distribution default of 1024 would cap lclb at about 500 connections.
fn raise_fd_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let room = limit.saturating_sub(64) / 2;
            log::info!("fd limit {limit}: room for about {room} concurrent connections");
            if (max_connections as u64) > room {
                log::warn!(
                    "limits.max_connections = {max_connections} exceeds what the fd limit allows \
                     ({room}); raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower it"
                );
            }
        }
        Err(e) => log::warn!("cannot raise the fd limit: {e}"),
    }
}

/// SIGHUP asks for a reload; the first SIGTERM/SIGINT drains, a second one exits at once. The
/// thread lives as long as the process.
fn handle_signals(server: &Server, reloads: lclb::ReloadRequests) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let shutdown = server.shutdown_handle();
    std::thread::Builder::new()
        .name("lclb-signals".into())
        .spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                match signal {
                    SIGHUP => reloads.reload(),
                    _ if stopping => {
                        log::warn!("second stop signal: exiting without waiting for the drain");
                        std::process::exit(128 + signal);
                    }
                    _ => {
                        stopping = true;
                        lclb::systemd::stopping();
                        shutdown.shutdown();
                    }
                }
            }
        })?;
    Ok(())
}

fn init_logging() {
    use std::io::Write as _;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let ts = buf.timestamp_millis().to_string();
            let message = record.args().to_string();
            if lclb::log_format() == LogFormat::Json {
                let line = lclb::json_line(&ts, record.level().as_str(), record.target(), &message);
                writeln!(buf, "{line}")
            } else {
                writeln!(
                    buf,
                    "[{ts} {:<5} {}] {message}",
                    record.level(),
                    record.target()
                )
            }
        })
        .init();
}

fn main() -> ExitCode {
    init_logging();
    lclb::install_default_provider();
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lclb: {e}");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(code) => code,
        Err(e) => {
            let mut message = format!("lclb: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// `lclb explain`: 0 when admitted, 1 when refused, 2 when the config, its files or the
/// certificate files cannot be used.
fn explain(config: &Path, cert: &Path, chain: Option<&Path>, json: bool) -> ExitCode {
    let loaded = Config::load(config)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            let trust = lclb::ClientTrust::load(&c.tls).map_err(|e| e.to_string())?;
            Ok((c, trust))
        });
    let (loaded, trust) = match loaded {
        Ok(ok) => ok,
        Err(e) => {
            eprintln!("lclb: {e}");
            return ExitCode::from(2);
        }
    };
    let mut certs = match read_certs(cert) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lclb: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = chain {
        match read_certs(path) {
            Ok(more) => certs.extend(more),
            Err(e) => {
                eprintln!("lclb: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let verdict = lclb::explain(&loaded, &trust, &certs, UnixTime::now());
    if json {
        println!("{}", verdict.to_json());
    } else {
        print!("{}", verdict.to_text(&trust));
    }
    if verdict.admitted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The certificates of a PEM file, in file order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected a -----BEGIN CERTIFICATE----- block)",
            path.display()
        ));
    }
    Ok(certs)
}

/// `lclb status`: one GET to a running lclb's metrics server, over a plain `TcpStream`.
mod status {
    use std::io::{self, Read, Write};
    use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
    use std::path::Path;
    use std::process::ExitCode;
    use std::time::{Duration, Instant};

    use super::StatusSource;

    /// Where lclb is asked when neither `--url` nor a config says: the address the default
    /// config's comment suggests for `metrics_listen`.
    const DEFAULT_URL: &str = "http://127.0.0.1:9100";
    /// Bound on the TCP connect to each address.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Bound on the whole exchange once connected; lclb itself cuts a request at 2 s.
    const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Largest answer read: /status of tens of thousands of clients fits.
    const MAX_ANSWER: u64 = 64 * 1024 * 1024;

    /// A metrics server to ask: the URL as shown in messages, its `Host`, its addresses.
    #[derive(Debug)]
    pub(super) struct Target {
        pub url: String,
        host: String,
        addrs: Vec<SocketAddr>,
    }

    /// Prints `/status` as a table (exit 0), or with `healthz` asks `/healthz` (exit 0 on
    /// 200, else 1). Exit 1 when lclb cannot be reached, 2 when the URL or config is unusable.
    pub(super) fn run(source: &StatusSource, healthz: bool) -> ExitCode {
        let target = match target_of(source) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("lclb: {e}");
                return ExitCode::from(2);
            }
        };
        let path = if healthz {
            "/healthz"
        } else {
            "/status?format=text"
        };
        match get(&target, path) {
            Err(e) => {
                eprintln!("lclb: cannot reach lclb at {}: {e}", target.url);
                ExitCode::FAILURE
            }
            Ok((200, body)) => {
                print!("{body}");
                ExitCode::SUCCESS
            }
            Ok((code, body)) if healthz => {
                print!("{body}");
                eprintln!("lclb: {}{path} answered {code}", target.url);
                ExitCode::FAILURE
            }
            Ok((code, body)) => {
                eprintln!(
                    "lclb: {}{path} answered {code}: {}",
                    target.url,
                    body.trim_end()
                );
                ExitCode::FAILURE
            }
        }
    }

    pub(super) fn target_of(source: &StatusSource) -> Result<Target, String> {
        match source {
            StatusSource::Url(url) => parse_url(url),
            StatusSource::Config { path, explicit } => {
                if !explicit && !path.exists() {
                    return parse_url(DEFAULT_URL);
                }
                let Some(addr) = metrics_listen_of(path)? else {
                    return Err(format!(
                        "{} sets no metrics_listen, so lclb serves no /status; set it, or pass \
                         --url",
                        path.display()
                    ));
                };
                if addr.port() == 0 {
                    return Err(format!(
                        "{} has metrics_listen on port 0, which lclb picks at start; pass --url \
                         with the port it logged",
                        path.display()
                    ));
                }
                parse_url(&format!("http://{}", reachable(addr)))
            }
        }
    }

    /// The `metrics_listen` of the config file at `path`, read without validating the rest of
    /// it: the running lclb validated the file when it loaded it, and a health check must not
    /// fail because something else in it does not hold right now, such as an upstream name
    /// that does not resolve (in compose, a stopped upstream's name goes away with it).
    fn metrics_listen_of(path: &Path) -> Result<Option<SocketAddr>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bad = |why: String| format!("{}: config key `metrics_listen`: {why}", path.display());
        match table.get("metrics_listen") {
            None => Ok(None),
            Some(toml::Value::String(text)) => text.parse().map(Some).map_err(|_| {
                bad(format!(
                    "{text:?} is not an IP address and port, such as \"127.0.0.1:9100\""
                ))
            }),
            Some(other) => Err(bad(format!(
                "expected a string such as \"127.0.0.1:9100\", found {}",
                other.type_str()
            ))),
        }
    }

    /// Where to connect for a server bound to `addr`: loopback for an unspecified address.
    fn reachable(mut addr: SocketAddr) -> SocketAddr {
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        addr
    }

    /// `http://HOST[:PORT][/]`: the metrics server's root; the port defaults to 80.
    pub(super) fn parse_url(url: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("--url {url:?}: {why}");
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "{scheme}:// is not supported; lclb's metrics server speaks plain http://"
                )))
            }
            None => return Err(bad("expected http://HOST:PORT")),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !path.is_empty() {
            return Err(bad(
                "give the server's root (http://HOST:PORT); /status and /healthz are added",
            ));
        }
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let has_port = match authority.rsplit_once(':') {
            Some((host, _)) => !host.starts_with('[') || host.ends_with(']'),
            None => false,
        };
        let with_port = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .map_err(|e| bad(&format!("cannot resolve {with_port}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(bad(&format!("{with_port} resolves to no address")));
        }
        Ok(Target {
            url: format!("http://{authority}"),
            host: authority.to_string(),
            addrs,
        })
    }

    /// GETs `path` from `target`: the status code and the body. The server closes the
    /// connection after its answer, so the body is what comes before that close.
    fn get(target: &Target, path: &str) -> io::Result<(u16, String)> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut conn = None;
        for addr in &target.addrs {
            match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut conn = conn.ok_or(last)?;
        let started = Instant::now();
        let deadline = started.checked_add(EXCHANGE_TIMEOUT).unwrap_or(started);
        let left = || {
            Some(deadline.saturating_duration_since(Instant::now()))
                .filter(|d| !d.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
        };
        conn.set_write_timeout(Some(left()?))?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lclb/{}\r\nConnection: close\r\n\r\n",
            target.host,
            env!("CARGO_PKG_VERSION")
        );
        conn.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            conn.set_read_timeout(Some(left()?))?;
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.len() as u64 > MAX_ANSWER {
                        return Err(io::Error::other("answer too large"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        parse_answer(&answer)
    }

    /// The status code and body of an HTTP/1.x answer.
    pub(super) fn parse_answer(answer: &[u8]) -> io::Result<(u16, String)> {
        let not_http = || io::Error::new(io::ErrorKind::InvalidData, "the answer is not HTTP");
        let end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(not_http)?;
        let head = String::from_utf8_lossy(&answer[..end]);
        let mut status_line = head.lines().next().unwrap_or("").split_whitespace();
        if !status_line.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
            return Err(not_http());
        }
        let code = status_line
            .next()
            .and_then(|c| c.parse().ok())
            .ok_or_else(not_http)?;
        let body = String::from_utf8_lossy(&answer[end + 4..]).into_owned();
        Ok((code, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_config_defaults_to_lclb_toml() {
        assert_eq!(
            parse(&[]),
            Ok(Command::Run {
                config: "lclb.toml".into()
            })
        );
    }

    #[test]
    fn config_and_check_combine_in_any_order() {
        let want = Ok(Command::Check {
            config: "x.toml".into(),
        });
        assert_eq!(parse(&["--check-config", "--config", "x.toml"]), want);
        assert_eq!(parse(&["-c", "x.toml", "--check-config"]), want);
        assert_eq!(parse(&["--config=x.toml", "--check-config"]), want);
    }

    #[test]
    fn print_default_config_needs_no_config_file() {
        assert_eq!(
            parse(&["--print-default-config"]),
            Ok(Command::PrintDefault)
        );
    }

    #[test]
    fn explain_takes_a_config_a_cert_a_chain_and_json() {
        assert_eq!(
            parse(&["explain", "--cert", "c.pem"]),
            Ok(Command::Explain {
                config: "lclb.toml".into(),
                cert: "c.pem".into(),
                chain: None,
                json: false
            })
        );
        assert_eq!(
            parse(&["explain", "--json", "-c", "x.toml", "--chain", "i.pem", "--cert", "c.pem"]),
            Ok(Command::Explain {
                config: "x.toml".into(),
                cert: "c.pem".into(),
                chain: Some("i.pem".into()),
                json: true
            })
        );
        assert!(parse(&["explain"]).unwrap_err().contains("--cert"));
        assert!(parse(&["explain", "--cert"])
            .unwrap_err()
            .contains("needs a PEM certificate file"));
        assert!(parse(&["explain", "--cert", "c.pem", "--check-config"])
            .unwrap_err()
            .contains("--check-config"));
    }

    #[test]
    fn upgrade_takes_a_pid_a_config_a_binary_and_a_timeout() {
        assert_eq!(
            parse(&["upgrade", "--pid", "42"]),
            Ok(Command::Upgrade {
                pid: 42,
                config: "lclb.toml".into(),
                binary: None,
                timeout: lclb::upgrade::DEFAULT_READY_TIMEOUT,
            })
        );
        assert_eq!(
            parse(&[
                "upgrade",
                "-c",
                "x.toml",
                "--binary",
                "/b",
                "--timeout",
                "5s",
                "--pid",
                "7"
            ]),
            Ok(Command::Upgrade {
                pid: 7,
                config: "x.toml".into(),
                binary: Some("/b".into()),
                timeout: std::time::Duration::from_secs(5),
            })
        );
        assert!(parse(&["upgrade"]).unwrap_err().contains("needs --pid"));
        assert!(parse(&["upgrade", "--pid", "x"])
            .unwrap_err()
            .contains("not a pid"));
        assert!(parse(&["upgrade", "--pid", "1", "--timeout", "soon"])
            .unwrap_err()
            .contains("--timeout"));
    }

    #[test]
    fn a_missing_value_or_unknown_flag_is_an_error() {
        assert!(parse(&["--config"])
            .unwrap_err()
            .contains("needs a file path"));
        assert!(parse(&["--frobnicate"])
            .unwrap_err()
            .contains("--frobnicate"));
    }

    #[test]
    fn status_takes_a_config_or_a_url_and_healthz() {
        assert_eq!(
            parse(&["status"]),
            Ok(Command::Status {
                source: StatusSource::Config {
                    path: "lclb.toml".into(),
                    explicit: false
                },
                healthz: false
            })
        );
        assert_eq!(
            parse(&["status", "--healthz", "-c", "x.toml"]),
            Ok(Command::Status {
                source: StatusSource::Config {
                    path: "x.toml".into(),
                    explicit: true
                },
                healthz: true
            })
        );
        assert_eq!(
            parse(&["status", "--url", "http://10.0.0.1:9100"]),
            Ok(Command::Status {
                source: StatusSource::Url("http://10.0.0.1:9100".into()),
                healthz: false
            })
        );
        assert!(parse(&["status", "--url", "u", "--config", "c"])
            .unwrap_err()
            .contains("not both"));
        assert!(parse(&["status", "--url"])
            .unwrap_err()
            .contains("needs a URL"));
        assert!(parse(&["status", "--json"]).unwrap_err().contains("--json"));
    }

    #[test]
    fn a_status_url_is_an_http_root_with_a_port_that_defaults_to_80() {
        let t = status::parse_url("http://127.0.0.1:9100/").unwrap();
        assert_eq!(t.url, "http://127.0.0.1:9100");
        let t = status::parse_url("HTTP://[::1]:9100").unwrap();
        assert_eq!(t.url, "http://[::1]:9100");
        let t = status::parse_url("http://127.0.0.1").unwrap();
        assert!(format!("{t:?}").contains("127.0.0.1:80"), "{t:?}");
        let err = |u: &str| status::parse_url(u).unwrap_err();
        assert!(err("https://127.0.0.1:9100").contains("plain http://"));
        assert!(err("127.0.0.1:9100").contains("expected http://"));
        assert!(err("http://127.0.0.1:9100/status").contains("root"));
        assert!(err("http://").contains("no host"));
    }

    #[test]
    fn an_answer_gives_its_code_and_body() {
        let (code, body) =
            status::parse_answer(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\ndraining\n")
                .unwrap();
        assert_eq!((code, body.as_str()), (503, "draining\n"));
        assert!(status::parse_answer(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(
            status::parse_answer(b"HTTP/1.1 200 OK\r\n").is_err(),
            "no end of head"
        );
    }

    #[test]
    fn a_config_without_metrics_listen_is_an_error_and_a_missing_default_is_the_default_url() {
        let dir = std::env::temp_dir().join(format!("lclb-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = StatusSource::Config {
            path: dir.join("none.toml"),
            explicit: false,
        };
        assert_eq!(
            status::target_of(&missing).unwrap().url,
            "http://127.0.0.1:9100"
        );
        let explicit = StatusSource::Config {
            path: dir.join("none.toml"),
            explicit: true,
        };
        assert!(status::target_of(&explicit)
            .unwrap_err()
            .contains("none.toml"));
        let path = dir.join("lclb.toml");
        let upstream = "[[upstream]]\nname = \"u\"\naddress = \"127.0.0.1:1\"\ngroup = \"g\"\n";
        std::fs::write(&path, upstream).unwrap();
        let source = StatusSource::Config {
            path: path.clone(),
            explicit: true,
        };
        assert!(status::target_of(&source)
            .unwrap_err()
            .contains("sets no metrics_listen"));
        std::fs::write(
            &path,
            format!("metrics_listen = \"0.0.0.0:9111\"\n{upstream}"),
        )
        .unwrap();
        assert_eq!(
            status::target_of(&source).unwrap().url,
            "http://127.0.0.1:9111",
            "an unspecified address is reached on loopback"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_reads_only_metrics_listen_from_the_config() {
        let dir = std::env::temp_dir().join(format!("lclb-status-only-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lclb.toml");
        let source = StatusSource::Config {
            path: path.clone(),
            explicit: true,
        };
        // An upstream name that does not resolve and a key lclb would refuse: neither is the
        // command's business.
        std::fs::write(
            &path,
            "metrics_listen = \"127.0.0.1:9112\"\nno_such_key = 1\n[[upstream]]\nname = \"u\"\n\
             address = \"no-such-upstream.invalid:9001\"\ngroup = \"g\"\n",
        )
        .unwrap();
        assert_eq!(
            status::target_of(&source).unwrap().url,
            "http://127.0.0.1:9112"
        );
        for (value, says) in [
            (
                "\"localhost:9100\"",
                "\"localhost:9100\" is not an IP address and port",
            ),
            (
                "9100",
                "expected a string such as \"127.0.0.1:9100\", found integer",
            ),
        ] {
            std::fs::write(&path, format!("metrics_listen = {value}\n")).unwrap();
            let e = status::target_of(&source).unwrap_err();
            assert!(e.contains("config key `metrics_listen`: "), "{e}");
            assert!(e.contains(says), "{e}");
            assert!(e.contains("lclb.toml"), "{e}");
        }
        std::fs::write(&path, "metrics_listen = \n").unwrap();
        let e = status::target_of(&source).unwrap_err();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
