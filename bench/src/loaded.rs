//! The `loaded` mode: latency while many connections are busy at once.
//!
//! N mTLS connections are opened and handshaken before the clock starts; then small echo round
//! trips go out at a fixed aggregate rate, slot after slot, each slot on the next connection in
//! turn (slot `s` on connection `s % N`, at `s / rate` seconds), so every connection sends every
//! `N / rate` seconds and the target sees an even stream. The load is open loop: each round trip
//! has its scheduled time and its latency runs from that time to the moment its whole echo is
//! back. A connection has at most one round trip on the wire; one that falls due while the
//! previous echo is still out waits and goes as soon as that echo is back, still timed from its
//! own schedule, so a target that stalls shows its stall in the figures instead of slowing the
//! client down (coordinated omission).
//!
//! One thread drives every connection (a mio event loop over non-blocking sockets, rustls'
//! buffered `ClientConnection`), and one more sleeps to read the target's CPU time at the edges
//! of the timed part, so the client does not crowd the target off the machine's cores with a
//! thread per connection. How late the loop itself got to each round trip, against the
//! schedule, is reported as a check of the instrument: the client's own share of the latency.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use rustls::ClientConnection;

use crate::args::Args;
use crate::client::{self, quantile, Common};
use crate::procfs;
use crate::tlsconf;

/// Flags of `lclb-bench loaded` (besides the common ones).
pub const LOADED_FLAGS: &[&str] = &[
    "connections",
    "duration",
    "rate",
    "size",
    "warmup",
    "open-secs",
];

/// Connections being opened (TCP connect plus TLS handshake) at once before the clock starts.
/// Opening all of them in one burst would overflow listen backlogs (NGINX's is 511) and
/// measure SYN retries rather than anything of interest; the figure is about open connections.
const OPEN_AT_ONCE: usize = 64;

/// Events handled between two looks at the schedule.
const DISPATCH_EVERY: usize = 32;

/// When slot `slot` is due, counted from the clock start, at `rate` slots per second.
fn slot_offset(slot: u64, rate: f64) -> Duration {
    Duration::try_from_secs_f64(slot as f64 / rate).unwrap_or(Duration::MAX)
}

/// Slots in `secs` seconds at `rate` per second.
fn slots_in(secs: f64, rate: f64) -> u64 {
    (secs * rate).round() as u64
}

/// One round trip: when it was due and whether it belongs to the timed part.
#[derive(Clone, Copy, Debug)]
struct Trip {
    due: Instant,
    measured: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// TLS handshake in progress.
    Handshaking,
    /// Carrying round trips.
    Ready,
    /// Failed or closed; deregistered.
    Ended,
}

/// What every connection reports into: the message, the window and the tallies.
struct Run {
    msg: Vec<u8>,
    window_start: Instant,
    window_end: Instant,
    /// Latency of each measured round trip, nanoseconds, from its scheduled time.
    samples: Vec<u64>,
    /// How late the loop got to each measured round trip (sent it, or queued it behind its
    /// connection's echo), nanoseconds: the client's own share of the latency.
    late: Vec<u64>,
    /// Round trips (any) whose echo came back inside the timed part.
    completed_in_window: u64,
    /// Round trips sent or waiting to be sent whose echo is not back yet.
    pending: u64,
    /// Measured round trips whose connection ended before their echo came back.
    lost: u64,
}

impl Run {
    fn complete(&mut self, trip: Trip, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        if trip.measured {
            let ns = now.saturating_duration_since(trip.due).as_nanos();
            self.samples.push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        if now >= self.window_start && now < self.window_end {
            self.completed_in_window += 1;
        }
    }
}

/// The open-loop schedule: slot `s` is due at `t0 + s / rate`, on the ready connection
/// `s % ready.len()`; slots from `warm` on are measured, up to `total`.
struct Schedule {
    t0: Instant,
    rate: f64,
    next: u64,
    warm: u64,
    total: u64,
}

impl Schedule {
    fn next_due(&self) -> Option<Instant> {
        if self.next >= self.total {
            return None;
        }
        self.t0.checked_add(slot_offset(self.next, self.rate))
    }

