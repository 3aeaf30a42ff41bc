//! `scripts/upgrade.sh` under load: a client loop (a fresh mTLS connection and one echo each,
//! no retries) runs through the upgrade and sees no failure; connections open at the start
//! finish their transfer byte for byte through the old process, which then exits 0; the new
//! process, on its new config, serves from then on. A new process that never becomes ready is
//! stopped and the old one keeps serving. Under a service manager the old one hands MAINPID to
//! the new; a socket-activated lclb hands over the socket systemd passed it.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// Connections holding a transfer open across the upgrade.
const HOLDERS: usize = 5;
/// One write of a transfer, echoed back before the next.
const CHUNK: usize = 64 * 1024;
/// Chunks each transfer sends after the upgrade is done, through the draining old process.
const CHUNKS_AFTER: usize = 64;
/// Client loop threads.
const LOOPERS: usize = 3;
/// Far above what the loop reaches even in a release build (over 1000 connections/s here),
/// so that a fresh process's bucket never refuses it.
const LOOP_RATE_LIMIT: &str = "[rate_limit]\nrate = 1000000\nburst = 1000000\n";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/upgrade.sh")
}

/// A config at `name` in `pki`'s folder: `upstream` for `client1.lb.com`, drains of up to a
/// minute, metrics on, rate limits out of the way.
/// Landlock off, for the tests whose new binary is a script outside lclb's folder.
const UNCONFINED: &str = "[security]\nlandlock = false\n";

fn write_config(pki: &Pki, name: &str, upstream: &Upstream) -> PathBuf {
    write_config_with(pki, name, upstream, "")
}

