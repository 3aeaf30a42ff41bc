//! The reload thread: it runs every reload of the running balancer, those a SIGHUP asks for
//! ([`ReloadRequests::reload`]) and, while `[reload] watch` is on, those a changed file calls
//! for.
//!
//! Watching is polling. Every `watch_interval` the thread reads the config file and every file
//! the running config names (`[tls]` certificate, key, CA bundle and CRLs, each `[[ca]]`'s
//! bundle and CRLs, each `[group.tls]`'s CA bundle, certificate and key) through its path, so
//! symlinks are followed, and compares a SHA-256 of its bytes with the one it had when the
//! running config was loaded. Content, not mtime: a file rewritten within one timestamp tick,
//! or put back with its old mtime (`cp -p`, tar, a synced secret), keeps its mtime; and a
//! Kubernetes secret update (which swaps the `..data` symlink) or a certbot renewal (which
//! repoints the `live/` links) replaces links, not files, which inotify on the files misses. A
//! file that disappears or cannot be read is a change too; the reload then fails and says why.
//! The files are small (a large CRL is hashed as it is read, never held whole).
//!
//! A change calls [`Shared::reload`], the reload SIGHUP calls: it validates everything, swaps,
//! counts and logs. Each file is hashed before the reload reads it (those only the new config
//! names too: the thread parses the new config first to learn them), so a file that changes
//! while a reload runs differs at the next poll and is never missed; at worst a reload is done
//! once more. A change that does not validate leaves the running config; the hashes of that
//! attempt are kept, and the thread tries again only when one of them differs, so a broken
//! change is logged once, not at every poll, and a half-written rotation (the certificate
//! before its key) is loaded as soon as it is complete. After a reload the files are taken
//! again from the config now running: a reload can add or remove files.
//!
//! Running SIGHUP's reloads on this thread as well means two reloads never interleave (each
//! swaps the upstream table and the authorization in turn), and the thread knows what every
//! reload read, so a SIGHUP is never followed by a second reload of the same change. The
//! thread takes the running config's `Arc` and lets the lock go before it reads any file. It
//! sleeps on a channel, so a request or a stop wakes it at once; `watch` and `watch_interval`
//! are read again after each reload it runs, so turning watching on or off, or changing the
//! interval, takes effect with that reload.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use aws_lc_rs::digest::{Context, SHA256, SHA256_OUTPUT_LEN};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::{named_files, Config, Reload, MAX_WATCH_INTERVAL};
use crate::server::Shared;

/// What a [`Watcher`]'s thread is asked to do.
#[derive(Debug)]
enum Control {
    /// Reload now (SIGHUP).
    Reload,
    /// End.
    Stop,
}

/// The running reload thread (`lclb-watch`). Dropping it (or calling [`Watcher::stop`]) stops
/// the thread and waits for it: at most the end of a reload in progress.
///
/// Reloads it does not run itself (a direct [`Shared::reload`]) are taken into account at its
/// next poll, and a change of `[reload]` they make only when it next wakes; the binary runs
/// every reload through it.
#[derive(Debug)]
pub struct Watcher {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
}

/// Asks a [`Watcher`]'s thread for a reload; clone it for each place that can ask (the signal
/// thread).
#[derive(Debug, Clone)]
pub struct ReloadRequests {
    control: Sender<Control>,
}

impl ReloadRequests {
    /// Asks for a reload of the config file, as SIGHUP does, and returns at once; the thread
    /// runs it next (requests made while one waits are served by that one, which reads the
    /// files after all of them). The outcome is counted and logged by [`Shared::reload`].
    pub fn reload(&self) {
        if self.control.send(Control::Reload).is_err() {
            log::warn!("reload requested, but the reload thread has stopped");
        }
    }
}