    /// Sends every round trip due by `now` whose connection is free, and queues the others
    /// behind their connection's echo. Returns why connections ended on the way.
    fn dispatch(
        &mut self,
        now: Instant,
        conns: &mut [Conn],
        ready: &[usize],
        run: &mut Run,
        poll: &Poll,
    ) -> Vec<String> {
        let mut ended = Vec::new();
        while let Some(due) = self.next_due().filter(|due| *due <= now) {
            let measured = self.next >= self.warm;
            let conn = &mut conns[ready[(self.next % ready.len() as u64) as usize]];
            self.next += 1;
            let trip = Trip { due, measured };
            if measured {
                let late = now.saturating_duration_since(due).as_nanos();
                run.late.push(u64::try_from(late).unwrap_or(u64::MAX));
            }
            if conn.phase != Phase::Ready {
                run.lost += u64::from(measured);
                continue;
            }
            run.pending += 1;
            if conn.in_flight.is_some() {
                conn.waiting.push_back(trip);
                continue;
            }
            if let Err(why) = conn.send(trip, &run.msg) {
                conn.end(poll, run);
                ended.push(why);
            }
        }
        if self.next < self.total && self.next_due().is_none() {
            // Past what an Instant can hold: nothing more will fall due.
            self.next = self.total;
        }
        ended
    }
}

/// The loop's alarm clock: a timerfd in the poll, armed for the next due round trip. A poll
/// timeout would do, but it is counted in whole milliseconds, rounded up; the timer wakes the
/// loop within microseconds of the schedule.
struct Alarm {
    fd: OwnedFd,
    armed: Option<Instant>,
}

/// The alarm's token; connections' tokens are their indexes.
const ALARM: Token = Token(usize::MAX);

impl Alarm {
    fn new(poll: &Poll) -> io::Result<Alarm> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        poll.registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), ALARM, Interest::READABLE)?;
        Ok(Alarm { fd, armed: None })
    }

    /// Rings at `at` (or at once if that has passed), unless it is already set for then.
    fn set(&mut self, at: Instant, now: Instant) -> io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // A zero it_value disarms the timer; the earliest it can ring is 1 ns from now.
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let it_value = Timespec::try_from(wait).map_err(io::Error::other)?;
        let spec = Itimerspec {
            it_interval: Timespec::default(),
            it_value,
        };
        timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec)?;
        self.armed = Some(at);
        Ok(())
    }

    /// After it rang: reads the expiry count, so the next expiry is a new edge for the poll.
    fn clear(&mut self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut count);
        self.armed = None;
    }
}

/// One connection and its round trip state.
struct Conn {
    sock: TcpStream,
    tls: ClientConnection,
    phase: Phase,
    /// The round trip on the wire, if any.
    in_flight: Option<Trip>,
    /// Bytes of its echo back so far.
    got: usize,
    /// Round trips that fell due while one was on the wire, oldest first.
    waiting: VecDeque<Trip>,
}

impl Conn {
    /// Does what readiness allows: completes the connect, reads and decrypts what arrived
    /// (accounting echoes), writes what rustls has sealed. Err(reason) ends the connection.
    fn pump(&mut self, run: &mut Run) -> Result<(), String> {
        if self.phase == Phase::Connecting {
            if let Some(e) = self
                .sock
                .take_error()
                .map_err(|e| format!("connect: {e}"))?
            {
                return Err(format!("connect: {}", client::error_kind(&e)));
            }
            match self.sock.peer_addr() {
                Ok(_) => {
                    self.phase = Phase::Handshaking;
                    self.sock
                        .set_nodelay(true)
                        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {}", client::error_kind(&e))),
            }
        }
        self.read(run)?;
        self.flush()?;
        if self.phase == Phase::Handshaking && !self.tls.is_handshaking() {
            self.phase = Phase::Ready;
        }
        Ok(())
    }

    fn read(&mut self, run: &mut Run) -> Result<(), String> {
        let mut plain = [0u8; 4096];
        loop {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Err("closed by the target (EOF)".into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read: {}", client::error_kind(&e))),
            }
            if let Err(e) = self.tls.process_new_packets() {
                // The alert, best effort, so the target logs why.
                let _ = self.flush();
                return Err(format!("TLS: {e}"));
            }
            loop {
                match self.tls.reader().read(&mut plain) {
                    Ok(0) => return Err("closed by the target (close_notify)".into()),
                    Ok(k) => self.on_plaintext(&plain[..k], run)?,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("read: {}", client::error_kind(&e))),
                }
            }
        }
    }