/// [`write_config`] with `extra` sections appended.
fn write_config_with(pki: &Pki, name: &str, upstream: &Upstream, extra: &str) -> PathBuf {
    let text = pki
        .usual(&[upstream])
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(LOOP_RATE_LIMIT)
        .limit("drain_timeout = \"60s\"")
        .section(extra)
        .build();
    let path = pki.dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The client config of the loop: full handshakes every time (no resumption), so each
/// connection is a whole mTLS handshake.
fn loop_client(pki: &Pki) -> Arc<ClientConfig> {
    let client = pki.client("client1.lb.com");
    let mut config = (*pki.client_config(Some(&client))).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// One connection of the loop: handshake, greeting, one line echoed, close_notify. The name of
/// the upstream that answered.
fn one_exchange(addr: SocketAddr, config: &Arc<ClientConfig>, n: u64) -> Result<String, String> {
    let mut stream = connect(addr, config.clone()).map_err(|e| format!("connect: {e}"))?;
    let name = read_line(&mut stream).map_err(|e| format!("greeting: {e}"))?;
    if name.is_empty() {
        return Err("closed without a greeting".into());
    }
    let line = format!("ping {n}");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let echoed = read_line(&mut stream).map_err(|e| format!("echo: {e}"))?;
    if echoed != line {
        return Err(format!("echo {echoed:?} for {line:?}"));
    }
    stream.conn.send_close_notify();
    let _ = stream.flush();
    Ok(name)
}

/// What the client loop saw.
#[derive(Default)]
struct Tally {
    /// Connections answered by the old config's upstream.
    old: AtomicU64,
    /// Connections answered by the new config's upstream.
    new: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn served(&self) -> u64 {
        self.old.load(Ordering::SeqCst) + self.new.load(Ordering::SeqCst)
    }
}

/// Runs [`LOOPERS`] threads of [`one_exchange`] until `stop`.
fn client_loop(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..LOOPERS)
        .map(|t| {
            let (config, tally, stop) = (config.clone(), tally.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match one_exchange(addr, &config, n).as_deref() {
                        Ok("web-old") => tally.old.fetch_add(1, Ordering::SeqCst),
                        Ok("web-new") => tally.new.fetch_add(1, Ordering::SeqCst),
                        Ok(other) => {
                            tally
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("answered by {other}"));
                            tally.failed.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(e) => {
                            tally
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("thread {t} #{n}: {e}"));
                            tally.failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect()
}

/// The bytes of chunk `i` of transfer `t`: different for every chunk, so a lost, repeated or
/// reordered chunk shows.
fn chunk(t: usize, i: usize) -> Vec<u8> {
    let mut x = (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A connection that sends chunks and checks each echo, until `upgraded` and then
/// [`CHUNKS_AFTER`] more; says on `started` once its first chunk is back. The chunks it moved.
fn hold_transfer(
    t: usize,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    started: mpsc::Sender<()>,
    upgraded: Arc<AtomicBool>,
) -> Result<usize, String> {
    let mut stream = connect(addr, config).map_err(|e| format!("connect: {e}"))?;
    let name = read_line(&mut stream).map_err(|e| format!("greeting: {e}"))?;
    if name != "web-old" {
        return Err(format!("greeted by {name:?}"));
    }
    let (mut i, mut after) = (0, 0);
    let mut back = vec![0u8; CHUNK];
    while after < CHUNKS_AFTER {
        let sent = chunk(t, i);
        stream
            .write_all(&sent)
            .map_err(|e| format!("chunk {i}: write: {e}"))?;
        stream
            .read_exact(&mut back)
            .map_err(|e| format!("chunk {i}: read: {e}"))?;
        if back != sent {
            return Err(format!("chunk {i} came back different"));
        }
        if i == 0 {
            let _ = started.send(());
        }
        if upgraded.load(Ordering::SeqCst) {
            after += 1;
        } else {
            // Paced before the upgrade, so the transfer is still going when it happens.
            std::thread::sleep(Duration::from_millis(20));
        }
        i += 1;
    }
    stream.conn.send_close_notify();
    stream.flush().map_err(|e| format!("close: {e}"))?;
    Ok(i)
}

/// Kills process `pid` (one this test did not start as a child) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn an_upgrade_under_a_client_loop_loses_no_connection_and_open_transfers_finish() {
    let pki = Pki::new("upgrade-loop");
    let old_upstream = Upstream::start("web-old", Mode::Echo);
    let new_upstream = Upstream::start("web-new", Mode::Echo);
    let old_config = write_config(&pki, "old.toml", &old_upstream);
    let new_config = write_config(&pki, "new.toml", &new_upstream);
    let mut old = Process::start(LCLB, &old_config);
    let addr = old.listen_addr();
    let metrics = old.metrics_addr();
    let old_pid = old.child.id();

    // Transfers in progress through the old process.
    let upgraded = Arc::new(AtomicBool::new(false));
    let (started_tx, started) = mpsc::channel();
    let holder_config = pki.client_config(Some(&pki.client("client1.lb.com")));
    let holders: Vec<_> = (0..HOLDERS)
        .map(|t| {
            let (config, tx, flag) = (holder_config.clone(), started_tx.clone(), upgraded.clone());
            std::thread::spawn(move || hold_transfer(t, addr, config, tx, flag))
        })
        .collect();
    for n in 0..HOLDERS {
        if started.recv_timeout(WAIT).is_err() {
            upgraded.store(true, Ordering::SeqCst);
            let ends: Vec<_> = holders.into_iter().map(|h| h.join().unwrap()).collect();
            panic!("only {n} of {HOLDERS} transfers started: {ends:?}");
        }
    }

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let loopers = client_loop(addr, loop_client(&pki), tally.clone(), stop.clone());
    assert!(
        poll_within(Duration::from_secs(60), || (tally.served() >= 50)
            .then_some(()))
        .is_some(),
        "the loop served 50 connections before the upgrade"
    );

    let before = tally.served();
    let began = Instant::now();
    let out = Command::new("bash")
        .arg(script())
        .arg(old_pid.to_string())
        .arg(LCLB)
        .arg(&new_config)
        .env("UPGRADE_TIMEOUT", "60")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid: u32 = stdout
        .trim()
        .strip_prefix("upgraded: new lclb PID ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new PID in {stdout:?}"));
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, old_pid);
    upgraded.store(true, Ordering::SeqCst);
    let during = tally.served() - before;

    // Every open transfer ends whole, through the old process.
    for (t, h) in holders.into_iter().enumerate() {
        let moved = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("transfer {t}: {e}"));
        assert!(moved > CHUNKS_AFTER, "transfer {t} moved {moved} chunks");
    }
    assert_eq!(
        old.wait_exit_within(Duration::from_secs(60)),
        Some(0),
        "the old process drains and exits 0 once its transfers are done"
    );
    old.wait_line(&format!("upgrade: ready; told process {old_pid}"))
        .expect("the new process logs to the old one's stderr");

    // From now on only the new process can answer.
    let after_exit = tally.new.load(Ordering::SeqCst);
    assert!(
        poll_within(Duration::from_secs(60), || {
            (tally.new.load(Ordering::SeqCst) >= after_exit + 50).then_some(())
        })
        .is_some(),
        "the new process serves the loop after the old one exited"
    );
    stop.store(true, Ordering::SeqCst);
    for l in loopers {
        l.join().unwrap();
    }
    let took = began.elapsed();
    eprintln!(
        "client loop: {} served before the upgrade began, {during} during the script, {} in all \
         ({} old, {} new) over the {took:?} from the upgrade's start",
        before,
        tally.served(),
        tally.old.load(Ordering::SeqCst),
        tally.new.load(Ordering::SeqCst)
    );
    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!(tally.failed.load(Ordering::SeqCst), 0, "{errors:?}");
    assert!(alive(new_pid), "the new process {new_pid} runs");
    // The metrics socket went over too: the new process answers on it, on its new config.
    let text = scrape(metrics);
    assert!(
        text.contains("lclb_upstream_up{upstream=\"web-new\"} 1"),
        "{text}"
    );
    assert!(!text.contains("web-old"), "{text}");
    assert!(parse_metrics(&text)["lclb_connections_accepted_total"] >= 50.0);
}

#[test]
fn a_new_process_that_never_becomes_ready_is_stopped_and_the_old_one_keeps_serving() {
    let pki = Pki::new("upgrade-not-ready");
    let upstream = Upstream::start("web-old", Mode::Echo);
    // The "new binary" is a shell script in the test's folder, which a confined lclb may not
    // start (see a_confined_lclb_starts_only_binaries_beside_its_own).
    let config = write_config_with(&pki, "lclb.toml", &upstream, UNCONFINED);
    let old = Process::start(LCLB, &config);
    let addr = old.listen_addr();
    // A "new binary" that answers --check-config and `upgrade` as lclb does but, started to
    // serve, hangs.
    let wrapper = pki.dir.join("hanging-lclb");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$1\" in --check-config|upgrade) exec {LCLB} \"$@\";; esac\n\
             echo \"hanging-pid $$\" >&2\nexec sleep 600\n"
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["+x", wrapper.to_str().unwrap()])
        .status()
        .unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg(old.child.id().to_string())
        .arg(&wrapper)
        .arg(&config)
        .env("UPGRADE_TIMEOUT", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let hung: u32 = old
        .wait_line("hanging-pid ")
        .and_then(|l| l.split_whitespace().nth(1).and_then(|p| p.parse().ok()))
        .expect("the old process started the new binary");
    assert!(
        stderr.contains(&format!(
            "the new process (pid {hung}) was not ready within 2s; stopped it; it keeps serving"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: upgrade failed (see above); process {} keeps serving",
            old.child.id()
        )),
        "{stderr}"
    );
    assert!(
        !alive(hung) || is_zombie(hung),
        "the hanging process was stopped"
    );
    old.wait_line("upgrade to ")
        .filter(|l| l.contains("failed, still serving"))
        .expect("the old process logs the failed upgrade");
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client).unwrap(), "web-old");
}

#[test]
fn a_new_process_that_exits_at_start_fails_the_upgrade_and_the_old_one_keeps_serving() {
    let pki = Pki::new("upgrade-exits");
    let upstream = Upstream::start("web-old", Mode::Echo);
    // The "new binary" is a shell script in the test's folder, which a confined lclb may not
    // start (see a_confined_lclb_starts_only_binaries_beside_its_own).
    let config = write_config_with(&pki, "lclb.toml", &upstream, UNCONFINED);
    let old = Process::start(LCLB, &config);
    let addr = old.listen_addr();
    let wrapper = pki.dir.join("failing-lclb");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$1\" in --check-config|upgrade) exec {LCLB} \"$@\";; esac\nexit 3\n"
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["+x", wrapper.to_str().unwrap()])
        .status()
        .unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg(old.child.id().to_string())
        .arg(&wrapper)
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the new process exited (exit status: 3) before it was ready"),
        "{stderr}"
    );
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client).unwrap(), "web-old");
}

