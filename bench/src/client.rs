//! The client modes: handshakes, throughput, latency, hold. Each prints human text and one
//! `RESULT key=value ...` line. Every socket has read/write timeouts and every loop a deadline,
//! so a run always ends.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use rustls::{ClientConnection, Connection, HandshakeKind};

use crate::args::{parse_size, Args};
use crate::procfs;
use crate::stream::{Buffers, Stream};
use crate::tlsconf::{self, ClientTls};

/// Flags every client mode takes.
pub const COMMON_FLAGS: &[&str] = &[
    "target",
    "label",
    "cert",
    "key",
    "ca",
    "server-name",
    "kx",
    "timeout",
    "pid",
];

/// What every client mode needs: where, as whom, how long to wait.
#[derive(Clone)]
pub struct Common {
    pub(crate) target: SocketAddr,
    pub(crate) label: String,
    pub(crate) tls: ClientTls,
    pub(crate) timeout: Duration,
    /// The target's process (`--pid`): its CPU time is measured over the timed part.
    pub(crate) pid: Option<u32>,
}

impl Common {
    pub fn from_args(args: &Args) -> Result<Common, String> {
        let target_text = args.required("target")?;
        let target = target_text
            .to_socket_addrs()
            .map_err(|e| format!("--target {target_text}: {e}"))?
            .next()
            .ok_or_else(|| format!("--target {target_text}: no address"))?;
        Ok(Common {
            target,
            label: args.get("label").unwrap_or(target_text).to_string(),
            tls: tlsconf::client_from_args(args)?,
            timeout: Duration::from_secs_f64(args.parse_or("timeout", 10.0f64)?),
            pid: match args.get("pid") {
                None => None,
                Some(p) => Some(p.parse().map_err(|_| format!("--pid {p}: not a pid"))?),
            },
        })
    }

    /// The target's CPU seconds so far, if `--pid` was given and is readable.
    pub(crate) fn cpu(&self) -> Option<f64> {
        self.pid.and_then(procfs::cpu_seconds)
    }

    /// Connects and completes the mTLS handshake.
    fn connect(&self, buffers: Buffers) -> io::Result<Stream> {
        self.connect_with(buffers, &[])
    }

    /// Connects; `first` (if not empty) is queued before the handshake, so it leaves in the
    /// same TCP segment as the client's Finished, as an eager client's first request does.
    fn connect_with(&self, buffers: Buffers, first: &[u8]) -> io::Result<Stream> {
        let sock = TcpStream::connect_timeout(&self.target, self.timeout)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(self.timeout))?;
        sock.set_write_timeout(Some(self.timeout))?;
        let mut conn = ClientConnection::new(self.tls.config.clone(), self.tls.server_name.clone())
            .map_err(io::Error::other)?;
        if !first.is_empty() {
            io::Write::write_all(&mut conn.writer(), first)?;
        }
        let mut s = Stream::tls(Connection::Client(conn), sock, buffers);
        s.handshake()?;
        Ok(s)
    }
}

/// Prints the machine-readable line.
pub(crate) fn result(fields: &[(&str, String)]) {
    let mut line = String::from("RESULT");
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(&v.replace(char::is_whitespace, "_"));
    }
    println!("{line}");
}

/// "cpu_s" and a per-unit figure, from CPU readings before and after the timed part.
pub(crate) fn cpu_fields(
    before: Option<f64>,
    after: Option<f64>,
    per: f64,
    key: &'static str,
    scale: f64,
) -> Vec<(&'static str, String)> {
    match (before, after) {
        (Some(b), Some(a)) if per > 0.0 => vec![
            ("cpu_s", format!("{:.2}", a - b)),
            (key, format!("{:.1}", (a - b) * scale / per)),
        ],
        _ => Vec::new(),
    }
}

/// A short, countable description of an error.
pub(crate) fn error_kind(e: &io::Error) -> String {
    let text = e.to_string();
    let text: String = text.chars().take(80).collect();
    format!("{:?}: {text}", e.kind())
}