    /// Echo bytes: checked against what was sent; a complete echo ends its round trip and
    /// lets the next waiting one go.
    fn on_plaintext(&mut self, mut bytes: &[u8], run: &mut Run) -> Result<(), String> {
        while !bytes.is_empty() {
            let Some(trip) = self.in_flight else {
                return Err(format!(
                    "{} bytes came back that were not sent",
                    bytes.len()
                ));
            };
            let take = (run.msg.len() - self.got).min(bytes.len());
            if bytes[..take] != run.msg[self.got..self.got + take] {
                return Err("the echo differs from what was sent".into());
            }
            self.got += take;
            bytes = &bytes[take..];
            if self.got == run.msg.len() {
                run.complete(trip, Instant::now());
                self.in_flight = None;
                self.got = 0;
                if !bytes.is_empty() {
                    return Err(format!(
                        "{} bytes came back that were not sent",
                        bytes.len()
                    ));
                }
                if let Some(next) = self.waiting.pop_front() {
                    self.send(next, &run.msg)?;
                }
            }
        }
        Ok(())
    }

    /// Seals `msg` and writes as much as the socket takes; the rest goes on the next
    /// writable event.
    fn send(&mut self, trip: Trip, msg: &[u8]) -> Result<(), String> {
        self.tls
            .writer()
            .write_all(msg)
            .map_err(|e| format!("seal: {e}"))?;
        self.in_flight = Some(trip);
        self.flush()
    }

    fn flush(&mut self) -> Result<(), String> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("write: {}", client::error_kind(&e))),
            }
        }
        Ok(())
    }

    /// Ends the connection: its unanswered round trips are lost.
    fn end(&mut self, poll: &Poll, run: &mut Run) {
        if self.phase == Phase::Ended {
            return;
        }
        let _ = poll.registry().deregister(&mut self.sock);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        for trip in self
            .in_flight
            .take()
            .into_iter()
            .chain(self.waiting.drain(..))
        {
            run.pending = run.pending.saturating_sub(1);
            run.lost += u64::from(trip.measured);
        }
        self.phase = Phase::Ended;
    }
}

/// CPU seconds of the target (`--pid`) and of this process at the start and the end of the
/// timed part, read on a thread of their own: walking /proc takes milliseconds, which the
/// event loop would otherwise spend late on its schedule.
type CpuReadings = [Option<f64>; 4];

fn cpu_sampler(
    pid: Option<u32>,
    start: Instant,
    end: Instant,
    stop: mpsc::Receiver<()>,
) -> std::thread::JoinHandle<CpuReadings> {
    let me = std::process::id();
    let read = move || (pid.and_then(procfs::cpu_seconds), procfs::cpu_seconds(me));
    let spawned = std::thread::Builder::new()
        .name("lclb-bench-cpu".into())
        .spawn(move || {
            let wait = |until: Instant| {
                stop.recv_timeout(until.saturating_duration_since(Instant::now()))
                    != Err(mpsc::RecvTimeoutError::Timeout)
            };
            if wait(start) {
                return [None; 4];
            }
            let (t0, m0) = read();
            // Stopped early (every connection ended) or not: the end reading is taken now.
            let _ = wait(end);
            let (t1, m1) = read();
            [t0, t1, m0, m1]
        });
    match spawned {
        Ok(h) => h,
        // No thread: no CPU figures, the run goes on.
        Err(_) => std::thread::spawn(|| [None; 4]),
    }
}

fn seconds(args: &Args, name: &str, default: f64) -> Result<f64, String> {
    let v: f64 = args.parse_or(name, default)?;
    if v.is_finite() && (0.0..=86_400.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "--{name}: expected a number of seconds from 0 to 86400"
        ))
    }
}

fn tally(errors: &mut BTreeMap<String, u64>, why: String) {
    *errors.entry(why).or_default() += 1;
}