impl Watcher {
    /// Starts the thread for the balancer `shared`, whose config file is `config`. The hashes
    /// of the files are noted before this returns (not when the thread first runs), so a file
    /// changed once the caller goes on, such as after start-up reports ready, is always seen
    /// as a change. The thread then polls while the running config's `reload.watch`
    /// is on (default off), every `reload.watch_interval` (default 5s), and serves
    /// [`ReloadRequests`] whether watching is on or not.
    pub fn spawn(shared: Arc<Shared>, config: PathBuf) -> io::Result<Watcher> {
        let (control, requests) = crossbeam_channel::unbounded();
        let watch = Watch::new(config, &*shared);
        let thread = std::thread::Builder::new()
            .name("lclb-watch".into())
            .spawn(move || run(&*shared, watch, &requests))?;
        Ok(Watcher {
            control,
            thread: Some(thread),
        })
    }

    /// A handle that asks this thread for reloads.
    pub fn requests(&self) -> ReloadRequests {
        ReloadRequests {
            control: self.control.clone(),
        }
    }

    /// Stops the thread and waits for it to end (after the reload it runs, if any).
    pub fn stop(&mut self) {
        // An explicit message rather than a disconnect: ReloadRequests hold senders too.
        let _ = self.control.send(Control::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the thread works on: the running balancer, or a fake in the unit tests.
trait Target {
    /// The `[reload]` section of the running config.
    fn settings(&self) -> Reload;
    /// The files the running config names.
    fn running_files(&self) -> Vec<PathBuf>;
    /// The files the config at `path` names now, if it is valid (its files unread).
    fn files_named_by(&self, path: &Path) -> Option<Vec<PathBuf>>;
    /// Reloads from `path`; true if the new config now runs. Counts and logs the outcome.
    fn reload(&self, path: &Path) -> bool;
}

impl Target for Shared {
    fn settings(&self) -> Reload {
        self.runtime().config.reload
    }

    fn running_files(&self) -> Vec<PathBuf> {
        // The runtime's Arc is cloned under the lock and the lock released at once.
        named_files(&self.runtime().config)
    }

    fn files_named_by(&self, path: &Path) -> Option<Vec<PathBuf>> {
        // A second parse of the file the reload is about to read (addresses resolved
        // again): the price of hashing every file before the reload reads it.
        Config::load(path).ok().map(|config| named_files(&config))
    }

    fn reload(&self, path: &Path) -> bool {
        Shared::reload(self, path).is_ok()
    }
}

/// What one path held when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The SHA-256 of its bytes. SHA-256 rather than std's hasher: SipHash with its fixed
    /// default keys is not collision-resistant, and a collision would hide a change; aws-lc-rs
    /// is the crypto lclb already runs on.
    Content([u8; SHA256_OUTPUT_LEN]),
    /// It could not be opened or read: missing, no permission, a dangling symlink.
    Unreadable(io::ErrorKind),
    /// It is not a regular file (a folder, a FIFO, which would block a read).
    NotAFile,
}

impl Seen {
    /// Reads `path` (following symlinks) and hashes it.
    fn of(path: &Path) -> Seen {
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => return Seen::NotAFile,
            Ok(_) => {}
            Err(e) => return Seen::Unreadable(e.kind()),
        }
        let mut hasher = Sha256(Context::new(&SHA256));
        let hashed = File::open(path).and_then(|mut file| io::copy(&mut file, &mut hasher));
        match hashed {
            Ok(_) => {
                let digest = hasher.0.finish();
                let mut bytes = [0; SHA256_OUTPUT_LEN];
                bytes.copy_from_slice(digest.as_ref());
                Seen::Content(bytes)
            }
            Err(e) => Seen::Unreadable(e.kind()),
        }
    }
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Content(_) => f.write_str("changed"),
            Seen::Unreadable(kind) => write!(f, "unreadable ({kind})"),
            Seen::NotAFile => f.write_str("not a regular file"),
        }
    }
}

/// Feeds what is written to a SHA-256, so a file is hashed without being held in memory
/// whole (a CA's CRL can be large).
struct Sha256(Context);