pub(crate) fn print_cpu(cpu: &[(&str, String)], per: &str) {
    if let [(_, total), (key, value)] = cpu {
        println!("  target CPU: {total} s over the timed part; {value} {key} ({per})");
    }
}

pub(crate) fn print_errors(errors: &BTreeMap<String, u64>) {
    for (kind, n) in errors {
        println!("  failure x{n}: {kind}");
    }
}

/// The value at quantile `q` (0..=1) of sorted `v`: nearest rank.
pub fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn describe(s: &Stream) -> String {
    s.tls_conn()
        .map(|c| tlsconf::describe(c))
        .unwrap_or_else(|| "-".into())
}

// ---------------------------------------------------------------------------------------------

pub const HANDSHAKES_FLAGS: &[&str] = &["threads", "duration", "resume"];

/// One connection: handshake, the greeting line, close. Returns the negotiated suite/group and
/// whether the handshake resumed a session.
fn one_handshake(c: &Common) -> io::Result<(String, bool)> {
    let mut s = c.connect(Buffers::Small)?;
    let mut line = Vec::with_capacity(3);
    // The server's TLS 1.3 tickets come before the greeting, so reading it also stores them.
    s.read_exact_into(3, &mut line)?;
    if line != b"ok\n" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected greeting {line:?}"),
        ));
    }
    let desc = describe(&s);
    let resumed = s
        .tls_conn()
        .and_then(|conn| conn.handshake_kind())
        .is_some_and(|kind| kind == HandshakeKind::Resumed);
    s.close_write()?;
    Ok((desc, resumed))
}

#[derive(Default)]
struct HandshakeTally {
    ok: u64,
    resumed: u64,
    failed: u64,
    micros: Vec<u64>,
    errors: BTreeMap<String, u64>,
    desc: Option<String>,
}

impl HandshakeTally {
    fn failure(&mut self, e: &io::Error) {
        self.failed += 1;
        *self.errors.entry(error_kind(e)).or_default() += 1;
    }
}

