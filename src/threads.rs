//! The thread budget: how many threads lclb may have, and so how many connections it can hold.
//!
//! lclb runs threads per connection, and the number of threads a process may have is bounded
//! from outside: the user's `RLIMIT_NPROC` (threads count as processes; root is exempt), the
//! `pids.max` of the process's cgroup and of every ancestor (a systemd unit's `TasksMax=`, a
//! container's pids limit), and the system-wide `kernel.threads-max`. At start-up
//! [`thread_limit`] reads them all and keeps the smallest, and [`connection_cap`] turns it into
//! a number of connections, which the server applies on top of `limits.max_connections` (see
//! [`startup_cap`], which also logs the outcome once). Without it, the default of 10000
//! connections would need some 30,000 threads: connections past the limit would fail to get
//! their threads one by one, and lclb's own threads (health probes, metrics) with them.
//!
//! How threads are counted: a connection holds at most [`THREADS_PER_CONNECTION`] (3): its two
//! copy threads while it is forwarded, and the connection thread that ran its handshake, which
//! then parks in the pool for `limits.thread_keep_alive`. A pool keeps no more threads than it
//! ever had jobs at once, and each job holds its connection's place in the count, so parked or
//! busy, that is at most one connection thread per connection. [`RESERVED_THREADS`] (32) are
//! kept for lclb itself: the main (accept) thread, signals, the health checker and its probes,
//! the metrics server and its request threads, and pools briefly making a new thread while an
//! old one is about to park. So the cap is `(limit - 32) / 3`, and at least 1.
//!
//! Cgroups: v1 (the `pids` line of `/proc/self/cgroup`, found under the `cgroup` mount with the
//! `pids` option in `/proc/self/mountinfo`) and v2 (the `0::` line, under the `cgroup2` mount)
//! are both read, including a mount whose root is the process's own cgroup (as in a
//! container). Missing files are skipped; a file with unexpected content is skipped with a
//! warning naming it.
//!
//! What it does not do: the limits are shared with other processes (of the same user, in the
//! same cgroup), which are not counted; and they are read once, at start-up.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Threads one connection can hold at once: two copy threads and its connection thread.
pub const THREADS_PER_CONNECTION: u64 = 3;

/// Threads kept out of the connection budget for lclb's own: main, signals, health checks and
/// probes, the metrics server, and pool slack.
pub const RESERVED_THREADS: u64 = 32;

/// Where a thread limit was read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitSource {
    /// The soft `RLIMIT_NPROC` of the process (`ulimit -u`, `LimitNPROC=`); not read for root,
    /// which it does not bind.
    Nproc,
    /// `pids.max` in this cgroup folder: the process's own cgroup or one of its ancestors.
    PidsMax(PathBuf),
    /// `kernel.threads-max`, the bound for the whole system.
    ThreadsMax,
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitSource::Nproc => f.write_str("RLIMIT_NPROC"),
            LimitSource::PidsMax(dir) => write!(f, "pids.max of {}", dir.display()),
            LimitSource::ThreadsMax => f.write_str("kernel.threads-max"),
        }
    }
}

/// The tightest bound on the number of threads lclb may have, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadLimit {
    /// Threads (tasks) allowed.
    pub threads: u64,
    /// The limit this number was read from.
    pub source: LimitSource,
}

/// Reads every limit on this process's threads and returns the smallest; `None` if none could
/// be read (not Linux, no `/proc`).
pub fn thread_limit() -> Option<ThreadLimit> {
    find_limit(&|path| std::fs::read_to_string(path).ok(), &soft_nproc)
}

/// The connections `limit` leaves room for: `(threads - RESERVED_THREADS) /
/// THREADS_PER_CONNECTION`, and at least 1 so a tiny budget still serves someone.
pub fn connection_cap(limit: &ThreadLimit) -> usize {
    let room = limit.threads.saturating_sub(RESERVED_THREADS) / THREADS_PER_CONNECTION;
    usize::try_from(room.max(1)).unwrap_or(usize::MAX)
}