impl Write for Sha256 {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a set of paths held, by path.
type Snapshot = BTreeMap<PathBuf, Seen>;

fn snapshot<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Snapshot {
    paths
        .into_iter()
        .map(|p| (p.clone(), Seen::of(p)))
        .collect()
}

/// Up to this many changed paths are named in the log line of a change.
const NAMED_IN_LOG: usize = 3;

/// The thread's memory: what the files held when the running config was loaded, and what
/// they held at the last attempt that failed.
#[derive(Debug)]
struct Watch {
    /// The config file.
    config: PathBuf,
    /// The config file and the files the running config names, as that config read them.
    loaded: Snapshot,
    /// The files as the last failed reload read them (the config file, the running config's
    /// files, and those the refused config named): no new attempt until one differs.
    failed: Option<Snapshot>,
}

impl Watch {
    fn new(config: PathBuf, target: &dyn Target) -> Watch {
        let mut paths = target.running_files();
        paths.push(config.clone());
        Watch {
            loaded: snapshot(&paths),
            config,
            failed: None,
        }
    }

    /// The config file and the files the running config names.
    fn running_paths(&self, target: &dyn Target) -> BTreeSet<PathBuf> {
        let mut paths: BTreeSet<PathBuf> = target.running_files().into_iter().collect();
        paths.insert(self.config.clone());
        paths
    }

    /// One poll: reloads if a file differs from what the running config read, unless the
    /// files are exactly as the last failed attempt found them.
    fn poll(&mut self, target: &dyn Target) {
        let running = self.running_paths(target);
        let mut paths = running.clone();
        if let Some(failed) = &self.failed {
            paths.extend(failed.keys().cloned());
        }
        let now = snapshot(&paths);
        if self.failed.as_ref() == Some(&now) {
            log::debug!(
                "watch: {} file(s) polled, unchanged since the failed reload",
                now.len()
            );
            return;
        }
        let changed: Vec<_> = running
            .iter()
            .filter(|p| self.loaded.get(*p) != now.get(*p))
            .collect();
        if changed.is_empty() {
            if self.failed.take().is_some() {
                log::info!("watch: the files are back to what the running config was loaded from");
            } else {
                log::debug!("watch: {} file(s) polled, no change", now.len());
            }
            return;
        }
        let mut named: Vec<String> = changed
            .iter()
            .take(NAMED_IN_LOG)
            .map(|p| format!("{} {}", p.display(), now[*p]))
            .collect();
        if changed.len() > NAMED_IN_LOG {
            named.push(format!("{} more", changed.len() - NAMED_IN_LOG));
        }
        log::info!("watch: {}; reloading", named.join(", "));
        self.attempt(target, running, now);
    }

    /// A reload asked for (SIGHUP): whatever the files hold.
    fn requested(&mut self, target: &dyn Target) {
        let running = self.running_paths(target);
        let before = snapshot(&running);
        self.attempt(target, running, before);
    }