/// Whether `pid` has exited but is not yet reaped.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// The figures of the README's upgrade section, not a check: connections per second of a
/// client loop (LOOPERS threads, full mTLS handshake and one echo each, no retries) for 5 s
/// before, through, and 5 s after an upgrade, and every failure. Run with a release build:
/// `cargo test --release --test upgrade -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; prints figures"]
fn measure_the_client_loop_through_an_upgrade() {
    let pki = Pki::new("upgrade-measure");
    let old_upstream = Upstream::start("web-old", Mode::Echo);
    let new_upstream = Upstream::start("web-new", Mode::Echo);
    let old_config = write_config(&pki, "old.toml", &old_upstream);
    let new_config = write_config(&pki, "new.toml", &new_upstream);
    let mut old = Process::start(LCLB, &old_config);
    let addr = old.listen_addr();
    let old_pid = old.child.id();
    let config = loop_client(&pki);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Per 250 ms since `start`: connections served, failed.
    let buckets = Arc::new(Mutex::new(vec![(0u64, 0u64); 400]));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..LOOPERS)
        .map(|_| {
            let (config, stop, buckets, errors) = (
                config.clone(),
                stop.clone(),
                buckets.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let result = one_exchange(addr, &config, n);
                    let at = (start.elapsed().as_millis() / 250) as usize;
                    let mut b = buckets.lock().unwrap();
                    if let Some(slot) = b.get_mut(at) {
                        match result {
                            Ok(_) => slot.0 += 1,
                            Err(e) => {
                                slot.1 += 1;
                                errors.lock().unwrap().push(e);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let began = start.elapsed();
    let out = Command::new("bash")
        .arg(script())
        .arg(old_pid.to_string())
        .arg(LCLB)
        .arg(&new_config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let answered = start.elapsed();
    let new_pid: u32 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(4)
        .and_then(|p| p.parse().ok())
        .unwrap();
    let _new = KillOnDrop(new_pid);
    assert_eq!(old.wait_exit_within(Duration::from_secs(60)), Some(0));
    let exited = start.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let end = (start.elapsed().as_millis() / 250) as usize;
    let b = buckets.lock().unwrap();
    eprintln!(
        "upgrade asked at {began:.2?}, new process ready (script returned) at {answered:.2?}, \
         old process exited 0 at {exited:.2?}"
    );
    for (i, second) in b[..end].chunks(4).enumerate() {
        let served: u64 = second.iter().map(|s| s.0).sum();
        let failed: u64 = second.iter().map(|s| s.1).sum();
        eprintln!("second {i:>2}: {served:>5} connections/s, {failed} failed");
    }
    for (q, slot) in b.iter().enumerate().take(24).skip(16) {
        eprintln!(
            "{:.2}-{:.2} s: {:>4} connections ({} failed)",
            q as f64 / 4.0,
            (q + 1) as f64 / 4.0,
            slot.0,
            slot.1
        );
    }
    let errors = errors.lock().unwrap();
    eprintln!(
        "failures: {} {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

/// The next datagram on `socket`, its states one per line; None after [`WAIT`].
fn next_states(socket: &std::os::unix::net::UnixDatagram) -> Option<Vec<String>> {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn under_a_service_manager_the_old_process_hands_mainpid_to_the_new_one() {
    let pki = Pki::new("upgrade-mainpid");
    let upstream = Upstream::start("web-old", Mode::Echo);
    let config = write_config(&pki, "lclb.toml", &upstream);
    let notify_path = pki.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let mut command = Command::new(LCLB);
    command
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path);
    let mut old = Process::spawn(command);
    let addr = old.listen_addr();
    assert_eq!(next_states(&notify).unwrap()[0], "READY=1");

    let out = Command::new("bash")
        .arg(script())
        .arg(old.child.id().to_string())
        .arg(LCLB)
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid: u32 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(4)
        .and_then(|p| p.parse().ok())
        .unwrap();
    let _new = KillOnDrop(new_pid);
    // The first datagram after READY=1 is the handover: the new process sends no READY=1 of
    // its own (the service is ready all along), and the old one no STOPPING=1.
    assert_eq!(
        next_states(&notify).unwrap(),
        [
            format!("MAINPID={new_pid}"),
            "STATUS=upgraded: handed over to a new process".to_string()
        ]
    );
    assert_eq!(old.wait_exit_within(Duration::from_secs(30)), Some(0));
    // The new process speaks to the service manager from then on.
    let hup = Command::new("kill")
        .args(["-HUP", &new_pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert_eq!(next_states(&notify).unwrap()[0], "RELOADING=1");
    assert_eq!(next_states(&notify).unwrap()[0], "READY=1");
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client).unwrap(), "web-old");
}

#[test]
fn a_socket_activated_lclb_hands_the_socket_systemd_passed_to_the_new_process() {
    let pki = Pki::new("upgrade-activated");
    let old_upstream = Upstream::start("web-old", Mode::Echo);
    let new_upstream = Upstream::start("web-new", Mode::Echo);
    let old_config = write_config(&pki, "old.toml", &old_upstream);
    let new_config = write_config(&pki, "new.toml", &new_upstream);
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut command = Command::new("systemd-socket-activate");
    command
        .arg("-l")
        .arg(addr.to_string())
        .arg(LCLB)
        .arg("--config")
        .arg(&old_config);
    let mut old = Process::spawn(command);
    old.wait_line("Listening on")
        .expect("systemd-socket-activate listens");
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    // The first connection starts lclb, which serves it.
    assert_eq!(greeting(addr, client.clone()).unwrap(), "web-old");
    old.wait_line("passed by systemd").unwrap();

    let out = Command::new("bash")
        .arg(script())
        .arg(old.child.id().to_string())
        .arg(LCLB)
        .arg(&new_config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid: u32 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(4)
        .and_then(|p| p.parse().ok())
        .unwrap();
    let _new = KillOnDrop(new_pid);
    old.wait_line(&format!(
        "listen: using the listening socket passed by the lclb being upgraded (pid {})",
        old.child.id()
    ))
    .expect("the new process says where its socket came from");
    assert_eq!(old.wait_exit_within(Duration::from_secs(30)), Some(0));
    assert_eq!(greeting(addr, client).unwrap(), "web-new");
}

#[test]
fn a_confined_lclb_starts_only_binaries_beside_its_own() {
    let pki = Pki::new("upgrade-confined");
    let upstream = Upstream::start("web-old", Mode::Echo);
    let config = write_config(&pki, "lclb.toml", &upstream);
    let old = Process::start(LCLB, &config);
    let addr = old.listen_addr();
    let elsewhere = pki.dir.join("lclb-copy");
    std::fs::copy(LCLB, &elsewhere).unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg(old.child.id().to_string())
        .arg(&elsewhere)
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot start {}: Permission denied (os error 13) (a confined lclb",
            elsewhere.display()
        )),
        "{stderr}"
    );
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client).unwrap(), "web-old");
}