/// Reads the thread limit once at start-up and returns the connection cap it sets
/// (`usize::MAX` if no limit was found), logging it against `max_connections`: a warning if
/// the cap lowers it, a line of information otherwise.
pub fn startup_cap(max_connections: usize) -> usize {
    let Some(limit) = thread_limit() else {
        log::info!("no thread limit found; max_connections = {max_connections} stands");
        return usize::MAX;
    };
    let cap = connection_cap(&limit);
    if cap < max_connections {
        log::warn!(
            "thread limit {} ({}): max_connections lowered from {max_connections} to {cap} \
             ({THREADS_PER_CONNECTION} threads per connection, {RESERVED_THREADS} kept for lclb); \
             raise the limit (TasksMax=, the container's pids limit, ulimit -u) to allow more",
            limit.threads,
            limit.source,
        );
    } else {
        log::info!(
            "thread limit {} ({}): room for {cap} connections",
            limit.threads,
            limit.source
        );
    }
    cap
}

/// Reads a file's text; `None` if it is missing or unreadable. Tests pass canned files.
type ReadFile<'a> = &'a dyn Fn(&Path) -> Option<String>;

fn soft_nproc() -> Option<u64> {
    match rlimit::getrlimit(rlimit::Resource::NPROC) {
        Ok((soft, _)) if soft != rlimit::INFINITY => Some(soft),
        Ok(_) => None,
        Err(e) => {
            log::debug!("cannot read RLIMIT_NPROC: {e}");
            None
        }
    }
}

fn find_limit(read: ReadFile<'_>, nproc: &dyn Fn() -> Option<u64>) -> Option<ThreadLimit> {
    let mut found = Vec::new();
    // The kernel lets root (real or effective, with its capabilities) past RLIMIT_NPROC. If
    // the status cannot be read, assume the limit applies: lowering is the safe mistake.
    let root = read(Path::new("/proc/self/status"))
        .as_deref()
        .and_then(uids)
        .is_some_and(|(real, effective)| real == 0 || effective == 0);
    if !root {
        if let Some(threads) = nproc() {
            found.push(ThreadLimit {
                threads,
                source: LimitSource::Nproc,
            });
        }
    }
    if let (Some(cgroup), Some(mountinfo)) = (
        read(Path::new("/proc/self/cgroup")),
        read(Path::new("/proc/self/mountinfo")),
    ) {
        for hierarchy in [Hierarchy::V1Pids, Hierarchy::V2] {
            found.extend(pids_limits(hierarchy, &cgroup, &mountinfo, read));
        }
    }
    let threads_max = Path::new("/proc/sys/kernel/threads-max");
    if let Some(text) = read(threads_max) {
        match text.trim().parse() {
            Ok(threads) => found.push(ThreadLimit {
                threads,
                source: LimitSource::ThreadsMax,
            }),
            Err(_) => log::warn!(
                "{}: expected a number, found {:?}; ignored",
                threads_max.display(),
                text.trim()
            ),
        }
    }
    found.into_iter().min_by_key(|l| l.threads)
}

/// The real and effective user ids from the `Uid:` line of `/proc/self/status`.
fn uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(str::parse);
    match (ids.next(), ids.next()) {
        (Some(Ok(real)), Some(Ok(effective))) => Some((real, effective)),
        _ => None,
    }
}

/// A cgroup hierarchy that can hold `pids.max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hierarchy {
    /// Cgroup v1, the `pids` controller's own hierarchy.
    V1Pids,
    /// The cgroup v2 unified hierarchy.
    V2,
}

/// The process's cgroup in `hierarchy`, from `/proc/self/cgroup` (`ID:CONTROLLERS:PATH` lines).
fn cgroup_path(proc_cgroup: &str, hierarchy: Hierarchy) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match hierarchy {
            Hierarchy::V1Pids => controllers.split(',').any(|c| c == "pids"),
            Hierarchy::V2 => id == "0" && controllers.is_empty(),
        };
        matches.then_some(path)
    })
}

/// A mounted cgroup hierarchy: the cgroup shown at its root, and where it is mounted.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    root: String,
    point: PathBuf,
}