    /// Reloads, `before` holding what the files of `running` held before it. The files only
    /// the new config names are hashed first too, then the reload reads everything.
    fn attempt(&mut self, target: &dyn Target, running: BTreeSet<PathBuf>, mut before: Snapshot) {
        let mut wanted = running;
        if let Some(next) = target.files_named_by(&self.config) {
            wanted.extend(next);
        }
        before.retain(|p, _| wanted.contains(p));
        for path in &wanted {
            if !before.contains_key(path) {
                before.insert(path.clone(), Seen::of(path));
            }
        }
        if target.reload(&self.config) {
            // A file the new config names that was not hashed above is one the config file
            // gained after the parse; the config file's own hash then differs at the next
            // poll, which reloads again.
            self.loaded = self
                .running_paths(target)
                .into_iter()
                .map(|p| {
                    let seen = before.remove(&p).unwrap_or_else(|| Seen::of(&p));
                    (p, seen)
                })
                .collect();
            self.failed = None;
        } else {
            self.failed = Some(before);
        }
    }
}

/// The thread: serves requests, polls while watching is on, ends on Stop.
fn run(target: &dyn Target, mut watch: Watch, requests: &Receiver<Control>) {
    let mut settings = None;
    let mut last_poll = Instant::now();
    loop {
        let now = target.settings();
        if settings != Some(now) {
            announce(settings, now, watch.loaded.len());
            settings = Some(now);
        }
        let control = if now.watch {
            let wait = last_poll
                .checked_add(now.watch_interval)
                .map_or(MAX_WATCH_INTERVAL, |due| {
                    due.saturating_duration_since(Instant::now())
                });
            requests.recv_timeout(wait)
        } else {
            requests.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        match control {
            Err(RecvTimeoutError::Timeout) => watch.poll(target),
            Ok(Control::Reload) => {
                // Requests that queued meanwhile are served by this reload, which reads the
                // files after them all.
                if requests.try_iter().any(|c| matches!(c, Control::Stop)) {
                    return;
                }
                watch.requested(target);
            }
            Ok(Control::Stop) | Err(RecvTimeoutError::Disconnected) => return,
        }
        last_poll = Instant::now();
    }
}

/// Logs the watch settings when they are first known and whenever a reload changes them.
fn announce(before: Option<Reload>, now: Reload, files: usize) {
    let every = humantime::format_duration(now.watch_interval);
    match (before.map(|b| b.watch), now.watch) {
        (_, true) => log::info!(
            "watch: polling the config file and the {} file(s) it names every {every}",
            files.saturating_sub(1)
        ),
        (Some(true), false) => log::info!("watch: off (reload.watch = false)"),
        (_, false) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::time::Duration;

    /// A balancer stand-in: its running files, the files the config on disk names, and
    /// whether a reload validates. It counts reloads and, like a real one, takes the new
    /// files as the running ones when a reload validates.
    struct Fake {
        running: Mutex<Vec<PathBuf>>,
        on_disk: Mutex<Option<Vec<PathBuf>>>,
        valid: Mutex<bool>,
        reloads: Mutex<Vec<bool>>,
        /// Run in the middle of a reload, after the files were hashed.
        during_reload: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl Fake {
        fn new(running: Vec<PathBuf>) -> Fake {
            Fake {
                on_disk: Mutex::new(Some(running.clone())),
                running: Mutex::new(running),
                valid: Mutex::new(true),
                reloads: Mutex::new(Vec::new()),
                during_reload: Mutex::new(None),
            }
        }

        fn reloads(&self) -> Vec<bool> {
            self.reloads.lock().clone()
        }
    }

    impl Target for Fake {
        fn settings(&self) -> Reload {
            Reload {
                watch: true,
                watch_interval: Duration::from_secs(1),
            }
        }

        fn running_files(&self) -> Vec<PathBuf> {
            self.running.lock().clone()
        }

        fn files_named_by(&self, _: &Path) -> Option<Vec<PathBuf>> {
            self.on_disk.lock().clone()
        }

        fn reload(&self, _: &Path) -> bool {
            if let Some(f) = self.during_reload.lock().take() {
                f();
            }
            let ok = *self.valid.lock();
            if ok {
                if let Some(files) = self.on_disk.lock().clone() {
                    *self.running.lock() = files;
                }
            }
            self.reloads.lock().push(ok);
            ok
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lclb-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// A folder with lclb.toml and cert.pem, a fake running cert.pem, and its watch.
    fn setup(name: &str) -> (PathBuf, Fake, Watch) {
        let d = dir(name);
        write(&d.join("lclb.toml"), "config");
        write(&d.join("cert.pem"), "one");
        let fake = Fake::new(vec![d.join("cert.pem")]);
        let watch = Watch::new(d.join("lclb.toml"), &fake);
        (d, fake, watch)
    }

    #[test]
    fn nothing_is_reloaded_while_no_file_changes() {
        let (_d, fake, mut watch) = setup("quiet");
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), Vec::<bool>::new());
    }

    #[test]
    fn a_file_rewritten_with_other_bytes_reloads_once() {
        let (d, fake, mut watch) = setup("rewrite");
        write(&d.join("cert.pem"), "two");
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![true]);
    }

    #[test]
    fn a_file_rewritten_with_the_same_bytes_is_no_change() {
        let (d, fake, mut watch) = setup("same");
        write(&d.join("cert.pem"), "one");
        watch.poll(&fake);
        assert_eq!(fake.reloads(), Vec::<bool>::new());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_swapped_to_another_file_is_a_change() {
        let d = dir("symlink");
        write(&d.join("lclb.toml"), "config");
        std::fs::create_dir(d.join("v1")).unwrap();
        std::fs::create_dir(d.join("v2")).unwrap();
        write(&d.join("v1/cert.pem"), "one");
        write(&d.join("v2/cert.pem"), "two");
        std::os::unix::fs::symlink("v1", d.join("current")).unwrap();
        let fake = Fake::new(vec![d.join("current/cert.pem")]);
        let mut watch = Watch::new(d.join("lclb.toml"), &fake);
        std::os::unix::fs::symlink("v2", d.join("next")).unwrap();
        std::fs::rename(d.join("next"), d.join("current")).unwrap();
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![true]);
    }

    #[test]
    fn a_file_that_disappears_is_a_change_tried_once_until_it_is_back() {
        let (d, fake, mut watch) = setup("gone");
        std::fs::remove_file(d.join("cert.pem")).unwrap();
        *fake.valid.lock() = false;
        watch.poll(&fake);
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false], "one attempt per change");
        assert_eq!(
            watch.failed.as_ref().unwrap()[&d.join("cert.pem")],
            Seen::Unreadable(io::ErrorKind::NotFound)
        );
        write(&d.join("cert.pem"), "two");
        *fake.valid.lock() = true;
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false, true]);
        assert!(watch.failed.is_none());
    }

    #[test]
    fn a_change_that_fails_is_tried_again_only_when_a_file_changes_again() {
        let (d, fake, mut watch) = setup("retry");
        *fake.valid.lock() = false;
        write(&d.join("cert.pem"), "half");
        watch.poll(&fake);
        watch.poll(&fake);
        write(&d.join("lclb.toml"), "config, still broken");
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false, false]);
        *fake.valid.lock() = true;
        write(&d.join("cert.pem"), "whole");
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false, false, true]);
    }

    #[test]
    fn files_put_back_as_they_were_clear_the_failure_without_a_reload() {
        let (d, fake, mut watch) = setup("revert");
        *fake.valid.lock() = false;
        write(&d.join("cert.pem"), "bad");
        watch.poll(&fake);
        write(&d.join("cert.pem"), "one");
        watch.poll(&fake);
        assert!(watch.failed.is_none());
        // The same bad bytes again are a new change, tried (and logged) again.
        write(&d.join("cert.pem"), "bad");
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false, false]);
    }

    #[test]
    fn a_file_only_the_refused_config_names_is_watched_until_it_is_fixed() {
        let (d, fake, mut watch) = setup("new-file");
        let crl = d.join("new.crl");
        *fake.on_disk.lock() = Some(vec![d.join("cert.pem"), crl.clone()]);
        *fake.valid.lock() = false;
        write(
            &d.join("lclb.toml"),
            "config naming new.crl, which is missing",
        );
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false]);
        *fake.valid.lock() = true;
        write(&crl, "crl");
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false, true]);
        assert!(watch.loaded.contains_key(&crl), "now watched: {watch:?}");
        write(&crl, "crl 2");
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![false, true, true]);
    }

    #[test]
    fn a_file_the_config_no_longer_names_is_no_longer_watched() {
        let (d, fake, mut watch) = setup("dropped");
        write(&d.join("old.crl"), "crl");
        *fake.on_disk.lock() = Some(vec![d.join("cert.pem"), d.join("old.crl")]);
        write(&d.join("lclb.toml"), "config with old.crl");
        watch.poll(&fake);
        assert!(watch.loaded.contains_key(&d.join("old.crl")));
        *fake.on_disk.lock() = Some(vec![d.join("cert.pem")]);
        write(&d.join("lclb.toml"), "config without old.crl");
        watch.poll(&fake);
        std::fs::remove_file(d.join("old.crl")).unwrap();
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![true, true]);
    }

    #[test]
    fn a_file_that_changes_during_a_reload_is_reloaded_at_the_next_poll() {
        let (d, fake, mut watch) = setup("during");
        write(&d.join("cert.pem"), "two");
        let cert = d.join("cert.pem");
        *fake.during_reload.lock() = Some(Box::new(move || write(&cert, "three")));
        watch.poll(&fake);
        watch.poll(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![true, true]);
    }

    #[test]
    fn a_requested_reload_records_what_it_read_so_the_next_poll_does_not_repeat_it() {
        let (d, fake, mut watch) = setup("requested");
        write(&d.join("cert.pem"), "two");
        watch.requested(&fake);
        watch.poll(&fake);
        assert_eq!(fake.reloads(), vec![true]);
    }

    #[test]
    fn a_folder_where_a_file_should_be_is_a_change() {
        let (d, fake, mut watch) = setup("folder");
        std::fs::remove_file(d.join("cert.pem")).unwrap();
        std::fs::create_dir(d.join("cert.pem")).unwrap();
        *fake.valid.lock() = false;
        watch.poll(&fake);
        assert_eq!(
            watch.failed.as_ref().unwrap()[&d.join("cert.pem")],
            Seen::NotAFile
        );
    }

    #[test]
    fn the_thread_serves_a_request_and_stops_at_once() {
        let (d, fake, _) = setup("thread");
        let fake = Arc::new(fake);
        let (control, requests) = crossbeam_channel::unbounded();
        let (target, path) = (Arc::clone(&fake), d.join("lclb.toml"));
        let watch = Watch::new(path, &*target);
        let thread = std::thread::spawn(move || run(&*target, watch, &requests));
        control.send(Control::Reload).unwrap();
        assert!(crate::testing::wait_for(|| fake.reloads() == vec![true]));
        control.send(Control::Stop).unwrap();
        assert!(crate::testing::wait_for(|| thread.is_finished()));
    }

    #[test]
    fn every_file_the_config_names_is_watched() {
        let text = r#"
            listen = "127.0.0.1:0"
            [tls]
            ca_cert = "ca.crt"
            server_cert = "s.crt"
            server_key = "s.key"
            crls = ["a.crl"]
            [[ca]]
            name = "partners"
            cert = "p.crt"
            crls = ["p.crl"]
            [[group]]
            name = "web"
            [group.tls]
            ca_cert = "up-ca.crt"
            client_cert = "me.crt"
            client_key = "me.key"
            [[upstream]]
            name = "u"
            address = "127.0.0.1:1"
            group = "web"
            [cluster]
            redis = "rediss://redis.example:6380/0"
            ca_cert = "redis-ca.crt"
            client_cert = "redis-me.crt"
            client_key = "redis-me.key"
        "#;
        let config = Config::parse(text, Path::new("/etc/lclb")).unwrap();
        let names: Vec<_> = named_files(&config)
            .iter()
            .map(|p| p.strip_prefix("/etc/lclb").unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "ca.crt",
                "s.crt",
                "s.key",
                "a.crl",
                "p.crt",
                "p.crl",
                "up-ca.crt",
                "me.crt",
                "me.key",
                "redis-ca.crt",
                "redis-me.crt",
                "redis-me.key"
            ]
        );
    }
}
