//! A demo upstream for trying lclb: on each connection it writes its name and a newline, then
//! echoes whatever it receives until the peer closes, then closes. One thread per connection.
//!
//! ```text
//! cargo run --example upstream -- --listen 127.0.0.1:9001 --name web1
//! ```
//!
//! The scripts in `scripts/` read that first line to tell which upstream served a connection.
//! Health probes (a connect and a close) are served like any connection and not logged.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
upstream: a demo upstream for lclb. On each connection it writes NAME and a newline, then
echoes the bytes it receives until the peer closes its side, then closes.

Usage: upstream --listen ADDR [--name NAME] [--verbose]

Options:
  -l, --listen ADDR   address to listen on, such as 127.0.0.1:9001 (required)
  -n, --name NAME     name sent as the first line (default: the listen address)
  -v, --verbose       log each connection to stderr
  -h, --help          print this help
";

/// Longest a connection may sit with no bytes either way before it is closed, so that a client
/// that vanished without closing does not keep a thread forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

struct Options {
    listen: SocketAddr,
    name: String,
    verbose: bool,
}

enum Parsed {
    Run(Options),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut listen = None;
    let mut name = None;
    let mut verbose = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-v" | "--verbose" => verbose = true,
            "-l" | "--listen" => {
                let text = value("an address such as 127.0.0.1:9001")?;
                let addr = text
                    .parse()
                    .map_err(|_| format!("{text:?} is not an IP address and port"))?;
                listen = Some(addr);
            }
            "-n" | "--name" => {
                let text = value("a name")?;
                if text.is_empty() || text.contains(['\n', '\r']) {
                    return Err("--name must be one non-empty line".to_string());
                }
                name = Some(text);
            }
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        }
    }
    let listen: SocketAddr = listen.ok_or("--listen ADDR is required (see --help)")?;
    Ok(Parsed::Run(Options {
        name: name.unwrap_or_else(|| listen.to_string()),
        listen,
        verbose,
    }))
}

/// Serves one connection: greeting, then echo until EOF, then close.
fn serve(mut sock: TcpStream, name: &str) -> io::Result<u64> {
    sock.set_read_timeout(Some(IDLE_TIMEOUT))?;
    sock.set_write_timeout(Some(IDLE_TIMEOUT))?;
    sock.write_all(format!("{name}\n").as_bytes())?;
    let mut buf = [0u8; 16 * 1024];
    let mut echoed = 0u64;
    loop {
        let n = sock.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sock.write_all(&buf[..n])?;
        echoed += n as u64;
    }
    // The peer is done sending and has everything we echoed: close both ways.
    let _ = sock.shutdown(Shutdown::Both);
    Ok(echoed)
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("upstream: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(opts.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("upstream: cannot listen on {}: {e}", opts.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!("upstream {} listening on {}", opts.name, opts.listen);
    for conn in listener.incoming() {
        let sock = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of fds or similar: say so, wait a little, keep serving.
                eprintln!("upstream {}: accept failed: {e}", opts.name);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let name = opts.name.clone();
        let verbose = opts.verbose;
        let spawned = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let peer = sock.peer_addr().ok();
                let result = serve(sock, &name);
                if verbose {
                    match (peer, result) {
                        (Some(p), Ok(n)) => {
                            eprintln!("upstream {name}: {p} done, {n} bytes echoed")
                        }
                        (Some(p), Err(e)) => eprintln!("upstream {name}: {p} ended: {e}"),
                        (None, _) => {}
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("upstream {}: cannot start a thread: {e}", opts.name);
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn listen_and_name_are_read_in_both_spellings() {
        for args in [
            &["--listen", "127.0.0.1:9001", "--name", "web1"][..],
            &["--listen=127.0.0.1:9001", "--name=web1"][..],
            &["-n", "web1", "-l", "127.0.0.1:9001"][..],
        ] {
            match parse(args) {
                Ok(Parsed::Run(o)) => {
                    assert_eq!(o.listen, "127.0.0.1:9001".parse().unwrap());
                    assert_eq!(o.name, "web1");
                }
                _ => panic!("{args:?} should parse"),
            }
        }
    }

    #[test]
    fn the_name_defaults_to_the_address_and_listen_is_required() {
        match parse(&["--listen", "127.0.0.1:9001"]) {
            Ok(Parsed::Run(o)) => assert_eq!(o.name, "127.0.0.1:9001"),
            _ => panic!("should parse"),
        }
        assert!(parse(&[]).is_err());
        assert!(parse(&["--listen", "nowhere"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn it_greets_then_echoes_until_eof() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            serve(sock, "web9").unwrap()
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(b"ping\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "web9\nping\n");
        assert_eq!(server.join().unwrap(), 5);
    }
}
