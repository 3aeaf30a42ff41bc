//! The thread budget, end to end: the lclb binary started inside a pids cgroup with a small
//! `pids.max` lowers its max_connections to fit, refuses the excess with reason capacity, stays
//! up, and serves again once connections close.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use lclb::{RESERVED_THREADS, THREADS_PER_CONNECTION};
use support::*;

/// The cgroup v1 pids hierarchy these machines mount.
const PIDS_ROOT: &str = "/sys/fs/cgroup/pids";

/// A pids cgroup of this test's own, removed on drop (once the processes in it have exited).
struct PidsCgroup {
    dir: PathBuf,
}

impl PidsCgroup {
    /// Makes the cgroup with `pids.max` = `max`, or says why it cannot and returns `None`.
    fn create(max: u64) -> Option<PidsCgroup> {
        if !Path::new(PIDS_ROOT).join("cgroup.procs").exists() {
            eprintln!("skipped: no cgroup v1 pids hierarchy at {PIDS_ROOT}");
            return None;
        }
        let dir = Path::new(PIDS_ROOT).join(format!("lclb-test-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("skipped: cannot make {} (not root?): {e}", dir.display());
            return None;
        }
        let cgroup = PidsCgroup { dir };
        if let Err(e) = std::fs::write(cgroup.dir.join("pids.max"), format!("{max}\n")) {
            eprintln!(
                "skipped: cannot set pids.max in {}: {e}",
                cgroup.dir.display()
            );
            return None;
        }
        Some(cgroup)
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // The cgroup empties once the killed process is reaped; rmdir fails (EBUSY) until then.
        let removed = wait_until(|| std::fs::remove_dir(&self.dir).is_ok());
        if !removed {
            eprintln!("could not remove {}", self.dir.display());
        }
    }
}

#[test]
fn inside_a_small_pids_cgroup_max_connections_is_lowered_and_the_excess_refused() {
    let Some(cgroup) = PidsCgroup::create(120) else {
        return;
    };
    let cap = (120 - RESERVED_THREADS) / THREADS_PER_CONNECTION;
    let pki = Pki::new("thread-budget");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    std::fs::write(&path, config).unwrap();

    // The shell joins the cgroup, then becomes lclb: every lclb thread is counted there.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            cgroup.dir.display()
        ))
        .arg(env!("CARGO_BIN_EXE_lclb"))
        .arg("--config")
        .arg(&path);
    let mut lb = Process::spawn(command);

    let expected = format!(
        "thread limit 120 (pids.max of {}): max_connections lowered from 10000 to {cap}",
        cgroup.dir.display()
    );
    lb.wait_line(&expected)
        .unwrap_or_else(|| panic!("no start-up line {expected:?}"));
    let addr = lb.listen_addr();

    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    let held: Vec<TlsStream> = (0..cap)
        .map(|i| {
            let mut s = connect(addr, client.clone())
                .unwrap_or_else(|e| panic!("connection {i} of {cap}: {e}"));
            assert_eq!(read_line(&mut s).unwrap(), "web1", "connection {i}");
            s
        })
        .collect();

    for i in 0..5 {
        assert!(
            greeting(addr, client.clone()).is_err(),
            "excess connection {i} was served"
        );
        let refused = lb
            .wait_line("event=refused")
            .expect("the refusal is logged");
        assert!(
            refused.contains("reason=capacity")
                && refused.contains(&format!("detail=\"{cap} connections open\"")),
            "{refused}"
        );
    }
    assert_eq!(lb.child.try_wait().unwrap(), None, "lclb stays up");

    for mut s in held {
        s.conn.send_close_notify();
        let _ = std::io::Write::flush(&mut s);
    }
    for i in 0..cap {
        lb.wait_line("event=connection")
            .unwrap_or_else(|| panic!("held connection {i} did not end"));
    }
    assert_eq!(greeting(addr, client).unwrap(), "web1");

    lb.signal("TERM");
    assert_eq!(lb.wait_exit(), Some(0));
}
