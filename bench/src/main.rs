//! `lclb-bench`: the benchmark instrument for lclb and its peers (HAProxy, NGINX).
//!
//! Synchronous and multi-threaded, like lclb itself: a rustls client with a client
//! certificate that measures handshakes/s, bulk throughput, round-trip latency and the memory a
//! balancer spends per held connection; and a thread-per-connection server that plays the
//! upstreams (greeting, echo, sink, source), or with `--tls` terminates mTLS itself (the
//! "no hop" reference). The loaded mode is the exception: one event loop (mio) drives its
//! thousand connections, so that the client does not take the target's cores. Each client run
//! prints human text and one `RESULT key=value ...` line that `scripts/bench.sh` collects. See
//! BENCHMARKS.md.

#![forbid(unsafe_code)]

mod args;
mod client;
mod loaded;
mod procfs;
mod server;
mod stream;
mod tlsconf;

use std::process::ExitCode;

use args::Args;

const USAGE: &str = "\
lclb-bench: benchmark instrument for lclb (see BENCHMARKS.md)

Usage:
  lclb-bench server --mode greeting|echo|sink|source --listen ADDR
                    [--tls CERT KEY CA] [--bytes N] [--idle SECS] [--lifetime SECS]
  lclb-bench handshakes --target ADDR [--threads 4] [--duration 5] [--resume] CLIENT
  lclb-bench throughput --target ADDR [--connections 1] [--bytes 256M]
                        [--direction up|down] [--max-secs 120] [--first-write-delay MS]
                        [--with-finished] CLIENT
  lclb-bench latency    --target ADDR [--count 10000] [--size 64] [--warmup 1000]
                        [--first-write-delay MS] CLIENT
  lclb-bench loaded     --target ADDR [--connections 1000] [--rate 20000] [--duration 20]
                        [--size 64] [--warmup 2] [--open-secs 60] [--pid PID] CLIENT
  lclb-bench hold       --target ADDR --pid PID [--connections 2000] [--threads 4]
                        [--settle 2] [--drain 15] [--max-secs 120] CLIENT

CLIENT: --cert CRT --key KEY --ca CA [--server-name localhost] [--kx x25519]
        [--label NAME] [--timeout 10] [--pid PID]

loaded opens all its connections (64 handshakes at a time) before the clock starts, then sends
--rate echo round trips per second in total, evenly spread over them, open loop: each round
trip's latency runs from its scheduled time to the end of its echo, so a stall of the target
is not hidden; one thread (an event loop) drives them all. Its RESULT value is p99 (us).

--pid names the target's process: its CPU time (with its children's: NGINX workers) over the
timed part is reported per connection or per GiB; hold reads its memory and threads.

server modes: greeting writes \"ok\\n\" and closes when the client does; echo echoes; sink
reads to EOF and closes; source writes N bytes (--bytes, else the first 8 bytes the client
sends, big-endian) and closes. With --tls the server terminates mTLS with lclb's own TLS
configuration (the no-hop target, or a TLS upstream) and prints a line `TLS-TALLY full=F
hrr=H resumed=R params=...` (running totals of its handshakes) each second some completed.
It exits by itself after --lifetime (default 7200 s).

Client modes use TLS 1.3 with no session resumption, except handshakes --resume: each
thread keeps rustls' default in-memory session store, makes one full handshake before the
timed part, then offers its latest ticket on every connection; the run reports the share
that resumed (`resumed_pct`). --kx limits the key exchange to one
group (x25519, the default, which every peer supports; x25519mlkem768; p256; or default =
rustls' list). Every run prints one line `RESULT mode=... target=LABEL value=... unit=...
failures=N ...`.
";

fn run(argv: &[String]) -> Result<(), String> {
    let Some(sub) = argv.first() else {
        return Err("a subcommand is required (see --help)".into());
    };
    let rest = &argv[1..];
    let with_common = |extra: &'static [&'static str]| -> Vec<&'static str> {
        client::COMMON_FLAGS.iter().chain(extra).copied().collect()
    };
    let parse = |allowed: &[&str]| -> Result<Args, String> {
        let a = Args::parse(rest, allowed)?;
        if a.has("help") {
            print!("{USAGE}");
            std::process::exit(0);
        }
        Ok(a)
    };
    match sub.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        "server" => server::run(&parse(server::FLAGS)?),
        "handshakes" => client::handshakes(&parse(&with_common(client::HANDSHAKES_FLAGS))?),
        "throughput" => client::throughput(&parse(&with_common(client::THROUGHPUT_FLAGS))?),
        "latency" => client::latency(&parse(&with_common(client::LATENCY_FLAGS))?),
        "loaded" => loaded::loaded(&parse(&with_common(loaded::LOADED_FLAGS))?),
        "hold" => client::hold(&parse(&with_common(client::HOLD_FLAGS))?),
        other => Err(format!("unknown subcommand {other:?} (see --help)")),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lclb-bench: {e}");
            ExitCode::from(2)
        }
    }
}