/// `handshakes`: each thread loops connect, TLS 1.3 handshake with the client certificate,
/// read `ok\n`, close. Without `--resume` every handshake is a full one. With `--resume`
/// each thread keeps its own session store (`ClientTls::with_session_store`), makes one full
/// handshake before the timed part, and then offers a ticket on every connection, as a real
/// client that reconnects does; the run counts how many resumed.
pub fn handshakes(args: &Args) -> Result<(), String> {
    let c = Common::from_args(args)?;
    let threads: usize = args.parse_or("threads", 4)?.max(1);
    let duration = Duration::try_from_secs_f64(args.parse_or("duration", 5.0f64)?)
        .ok()
        .filter(|d| Instant::now().checked_add(*d).is_some())
        .ok_or("--duration: expected a number of seconds, 0 or more")?;
    let resume = args.has("resume");
    // Every thread is ready (and with --resume holds a ticket) before the clock starts.
    let ready = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let mut c = c.clone();
        let ready = ready.clone();
        handles.push(std::thread::spawn(move || {
            let mut t = HandshakeTally::default();
            if resume {
                c.tls = c.tls.with_session_store();
                if let Err(e) = one_handshake(&c) {
                    t.failure(&e);
                }
            }
            ready.wait();
            // Checked above: now + duration fits an Instant.
            let deadline = Instant::now()
                .checked_add(duration)
                .unwrap_or_else(Instant::now);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match one_handshake(&c) {
                    Ok((desc, resumed)) => {
                        t.ok += 1;
                        t.resumed += u64::from(resumed);
                        t.micros.push(t0.elapsed().as_micros() as u64);
                        t.desc.get_or_insert(desc);
                    }
                    Err(e) => {
                        t.failure(&e);
                        // A refusing target answers at once; do not spin on it.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            t
        }));
    }
    ready.wait();
    let cpu_before = c.cpu();
    let start = Instant::now();
    let mut total = HandshakeTally::default();
    for h in handles {
        let t = h.join().map_err(|_| "a handshake thread panicked")?;
        total.ok += t.ok;
        total.resumed += t.resumed;
        total.failed += t.failed;
        total.micros.extend(t.micros);
        for (k, n) in t.errors {
            *total.errors.entry(k).or_default() += n;
        }
        if total.desc.is_none() {
            total.desc = t.desc;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_fields(cpu_before, c.cpu(), total.ok as f64, "cpu_us_per_conn", 1e6);
    let rate = total.ok as f64 / elapsed;
    let resumed_pct = if total.ok == 0 {
        0.0
    } else {
        100.0 * total.resumed as f64 / total.ok as f64
    };
    total.micros.sort_unstable();
    let p50 = quantile(&total.micros, 0.5);
    let p99 = quantile(&total.micros, 0.99);
    let desc = total.desc.unwrap_or_else(|| "-".into());
    let mode = if resume { "resuming" } else { "full" };
    println!(
        "handshakes {} ({mode}): {} ok, {} failed in {elapsed:.2}s with {threads} thread(s): \
         {rate:.1} conn/s, {} resumed ({resumed_pct:.1}%) (connect+handshake+greeting p50 {p50} \
         us, p99 {p99} us; {desc})",
        c.label, total.ok, total.failed, total.resumed
    );
    print_cpu(&cpu, "per connection");
    print_errors(&total.errors);
    let mut fields = vec![
        ("mode", "handshakes".into()),
        ("target", c.label.clone()),
        ("value", format!("{rate:.1}")),
        ("unit", "conn/s".into()),
        ("failures", total.failed.to_string()),
        ("threads", threads.to_string()),
        ("resume", resume.to_string()),
        ("resumed", total.resumed.to_string()),
        ("full", (total.ok - total.resumed).to_string()),
        ("resumed_pct", format!("{resumed_pct:.1}")),
        ("p50_us", p50.to_string()),
        ("p99_us", p99.to_string()),
        ("tls", desc),
    ];
    fields.extend(cpu);
    result(&fields);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

pub const THROUGHPUT_FLAGS: &[&str] = &[
    "connections",
    "bytes",
    "direction",
    "max-secs",
    "first-write-delay",
    "with-finished",
];

/// `--first-write-delay MS`: pause between the handshake and the first byte sent, outside
/// the timed part. Zero by default. A server that leaves plaintext which arrived with the
/// client's last handshake flight sitting in its TLS buffer until more bytes come (so a client
/// that speaks first right after the handshake waits for ever) shows up as failures; this is
/// the knob that tells that case apart from a slow data path.
fn first_write_delay(args: &Args) -> Result<Duration, String> {
    Ok(Duration::from_millis(
        args.parse_or("first-write-delay", 0u64)?,
    ))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Up,
    Down,
}

/// Moves `n` bytes over an established connection. Returns the plaintext bytes moved and the
/// instant the transfer was complete (the upstream had it all, or the client received it all).
fn transfer(
    s: &mut Stream,
    dir: Direction,
    n: u64,
    deadline: Instant,
    header_sent: bool,
) -> io::Result<u64> {
    let too_long = || io::Error::new(io::ErrorKind::TimedOut, "--max-secs passed");
    match dir {
        Direction::Up => {
            let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
            let mut left = n;
            while left > 0 {
                if Instant::now() > deadline {
                    return Err(too_long());
                }
                let k = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k])?;
                left -= k as u64;
            }
            // close_notify + FIN; the sink reads to EOF and closes, which comes back to us as
            // the balancer closing: only then has the upstream received everything.
            s.close_write()?;
            let back = s.drain()?;
            if back != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("sink sent {back} bytes"),
                ));
            }
            Ok(n)
        }
        Direction::Down => {
            if !header_sent {
                s.write_all(&n.to_be_bytes())?;
            }
            let mut got = 0u64;
            while s.read_some(&mut |b| got += b.len() as u64)? {
                if Instant::now() > deadline {
                    return Err(too_long());
                }
            }
            if got != n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("received {got} of {n} bytes"),
                ));
            }
            let _ = s.close_write();
            Ok(got)
        }
    }
}