/// `lclb-bench loaded`: see the module docs.
pub fn loaded(args: &Args) -> Result<(), String> {
    let c = Common::from_args(args)?;
    let n: usize = args.parse_or("connections", 1000)?;
    let rate: f64 = args.parse_or("rate", 20_000.0)?;
    let size: usize = args.parse_or("size", 64)?;
    let secs = seconds(args, "duration", 20.0)?;
    let warmup = seconds(args, "warmup", 2.0)?;
    let open_secs = seconds(args, "open-secs", 60.0)?;
    if n == 0 {
        return Err("--connections: at least 1".into());
    }
    if !(rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0) {
        return Err("--rate: expected round trips per second, above 0, at most 10000000".into());
    }
    if size == 0 || size > 16 * 1024 {
        return Err("--size: expected 1 to 16384 bytes (one TLS record)".into());
    }
    let needed = n as u64 + 64;
    let soft = procfs::ensure_nofile(needed);
    if soft < needed {
        return Err(format!(
            "{n} connections need {needed} open files, the limit is {soft}: run `ulimit -n \
             {needed}` (or higher) first"
        ));
    }

    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let now = Instant::now();
    let mut run = Run {
        msg: (0..size).map(|i| (i % 251) as u8).collect(),
        window_start: now,
        window_end: now,
        samples: Vec::new(),
        late: Vec::new(),
        completed_in_window: 0,
        pending: 0,
        lost: 0,
    };
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();

    // Open every connection, OPEN_AT_ONCE at a time, before the clock starts.
    let opened_at = Instant::now();
    let open_deadline = opened_at
        .checked_add(Duration::from_secs_f64(open_secs))
        .ok_or("--open-secs: too far ahead")?;
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    let (mut started, mut settled, mut open_failed) = (0usize, 0usize, 0u64);
    while settled < n {
        while started < n && started - settled < OPEN_AT_ONCE {
            started += 1;
            let opened = TcpStream::connect(c.target)
                .map_err(|e| format!("connect: {}", client::error_kind(&e)))
                .and_then(|mut sock| {
                    poll.registry()
                        .register(
                            &mut sock,
                            Token(conns.len()),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .map_err(|e| format!("epoll: {e}"))?;
                    let tls =
                        ClientConnection::new(c.tls.config.clone(), c.tls.server_name.clone())
                            .map_err(|e| format!("TLS: {e}"))?;
                    Ok(Conn {
                        sock,
                        tls,
                        phase: Phase::Connecting,
                        in_flight: None,
                        got: 0,
                        waiting: VecDeque::new(),
                    })
                });
            match opened {
                Ok(conn) => conns.push(conn),
                Err(why) => {
                    settled += 1;
                    open_failed += 1;
                    tally(&mut errors, why);
                }
            }
        }
        let now = Instant::now();
        if now >= open_deadline {
            break;
        }
        match poll.poll(&mut events, Some(open_deadline - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll: {e}")),
        }
        for ev in &events {
            let Some(conn) = conns.get_mut(ev.token().0) else {
                continue;
            };
            if conn.phase == Phase::Ended {
                continue;
            }
            // An open connection may still get session tickets; no plaintext is expected.
            let was_open = conn.phase == Phase::Ready;
            match conn.pump(&mut run) {
                Ok(()) => settled += usize::from(!was_open && conn.phase == Phase::Ready),
                Err(why) => {
                    conn.end(&poll, &mut run);
                    settled += usize::from(!was_open);
                    open_failed += 1;
                    tally(&mut errors, format!("opening: {why}"));
                }
            }
        }
    }
    for conn in conns
        .iter_mut()
        .filter(|c| matches!(c.phase, Phase::Connecting | Phase::Handshaking))
    {
        conn.end(&poll, &mut run);
        open_failed += 1;
        tally(&mut errors, "opening: not open within --open-secs".into());
    }
    // A connection that ended after it was open (counted in open_failed above) is skipped.
    let open_for = opened_at.elapsed().as_secs_f64();
    let ready: Vec<usize> = (0..conns.len())
        .filter(|&i| conns[i].phase == Phase::Ready)
        .collect();
    let desc = ready
        .first()
        .map(|&i| tlsconf::describe(&conns[i].tls))
        .unwrap_or_else(|| "-".into());

    // The schedule: slot s on ready[s % ready.len()] at t0 + s / rate.
    let warm_slots = slots_in(warmup, rate);
    let total_slots = warm_slots.saturating_add(slots_in(secs, rate));
    let t0 = Instant::now();
    let at = |slot: u64| t0.checked_add(slot_offset(slot, rate));
    let (Some(window_start), Some(window_end)) = (at(warm_slots), at(total_slots)) else {
        return Err("--duration and --warmup: too far ahead".into());
    };
    // The last echoes of the timed part may come back late: a target that fell behind is
    // given as long as the run lasted (at least --timeout) to catch up, so that its figures
    // say how far behind it was rather than nothing.
    let drain_deadline = window_end
        .checked_add(c.timeout.max(window_end.saturating_duration_since(t0)))
        .ok_or("--timeout: too far ahead")?;
    run.window_start = window_start;
    run.window_end = window_end;
    // Room for every sample of a usual run (400,000), so the timed part does not reallocate.
    run.samples
        .reserve(usize::try_from(slots_in(secs, rate)).map_or(0, |n| n.min(1 << 24)));
    let mut alarm = Alarm::new(&poll).map_err(|e| format!("timerfd: {e}"))?;
    let (stop_cpu, stop_rx) = mpsc::channel();
    let sampler = cpu_sampler(c.pid, window_start, window_end, stop_rx);
    let mut sched = Schedule {
        t0,
        rate,
        next: if ready.is_empty() { total_slots } else { 0 },
        warm: warm_slots,
        total: total_slots,
    };
    let mut closed = 0u64;
    let mut ended = |why: String, errors: &mut BTreeMap<String, u64>| {
        closed += 1;
        tally(errors, why);
    };
    loop {
        let now = Instant::now();
        for why in sched.dispatch(now, &mut conns, &ready, &mut run, &poll) {
            ended(why, &mut errors);
        }
        if sched.next >= sched.total && run.pending == 0 {
            break;
        }
        if now >= drain_deadline {
            break;
        }
        let wake = sched.next_due().unwrap_or(drain_deadline);
        alarm.set(wake, now).map_err(|e| format!("timerfd: {e}"))?;
        // The alarm wakes the loop; the timeout is a backstop a little after it.
        let backstop = wake.saturating_duration_since(now) + Duration::from_millis(5);
        match poll.poll(&mut events, Some(backstop)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll: {e}")),
        }
        for (k, ev) in events.iter().enumerate() {
            // A full batch of events takes milliseconds to work through; the schedule is
            // looked at in between, so that the loop itself is not what makes sends late.
            if k % DISPATCH_EVERY == DISPATCH_EVERY - 1 {
                for why in sched.dispatch(Instant::now(), &mut conns, &ready, &mut run, &poll) {
                    ended(why, &mut errors);
                }
            }
            if ev.token() == ALARM {
                alarm.clear();
                continue;
            }
            let Some(conn) = conns.get_mut(ev.token().0) else {
                continue;
            };
            if conn.phase != Phase::Ready {
                continue;
            }
            if let Err(why) = conn.pump(&mut run) {
                conn.end(&poll, &mut run);
                ended(why, &mut errors);
            }
        }
    }
    let _ = stop_cpu.send(());
    let [t_before, t_after, me_before, me_after] = sampler.join().unwrap_or([None; 4]);
    // Round trips still out after --timeout: their connections count as failed.
    for conn in conns.iter_mut().filter(|c| c.phase == Phase::Ready) {
        if conn.in_flight.is_some() || !conn.waiting.is_empty() {
            conn.end(&poll, &mut run);
            ended(
                "no echo within the drain time after the timed part (the longer of the run and --timeout)".into(),
                &mut errors,
            );
        }
    }
    for conn in conns.iter_mut().filter(|c| c.phase == Phase::Ready) {
        conn.tls.send_close_notify();
        let _ = conn.flush();
    }

    run.samples.sort_unstable();
    run.late.sort_unstable();
    let us = |v: &[u64], q: f64| quantile(v, q) as f64 / 1000.0;
    let (p50, p99, p999) = (
        us(&run.samples, 0.5),
        us(&run.samples, 0.99),
        us(&run.samples, 0.999),
    );
    let max = run.samples.last().copied().unwrap_or(0) as f64 / 1000.0;
    let late_p99 = us(&run.late, 0.99);
    let achieved = if secs > 0.0 {
        run.completed_in_window as f64 / secs
    } else {
        0.0
    };
    let failures = open_failed + closed;
    let count = run.samples.len() as u64;
    let cpu = client::cpu_fields(t_before, t_after, count as f64, "cpu_us_per_rt", 1e6);
    let own_cpu = match (me_before, me_after) {
        (Some(b), Some(a)) => format!("{:.2}", a - b),
        _ => "NA".into(),
    };
    println!(
        "loaded {}: {} of {n} connections open (in {open_for:.1}s), {rate:.0} round trips/s of \
         {size} bytes for {secs}s after {warmup}s of warm-up: {count} measured, achieved \
         {achieved:.1} rt/s; from the scheduled send to the whole echo: p50 {p50:.1} us, p99 \
         {p99:.1} us, p99.9 {p999:.1} us, max {max:.1} us; {failures} connection(s) failed or \
         closed, {} measured round trip(s) lost ({desc})",
        c.label,
        ready.len(),
        run.lost,
    );
    client::print_cpu(&cpu, "per round trip");
    println!(
        "  client: one event loop; CPU {own_cpu} s over the timed part; got to a round trip \
         {late_p99:.1} us after its scheduled time (p99)"
    );
    client::print_errors(&errors);
    let mut fields = vec![
        ("mode", "loaded".into()),
        ("target", c.label.clone()),
        ("value", format!("{p99:.1}")),
        ("unit", "us".into()),
        ("failures", failures.to_string()),
        ("connections", n.to_string()),
        ("open", ready.len().to_string()),
        ("open_failed", open_failed.to_string()),
        ("closed", closed.to_string()),
        ("lost", run.lost.to_string()),
        ("rate", format!("{rate:.0}")),
        ("achieved", format!("{achieved:.1}")),
        ("count", count.to_string()),
        ("p50", format!("{p50:.1}")),
        ("p99", format!("{p99:.1}")),
        ("p999", format!("{p999:.1}")),
        ("max", format!("{max:.1}")),
        ("late_p99", format!("{late_p99:.1}")),
        ("size", size.to_string()),
        ("secs", format!("{secs}")),
        ("client_cpu_s", own_cpu),
        ("tls", desc),
    ];
    fields.extend(cpu);
    client::result(&fields);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_spread_evenly_over_time_and_connections() {
        // 20,000 round trips/s: one every 50 us overall.
        assert_eq!(slot_offset(0, 20_000.0), Duration::ZERO);
        assert_eq!(slot_offset(1, 20_000.0), Duration::from_micros(50));
        assert_eq!(slot_offset(20_000, 20_000.0), Duration::from_secs(1));
        // Slot s goes to connection s % N, so with 1,000 connections each one sends every
        // 1,000 slots: every 50 ms.
        let next_on_same = slot_offset(1_000 + 7, 20_000.0) - slot_offset(7, 20_000.0);
        assert_eq!(next_on_same, Duration::from_millis(50));
        assert_eq!(slots_in(20.0, 20_000.0), 400_000);
        assert_eq!(slots_in(0.0, 20_000.0), 0);
    }

    #[test]
    fn latency_runs_from_the_scheduled_time_and_only_the_window_counts() {
        let t0 = Instant::now();
        let mut run = Run {
            msg: vec![1; 4],
            window_start: t0 + Duration::from_secs(1),
            window_end: t0 + Duration::from_secs(2),
            samples: Vec::new(),
            late: Vec::new(),
            completed_in_window: 0,
            pending: 2,
            lost: 0,
        };
        // Due at 1.0 s, back at 1.3 s (sent late, say): 300 ms, and inside the window.
        let due = t0 + Duration::from_secs(1);
        run.complete(
            Trip {
                due,
                measured: true,
            },
            due + Duration::from_millis(300),
        );
        // A warm-up round trip back before the window: neither a sample nor in the window.
        run.complete(
            Trip {
                due: t0,
                measured: false,
            },
            t0 + Duration::from_millis(10),
        );
        assert_eq!(run.samples, [300_000_000]);
        assert_eq!(run.completed_in_window, 1);
        assert_eq!(run.pending, 0);
    }
}
