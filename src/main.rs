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
    Help,
    Version,
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
    if args.peek().map(String::as_str) == Some("explain") {
        args.next();
        return parse_explain(args);
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
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            lclb::TlsContext::load(&loaded.tls)?;
            lclb::GroupTls::load(&loaded)?;
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
            let loaded = Config::load(&config)?;
            raise_fd_limit(loaded.limits.max_connections);
            let metrics_addr = loaded.metrics_listen;
            let server = Server::bind(loaded)?;
            let _metrics = match metrics_addr {
                Some(addr) => Some(MetricsServer::spawn(addr, server.shared())?),
                None => None,
            };
            // Every reload runs on the watch thread, so two never interleave.
            let watcher = lclb::Watcher::spawn(server.shared(), config)?;
            handle_signals(&server, watcher.requests())?;
            server.run();
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
    fn a_missing_value_or_unknown_flag_is_an_error() {
        assert!(parse(&["--config"])
            .unwrap_err()
            .contains("needs a file path"));
        assert!(parse(&["--frobnicate"])
            .unwrap_err()
            .contains("--frobnicate"));
    }
}