pub fn throughput(args: &Args) -> Result<(), String> {
    let c = Common::from_args(args)?;
    let conns: usize = args.parse_or("connections", 1)?;
    let bytes = parse_size(args.get("bytes").unwrap_or("256M"))?;
    let dir = match args.get("direction").unwrap_or("up") {
        "up" => Direction::Up,
        "down" => Direction::Down,
        other => return Err(format!("--direction {other}: expected up|down")),
    };
    let max = Duration::from_secs_f64(args.parse_or("max-secs", 120.0f64)?);
    let delay = first_write_delay(args)?;
    // `--with-finished` (down only): the size request goes out with the client's Finished.
    // A reproducer for servers that strand such bytes, not a way to measure throughput (the
    // source starts before the timed part).
    let with_finished = args.has("with-finished") && dir == Direction::Down;
    let conns = conns.max(1);
    // Everyone (connections and this thread) starts moving bytes at the same moment, after
    // every handshake is done: the figure is about the data path, not handshakes.
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let c = c.clone();
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let connected = if with_finished {
                c.connect_with(Buffers::Large, &bytes.to_be_bytes())
            } else {
                c.connect(Buffers::Large)
            };
            std::thread::sleep(delay);
            barrier.wait();
            let mut s = connected?;
            let desc = describe(&s);
            let deadline = Instant::now() + max;
            let moved = transfer(&mut s, dir, bytes, deadline, with_finished)?;
            Ok::<_, io::Error>((moved, Instant::now(), desc))
        }));
    }
    // The clock and the CPU reading start before the transfers are released: taken after, a
    // transfer fast enough to finish first would be measured as taking no time at all.
    let cpu_before = c.cpu();
    let start = Instant::now();
    barrier.wait();
    let mut moved = 0u64;
    let mut end = start;
    let mut failures = 0u64;
    let mut errors = BTreeMap::new();
    let mut desc = String::from("-");
    for h in handles {
        match h.join().map_err(|_| "a transfer thread panicked")? {
            Ok((n, done, d)) => {
                moved += n;
                end = end.max(done);
                desc = d;
            }
            Err(e) => {
                failures += 1;
                end = end.max(Instant::now());
                *errors.entry(error_kind(&e)).or_default() += 1;
            }
        }
    }
    let secs = (end - start).as_secs_f64().max(1e-9);
    let cpu = cpu_fields(
        cpu_before,
        c.cpu(),
        moved as f64 / (1u64 << 30) as f64,
        "cpu_s_per_gib",
        1.0,
    );
    let gbps = moved as f64 * 8.0 / secs / 1e9;
    let d = match dir {
        Direction::Up => "up",
        Direction::Down => "down",
    };
    println!(
        "throughput {} {d} x{conns}: {moved} plaintext bytes in {secs:.3}s = {gbps:.3} Gbit/s \
         ({failures} failed; {desc})",
        c.label
    );
    print_cpu(&cpu, "per GiB of plaintext");
    print_errors(&errors);
    let mut fields = vec![
        ("mode", "throughput".into()),
        ("direction", d.into()),
        ("connections", conns.to_string()),
        ("target", c.label.clone()),
        ("value", format!("{gbps:.3}")),
        ("unit", "Gbit/s".into()),
        ("failures", failures.to_string()),
        ("bytes", moved.to_string()),
        ("secs", format!("{secs:.3}")),
        ("tls", desc),
    ];
    fields.extend(cpu);
    result(&fields);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

pub const LATENCY_FLAGS: &[&str] = &["count", "size", "warmup", "first-write-delay"];