/// The mount of `hierarchy` in `/proc/self/mountinfo`. A line is `ID PARENT MAJ:MIN ROOT
/// POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn find_mount(mountinfo: &str, hierarchy: Hierarchy) -> Option<Mount> {
    mountinfo.lines().find_map(|line| {
        let (mine, fs) = line.split_once(" - ")?;
        let mut mine = mine.split(' ').skip(3);
        let (root, point) = (mine.next()?, mine.next()?);
        let mut fs = fs.split(' ');
        let (fstype, _source, options) = (fs.next()?, fs.next()?, fs.next().unwrap_or(""));
        let matches = match hierarchy {
            Hierarchy::V1Pids => fstype == "cgroup" && options.split(',').any(|o| o == "pids"),
            Hierarchy::V2 => fstype == "cgroup2",
        };
        matches.then(|| Mount {
            root: unescape(root),
            point: PathBuf::from(unescape(point)),
        })
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The folder of cgroup `path` under `mount`, or `None` if the mount does not show it (a
/// cgroup outside the mounted subtree, or a path climbing out with `..`).
fn cgroup_dir(mount: &Mount, path: &str) -> Option<PathBuf> {
    let relative = if mount.root == "/" {
        path
    } else if path == mount.root {
        ""
    } else {
        path.strip_prefix(mount.root.as_str())
            .filter(|rest| rest.starts_with('/'))?
    };
    let relative = Path::new(relative.trim_start_matches('/'));
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return None;
    }
    Some(mount.point.join(relative))
}

/// `pids.max`: `max` (no limit) or a number.
fn parse_pids_max(text: &str) -> Result<Option<u64>, ()> {
    match text.trim() {
        "max" => Ok(None),
        n => n.parse().map(Some).map_err(|_| ()),
    }
}

/// The `pids.max` limits on the process in `hierarchy`: its own cgroup's and every
/// ancestor's up to the mount point (a cgroup is bound by all of them).
fn pids_limits(
    hierarchy: Hierarchy,
    proc_cgroup: &str,
    mountinfo: &str,
    read: ReadFile<'_>,
) -> Vec<ThreadLimit> {
    let (Some(path), Some(mount)) = (
        cgroup_path(proc_cgroup, hierarchy),
        find_mount(mountinfo, hierarchy),
    ) else {
        return Vec::new();
    };
    let Some(dir) = cgroup_dir(&mount, path) else {
        log::debug!(
            "cgroup {path} is not under the mount at {} (root {}); its pids.max is not read",
            mount.point.display(),
            mount.root
        );
        return Vec::new();
    };
    let mut limits = Vec::new();
    for folder in dir.ancestors().take_while(|a| a.starts_with(&mount.point)) {
        let file = folder.join("pids.max");
        let Some(text) = read(&file) else { continue };
        match parse_pids_max(&text) {
            Ok(Some(threads)) => limits.push(ThreadLimit {
                threads,
                source: LimitSource::PidsMax(folder.to_path_buf()),
            }),
            Ok(None) => {}
            Err(()) => log::warn!(
                "{}: expected `max` or a number, found {:?}; ignored",
                file.display(),
                text.trim()
            ),
        }
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const V1_CGROUP: &str = "\
12:pids:/system.slice/lclb.service
11:cpu,cpuacct:/system.slice/lclb.service
1:name=systemd:/system.slice/lclb.service
0::/system.slice/lclb.service
";

    const V1_MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids rw,nosuid shared:17 - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid shared:19 - cgroup2 cgroup2 rw
";

    const V2_MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

    fn files(entries: &[(&str, &str)]) -> HashMap<PathBuf, String> {
        entries
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect()
    }

    fn limit(files: &HashMap<PathBuf, String>, nproc: Option<u64>) -> Option<ThreadLimit> {
        find_limit(&|p| files.get(p).cloned(), &|| nproc)
    }

    fn pids(dir: &str, threads: u64) -> ThreadLimit {
        ThreadLimit {
            threads,
            source: LimitSource::PidsMax(dir.into()),
        }
    }

    const ROOT: &str = "Name:\tlclb\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
    const USER: &str = "Name:\tlclb\nUid:\t1000\t1000\t1000\t1000\n";

    #[test]
    fn the_v1_pids_line_and_the_v2_line_are_told_apart() {
        assert_eq!(
            cgroup_path(V1_CGROUP, Hierarchy::V1Pids),
            Some("/system.slice/lclb.service")
        );
        assert_eq!(
            cgroup_path(V1_CGROUP, Hierarchy::V2),
            Some("/system.slice/lclb.service")
        );
        assert_eq!(
            cgroup_path("3:cpu,pids:/a\n", Hierarchy::V1Pids),
            Some("/a")
        );
        assert_eq!(
            cgroup_path("3:cpu:/a\n1:name=systemd:/\n", Hierarchy::V1Pids),
            None
        );
        assert_eq!(cgroup_path("0::/a:b\n", Hierarchy::V2), Some("/a:b"));
    }

    #[test]
    fn mountinfo_gives_each_hierarchys_root_and_mount_point() {
        assert_eq!(
            find_mount(V1_MOUNTINFO, Hierarchy::V1Pids),
            Some(Mount {
                root: "/".into(),
                point: "/sys/fs/cgroup/pids".into()
            })
        );
        assert_eq!(
            find_mount(V1_MOUNTINFO, Hierarchy::V2).map(|m| m.point),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(find_mount(V2_MOUNTINFO, Hierarchy::V1Pids), None);
        let escaped = "40 31 0:37 /docker/abc /cg\\040roups/pids rw - cgroup cgroup rw,pids\n";
        assert_eq!(
            find_mount(escaped, Hierarchy::V1Pids),
            Some(Mount {
                root: "/docker/abc".into(),
                point: "/cg roups/pids".into()
            })
        );
    }

    #[test]
    fn a_mount_rooted_at_the_processs_own_cgroup_is_that_cgroup() {
        let container = Mount {
            root: "/docker/abc".into(),
            point: "/sys/fs/cgroup/pids".into(),
        };
        assert_eq!(
            cgroup_dir(&container, "/docker/abc"),
            Some("/sys/fs/cgroup/pids".into())
        );
        assert_eq!(
            cgroup_dir(&container, "/docker/abc/worker"),
            Some("/sys/fs/cgroup/pids/worker".into())
        );
        assert_eq!(cgroup_dir(&container, "/docker/abcd"), None);
        assert_eq!(cgroup_dir(&container, "/other"), None);
        let host = Mount {
            root: "/".into(),
            point: "/sys/fs/cgroup".into(),
        };
        assert_eq!(cgroup_dir(&host, "/"), Some("/sys/fs/cgroup".into()));
        assert_eq!(cgroup_dir(&host, "/../outside"), None);
    }

    #[test]
    fn pids_max_is_max_or_a_number() {
        assert_eq!(parse_pids_max("max\n"), Ok(None));
        assert_eq!(parse_pids_max("120\n"), Ok(Some(120)));
        assert_eq!(parse_pids_max("lots\n"), Err(()));
        assert_eq!(parse_pids_max(""), Err(()));
    }

    #[test]
    fn the_smallest_pids_max_of_the_cgroup_and_its_ancestors_wins() {
        let f = files(&[
            ("/proc/self/status", ROOT),
            ("/proc/self/cgroup", V1_CGROUP),
            ("/proc/self/mountinfo", V1_MOUNTINFO),
            (
                "/sys/fs/cgroup/pids/system.slice/lclb.service/pids.max",
                "500\n",
            ),
            ("/sys/fs/cgroup/pids/system.slice/pids.max", "200\n"),
            ("/proc/sys/kernel/threads-max", "192726\n"),
        ]);
        assert_eq!(
            limit(&f, Some(50)),
            Some(pids("/sys/fs/cgroup/pids/system.slice", 200)),
            "root is not bound by RLIMIT_NPROC"
        );
    }

    #[test]
    fn an_unlimited_cgroup_under_a_limited_ancestor_gets_the_ancestors_limit() {
        let f = files(&[
            (
                "/proc/self/cgroup",
                "0::/user.slice/user-1000.slice/session-3.scope\n",
            ),
            ("/proc/self/mountinfo", V2_MOUNTINFO),
            (
                "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/pids.max",
                "max\n",
            ),
            (
                "/sys/fs/cgroup/user.slice/user-1000.slice/pids.max",
                "10813\n",
            ),
            ("/sys/fs/cgroup/user.slice/pids.max", "max\n"),
            ("/proc/sys/kernel/threads-max", "192726\n"),
        ]);
        assert_eq!(
            limit(&f, None),
            Some(pids("/sys/fs/cgroup/user.slice/user-1000.slice", 10813))
        );
    }

    #[test]
    fn rlimit_nproc_binds_a_user_that_is_not_root() {
        let f = files(&[
            ("/proc/self/status", USER),
            ("/proc/self/cgroup", V1_CGROUP),
            ("/proc/self/mountinfo", V1_MOUNTINFO),
            (
                "/sys/fs/cgroup/pids/system.slice/lclb.service/pids.max",
                "max\n",
            ),
            ("/proc/sys/kernel/threads-max", "192726\n"),
        ]);
        assert_eq!(
            limit(&f, Some(4096)),
            Some(ThreadLimit {
                threads: 4096,
                source: LimitSource::Nproc
            })
        );
        // Unlimited (RLIM_INFINITY reads as no limit): the system bound is what is left.
        assert_eq!(
            limit(&f, None),
            Some(ThreadLimit {
                threads: 192726,
                source: LimitSource::ThreadsMax
            })
        );
        let effective_root = "Uid:\t1000\t0\t0\t0\n";
        let mut f = f;
        f.insert("/proc/self/status".into(), effective_root.into());
        assert_eq!(
            limit(&f, Some(4096)).map(|l| l.source),
            Some(LimitSource::ThreadsMax)
        );
    }

    #[test]
    fn missing_and_garbled_files_are_skipped() {
        assert_eq!(limit(&files(&[]), None), None);
        let f = files(&[
            ("/proc/self/status", ROOT),
            ("/proc/self/cgroup", V1_CGROUP),
            // No mountinfo: the cgroup limits cannot be found.
            (
                "/sys/fs/cgroup/pids/system.slice/lclb.service/pids.max",
                "10\n",
            ),
            ("/proc/sys/kernel/threads-max", "1000\n"),
        ]);
        assert_eq!(limit(&f, None).map(|l| l.threads), Some(1000));
        let f = files(&[
            ("/proc/self/status", ROOT),
            ("/proc/self/cgroup", V1_CGROUP),
            ("/proc/self/mountinfo", V1_MOUNTINFO),
            (
                "/sys/fs/cgroup/pids/system.slice/lclb.service/pids.max",
                "ten\n",
            ),
            ("/proc/sys/kernel/threads-max", "not a number\n"),
        ]);
        assert_eq!(limit(&f, None), None);
    }

    #[test]
    fn the_cap_leaves_the_reserve_and_three_threads_per_connection() {
        let cap = |threads| {
            connection_cap(&ThreadLimit {
                threads,
                source: LimitSource::ThreadsMax,
            })
        };
        assert_eq!(cap(120), 29);
        assert_eq!(cap(32 + 3 * 10_000), 10_000);
        assert_eq!(cap(10), 1, "below the reserve, still one");
        assert_eq!(
            cap(u64::MAX),
            usize::try_from((u64::MAX - 32) / 3).unwrap_or(usize::MAX)
        );
    }

    #[test]
    fn the_source_names_the_file_it_came_from() {
        assert_eq!(
            pids("/sys/fs/cgroup/pids/lclb", 120).source.to_string(),
            "pids.max of /sys/fs/cgroup/pids/lclb"
        );
        assert_eq!(LimitSource::Nproc.to_string(), "RLIMIT_NPROC");
        assert_eq!(LimitSource::ThreadsMax.to_string(), "kernel.threads-max");
    }

    #[test]
    fn octal_escapes_are_undone_and_stray_backslashes_kept() {
        assert_eq!(unescape("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape("/a\\b\\04"), "/a\\b\\04");
    }
}
