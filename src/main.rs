//! The `lclb` command: parses arguments, loads the config, runs the server. Errors leave through
//! one place, printed once with their causes, with a non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use lclb::{Config, Server};

const USAGE: &str = "\
lclb: a least-connection TCP load balancer with mutual TLS

Usage: lclb [--config PATH] [--check-config]

Options:
  -c, --config PATH   config file (default: lclb.toml); relative paths inside it are
                      taken relative to its folder
      --check-config  validate the config and every file it names (certificates, key,
                      CA), then exit 0 if usable or 1 if not
  -h, --help          print this help
  -V, --version       print the version

Logging: RUST_LOG=debug|info|warn|error (default info).
";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
enum Command {
    Run { config: PathBuf },
    Check { config: PathBuf },
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from(lclb::config::DEFAULT_CONFIG_PATH);
    let mut check = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--check-config" => check = true,
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

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Help => print!("{USAGE}"),
        Command::Version => println!("lclb {}", env!("CARGO_PKG_VERSION")),
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            lclb::tls::TlsContext::load(&loaded.tls)?;
            println!(
                "{}: configuration OK ({} upstream(s), {} client(s))",
                config.display(),
                loaded.upstreams.len(),
                loaded.clients.len()
            );
        }
        Command::Run { config } => {
            let loaded = Config::load(&config)?;
            let server = Server::bind(loaded)?;
            server.run();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    lclb::tls::install_default_provider();
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lclb: {e}");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
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
    fn a_missing_value_or_unknown_flag_is_an_error() {
        assert!(parse(&["--config"])
            .unwrap_err()
            .contains("needs a file path"));
        assert!(parse(&["--frobnicate"])
            .unwrap_err()
            .contains("--frobnicate"));
    }
}