pub fn latency(args: &Args) -> Result<(), String> {
    let c = Common::from_args(args)?;
    let count: usize = args.parse_or("count", 10_000)?;
    let size: usize = args.parse_or("size", 64)?;
    let warmup: usize = args.parse_or("warmup", 1000)?;
    let delay = first_write_delay(args)?;
    let run = || -> io::Result<(Vec<u64>, String)> {
        let mut s = c.connect(Buffers::Small)?;
        std::thread::sleep(delay);
        let desc = describe(&s);
        let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut back = Vec::with_capacity(size);
        let mut nanos = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t0 = Instant::now();
            s.write_all(&msg)?;
            back.clear();
            s.read_exact_into(size, &mut back)?;
            let dt = t0.elapsed().as_nanos() as u64;
            if back != msg {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
            }
            if i >= warmup {
                nanos.push(dt);
            }
        }
        let _ = s.close_write();
        Ok((nanos, desc))
    };
    let (mut nanos, desc, failures) = match run() {
        Ok((n, d)) => (n, d, 0),
        Err(e) => {
            println!("latency {}: failed: {}", c.label, error_kind(&e));
            (Vec::new(), "-".into(), 1)
        }
    };
    nanos.sort_unstable();
    let us = |q: f64| quantile(&nanos, q) as f64 / 1000.0;
    let (p50, p99, p999) = (us(0.5), us(0.99), us(0.999));
    let max = nanos.last().copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "latency {}: {} round trips of {size} bytes (after {warmup} warm-up): p50 {p50:.1} us, \
         p99 {p99:.1} us, p99.9 {p999:.1} us, max {max:.1} us ({desc})",
        c.label,
        nanos.len()
    );
    result(&[
        ("mode", "latency".into()),
        ("target", c.label.clone()),
        ("value", format!("{p50:.1}")),
        ("unit", "us".into()),
        ("failures", failures.to_string()),
        ("p50", format!("{p50:.1}")),
        ("p99", format!("{p99:.1}")),
        ("p999", format!("{p999:.1}")),
        ("max", format!("{max:.1}")),
        ("count", nanos.len().to_string()),
        ("size", size.to_string()),
        ("tls", desc),
    ]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

pub const HOLD_FLAGS: &[&str] = &["connections", "threads", "settle", "drain", "max-secs"];

/// Kernel stack of one thread on x86_64 (THREAD_SIZE): not in RSS, but real memory.
const KERNEL_STACK_KIB: u64 = 16;

pub fn hold(args: &Args) -> Result<(), String> {
    let c = Common::from_args(args)?;
    let n: usize = args.parse_or("connections", 2000)?;
    let pid: u32 = args
        .required("pid")?
        .parse()
        .map_err(|_| "--pid: not a pid")?;
    let threads: usize = args.parse_or("threads", 4)?;
    let settle = Duration::from_secs_f64(args.parse_or("settle", 2.0f64)?);
    let drain_max = Duration::from_secs_f64(args.parse_or("drain", 15.0f64)?);
    let open_max = Duration::from_secs_f64(args.parse_or("max-secs", 120.0f64)?);
    let needed = n as u64 + 64;
    let soft = procfs::ensure_nofile(needed);
    if soft < needed {
        return Err(format!(
            "holding {n} connections needs {needed} open files, the limit is {soft}: run \
             `ulimit -n {needed}` (or higher) first"
        ));
    }
    let before = procfs::usage(pid)?;
    let tcp_before = procfs::tcp_mem_kib();
    let held: Arc<Mutex<Vec<Stream>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let t0 = Instant::now();
    let open_deadline = t0 + open_max;
    let mut handles = Vec::new();
    let threads = threads.clamp(1, n.max(1));
    for t in 0..threads {
        let share = n / threads + usize::from(t < n % threads);
        let (c, held, errors) = (c.clone(), held.clone(), errors.clone());
        handles.push(std::thread::spawn(move || {
            for _ in 0..share {
                if Instant::now() > open_deadline {
                    *errors.lock().entry("--max-secs passed".into()).or_default() += 1;
                    continue;
                }
                let opened = c.connect(Buffers::Small).and_then(|mut s| {
                    let mut line = Vec::with_capacity(3);
                    s.read_exact_into(3, &mut line)?;
                    Ok(s)
                });
                match opened {
                    Ok(s) => held.lock().push(s),
                    Err(e) => *errors.lock().entry(error_kind(&e)).or_default() += 1,
                }
            }
        }));
    }
    for h in handles {
        h.join().map_err(|_| "an opening thread panicked")?;
    }
    let open_secs = t0.elapsed().as_secs_f64();
    // Let the balancer finish what the last connections started (threads, upstream connects).
    std::thread::sleep(settle);
    let after = procfs::usage(pid)?;
    let tcp_after = procfs::tcp_mem_kib();
    let served = held.lock().len() as u64;
    let failures = n as u64 - served;
    let per = |kib: i64| {
        if served == 0 {
            0.0
        } else {
            kib as f64 / served as f64
        }
    };
    let rss = per(after.rss_kib as i64 - before.rss_kib as i64);
    let pte = per(after.pte_kib as i64 - before.pte_kib as i64);
    let new_threads = after.threads as i64 - before.threads as i64;
    let kstack = per(new_threads * KERNEL_STACK_KIB as i64);
    let tcp = match (tcp_before, tcp_after) {
        (Some(a), Some(b)) => format!("{:.1}", per(b as i64 - a as i64)),
        _ => "-".into(),
    };
    // Close everything, then wait for the balancer to let go of its threads.
    let streams = std::mem::take(&mut *held.lock());
    for mut s in streams {
        let _ = s.close_write();
    }
    // Threads from a pool may outlive their connections, so stop waiting once the count has
    // not moved for two seconds.
    let closed_at = Instant::now();
    let mut drained = false;
    let mut threads_left = after.threads;
    let mut last_change = Instant::now();
    while closed_at.elapsed() < drain_max {
        match procfs::usage(pid) {
            Ok(u) if u.threads <= before.threads + 2 => {
                drained = true;
                threads_left = u.threads;
                break;
            }
            Ok(u) => {
                if u.threads != threads_left {
                    threads_left = u.threads;
                    last_change = Instant::now();
                } else if last_change.elapsed() > Duration::from_secs(2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => break,
        }
    }
    let drain_secs = closed_at.elapsed().as_secs_f64();
    println!(
        "hold {}: {served} of {n} connections held (opened in {open_secs:.1}s); pid {pid} \
         ({} process(es)): RSS {} -> {} KiB = {rss:.1} KiB/conn; threads {} -> {} ({:.2}/conn); \
         kernel, estimated: page tables {pte:.2} KiB/conn + thread kernel stacks {kstack:.1} \
         KiB/conn (16 KiB x new threads); host TCP socket buffers {tcp} KiB/conn (all sockets, \
         both ends); {} after closing ({drain_secs:.1}s)",
        c.label,
        after.processes,
        before.rss_kib,
        after.rss_kib,
        before.threads,
        after.threads,
        per(new_threads),
        if drained {
            "threads back to baseline".to_string()
        } else {
            format!("{threads_left} threads still there (a pool keeping idle threads?)")
        },
    );
    print_errors(&errors.lock());
    result(&[
        ("mode", "hold".into()),
        ("target", c.label.clone()),
        ("value", format!("{rss:.1}")),
        ("unit", "KiB/conn".into()),
        ("failures", failures.to_string()),
        ("served", served.to_string()),
        ("requested", n.to_string()),
        ("rss_before_kib", before.rss_kib.to_string()),
        ("rss_after_kib", after.rss_kib.to_string()),
        ("threads_before", before.threads.to_string()),
        ("threads_after", after.threads.to_string()),
        ("pte_kib_per_conn", format!("{pte:.2}")),
        ("kstack_kib_per_conn", format!("{kstack:.1}")),
        ("kernel_kib_per_conn", format!("{:.1}", pte + kstack)),
        ("tcp_mem_kib_per_conn", tcp),
        ("drained", drained.to_string()),
        ("threads_left", threads_left.to_string()),
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500);
        assert_eq!(quantile(&v, 0.99), 990);
        assert_eq!(quantile(&v, 0.999), 999);
        assert_eq!(quantile(&v, 1.0), 1000);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.0), 7);
    }
}
