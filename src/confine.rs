//! Landlock: once its sockets are bound, the server confines itself to reading the files it
//! may need again, so that a bug in a parser (TLS, X.509, TOML, PROXY) cannot read or write the
//! rest of the filesystem.
//!
//! The rule set ([`Confinement::for_config`]) is read access beneath: the config file's folder;
//! the folder of each file the config names, and the folder of each one's symlink target
//! (Landlock rules attach to inodes, so a file replaced by a rename, or a link repointed in the
//! folder its target already was, stays readable: folders are allowed, not files); the name
//! resolution files (`/etc/hosts`, `/etc/resolv.conf`, `/etc/nsswitch.conf`, `/etc/gai.conf`,
//! those that exist, each alone, and the folder of its target when it is a link); and
//! `/proc/self`. Every filesystem right Landlock has up to its ABI 8 is handled, so nothing is
//! written, created, removed or executed anywhere. TCP is not restricted: upstream connects
//! (any host, any port, and DNS) must keep working.
//!
//! Landlock confines the thread that asks and the threads it creates afterwards, never those
//! already running. So the server asks on the main thread, after loading its files and binding
//! its sockets and before the first thread starts (see `main.rs`); the reload thread, the
//! health thread and every connection thread are then confined.
//!
//! A read that Landlock denies fails with EACCES, which says nothing of why. [`explain_read`]
//! turns that error, for a path outside the allowed folders, into one that names the
//! confinement and the fix (a restart, which computes the rules again).
//!
//! The `landlock` crate makes the three system calls (without unsafe code in lclb) and handles
//! kernels of every ABI: best effort, so an old kernel enforces what it has, and one without
//! Landlock leaves lclb unconfined, with a warning.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, LandlockStatus, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
};

use crate::config::{Config, ConfigError};

/// The files glibc and musl read to resolve a host name (an upstream's `address`, at a reload).
pub const NAME_RESOLUTION_FILES: [&str; 4] = [
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
];

/// The process's own `/proc` folder, readable once confined.
pub const PROC_SELF: &str = "/proc/self";

/// The Landlock ABI whose filesystem rights are all handled. ABI 5 brought the last
/// filesystem right before ABI 9 (`IoctlDev`), so this is every right up to ABI 8, and a kernel
/// of ABI 5 or later enforces it fully. ABI 9's `ResolveUnix` (connecting to a UNIX socket by
/// path) is left to the socket layer, as TCP is: handling it would make every kernel before
/// Linux 7.1 report partial enforcement.
const HANDLED_ABI: ABI = ABI::V5;

/// The folders set by [`Confinement::apply`] once enforced: what [`explain_read`] compares with.
static CONFINED_TO: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// What lclb may read once confined: computed from the running config at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    folders: Vec<PathBuf>,
    files: Vec<PathBuf>,
    /// The folders of what lclb itself is made of (its binary and, for a dynamically linked
    /// build, the loader and shared libraries it runs), whose files may be read and executed:
    /// an upgrade (`lclb upgrade`) has the running lclb start the new binary. The root folder
    /// is never one (a FROM scratch image's `/lclb`, where an upgrade is a new container):
    /// allowing it would allow everything.
    exec_folders: Vec<PathBuf>,
}

/// How [`Confinement::apply`] went, as the crate reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confined {
    /// Every handled right is enforced.
    Fully,
    /// The kernel enforces some of the handled rights (an ABI before 5): the message says
    /// which ABI it has.
    Partially(String),
    /// The kernel has no Landlock, or has it off: lclb runs unconfined. The message says
    /// which.
    Not(String),
}

/// Landlock was there, but the rule set could not be built or applied.
#[derive(Debug)]
pub struct ConfineError(landlock::RulesetError);

impl fmt::Display for ConfineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot confine lclb with Landlock: {}; set `security.landlock = false` to run \
             unconfined",
            self.0
        )
    }
}

impl std::error::Error for ConfineError {}

impl Confinement {
    /// The rule set for `config`, loaded from `config_path`: the folders (each canonical, none
    /// beneath another, sorted) and the single files (name resolution, those that exist).
    pub fn for_config(config_path: &Path, config: &Config) -> Confinement {
        let mut named = vec![config_path.to_path_buf()];
        named.extend(crate::config::named_files(config));
        let mut folders = Vec::new();
        for file in &named {
            folders.extend(folders_of(file));
        }
        let mut files = Vec::new();
        for file in NAME_RESOLUTION_FILES.iter().map(Path::new) {
            if let Ok(canonical) = file.canonicalize() {
                files.push(file.to_path_buf());
                // A link (a resolver's stub file, a container engine's mount) is read through:
                // its target's folder, as for a certificate.
                if canonical != file {
                    folders.extend(canonical.parent().map(Path::to_path_buf));
                }
            }
        }
        let mut folders = outermost(folders);
        folders.push(PathBuf::from(PROC_SELF));
        let executables = mapped_executables();
        // The loader's cache, for a dynamically linked build that starts a new one.
        let cache = Path::new(LOADER_CACHE);
        // More than the binary itself mapped executable: a loader and libraries.
        if cache.exists() && executables.len() > 1 {
            files.push(cache.to_path_buf());
        }
        let exec_folders = outermost(
            executables
                .iter()
                .filter_map(|file| file.parent().map(Path::to_path_buf))
                .filter(|folder| folder.parent().is_some())
                .collect(),
        );
        Confinement {
            folders,
            files,
            exec_folders,
        }
    }

    /// The folders whose files may be read and executed: those of lclb's binary and of the
    /// loader and libraries it runs, for upgrades.
    pub fn exec_folders(&self) -> &[PathBuf] {
        &self.exec_folders
    }

    /// The folders readable (with everything beneath them), `/proc/self` last.
    pub fn folders(&self) -> &[PathBuf] {
        &self.folders
    }

    /// The single files readable: the name resolution files that exist.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Confines the calling thread, and every thread it starts from now on, to reading what
    /// [`Confinement::folders`] and [`Confinement::files`] hold; logs the outcome once (info
    /// when enforced, with the folders; a warning when not, or only in part). A path that can
    /// no longer be opened is left out (less access, never more).
    pub fn apply(&self) -> Result<Confined, ConfineError> {
        // Threads already running stay unconfined: say so, should a change ever start one
        // before this call.
        if let Some(n) = threads_running().filter(|&n| n > 1) {
            log::warn!(
                "landlock: {} thread(s) already running are not confined; confine before \
                 starting any thread",
                n - 1
            );
        }
        let all = AccessFs::from_all(HANDLED_ABI);
        let read_dir = AccessFs::ReadFile | AccessFs::ReadDir;
        let read_file = landlock::BitFlags::from(AccessFs::ReadFile);
        // exec(2) opens the file for reading as well as execution.
        let run = AccessFs::ReadFile | AccessFs::Execute;
        let mut ruleset = Ruleset::default()
            .handle_access(all)
            .and_then(Ruleset::create)
            .map_err(ConfineError)?;
        let rules = self
            .folders
            .iter()
            .map(|p| (p, read_dir))
            .chain(self.files.iter().map(|p| (p, read_file)))
            .chain(self.exec_folders.iter().map(|p| (p, run)));
        for (path, access) in rules {
            match PathFd::new(path) {
                Ok(fd) => {
                    ruleset = ruleset
                        .add_rule(PathBeneath::new(fd, access))
                        .map_err(ConfineError)?;
                }
                Err(e) => log::warn!("landlock: leaving {} out: {e}", path.display()),
            }
        }
        let status = ruleset.restrict_self().map_err(ConfineError)?;
        let outcome = match status.ruleset {
            RulesetStatus::FullyEnforced => Confined::Fully,
            RulesetStatus::PartiallyEnforced => Confined::Partially(describe(status.landlock)),
            RulesetStatus::NotEnforced => Confined::Not(describe(status.landlock)),
        };
        self.log(&outcome);
        if !matches!(outcome, Confined::Not(_)) {
            let _ = CONFINED_TO.set(self.folders.clone());
        }
        Ok(outcome)
    }

    fn log(&self, outcome: &Confined) {
        let exec = if self.exec_folders.is_empty() {
            "no execution".to_string()
        } else {
            format!(
                "running only files beneath {} (lclb's own binary and libraries, for upgrades)",
                list(&self.exec_folders)
            )
        };
        let allowed = format!(
            "reading beneath {}; and the files {}; no writes; {exec}",
            list(&self.folders),
            list(&self.files)
        );
        match outcome {
            Confined::Fully => log::info!("landlock: confined to {allowed}"),
            Confined::Partially(why) => log::warn!(
                "landlock: only partly enforced ({why}; the kernel lacks some of the rights \
                 of ABI 5): confined to {allowed}"
            ),
            Confined::Not(why) => {
                log::warn!("landlock: not enforced ({why}): lclb runs unconfined")
            }
        }
    }
}

/// A config error about the file `path`, named by the config key `key`.
pub(crate) fn file_error(key: &str, path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::File {
        key: key.to_string(),
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads the file `path` (named by `key`); a read the confinement denies says so
/// ([`explain_read`]).
pub(crate) fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        let e = explain_read(path, &e);
        file_error(key, path, format!("cannot read: {e}"))
    })
}

/// The dynamic loader's cache of library paths (glibc).
const LOADER_CACHE: &str = "/etc/ld.so.cache";

/// The files mapped executable into this process (`/proc/self/maps`): lclb's binary and, when
/// dynamically linked, the loader and the shared libraries. Canonical paths, deduplicated.
fn mapped_executables() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let perms = fields.nth(1)?;
            let path = fields.nth(3)?;
            (perms.contains('x') && path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .filter_map(|path| path.canonicalize().ok())
        .collect();
    files.sort();
    files.dedup();
    files
}

/// The process's thread count, from the `Threads:` line of `/proc/self/status`.
fn threads_running() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// What the crate said of the kernel's Landlock.
fn describe(status: LandlockStatus) -> String {
    match status {
        LandlockStatus::NotEnabled => {
            "the kernel has Landlock but it is not enabled: add it to the lsm= boot parameter"
                .into()
        }
        LandlockStatus::NotImplemented => {
            "the kernel has no Landlock, or a seccomp filter (a container's) refuses its system \
             calls"
                .into()
        }
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => match kernel_abi {
            Some(abi) => format!("kernel Landlock ABI {abi}"),
            None => format!("kernel Landlock ABI {effective_abi:?}"),
        },
    }
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(none)".into();
    }
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// The folder of `file` as named (made absolute), and that of its target, both canonical;
/// nothing for a file without a folder that exists.
fn folders_of(file: &Path) -> Vec<PathBuf> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut folders = Vec::new();
    // The folder as named: a rule attaches to what the path leads to now, so canonical.
    if let Some(folder) = file.parent().and_then(|p| p.canonicalize().ok()) {
        folders.push(folder);
    }
    if let Some(folder) = file
        .canonicalize()
        .ok()
        .and_then(|t| t.parent().map(Path::to_path_buf))
    {
        folders.push(folder);
    }
    folders
}

/// `folders` sorted, without duplicates and without any folder beneath another one (a rule
/// covers everything beneath its folder).
fn outermost(mut folders: Vec<PathBuf>) -> Vec<PathBuf> {
    folders.sort();
    folders.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for folder in folders {
        // Sorted, so an ancestor comes before everything beneath it.
        if !kept.iter().any(|k| folder.starts_with(k)) {
            kept.push(folder);
        }
    }
    kept
}

/// `e`, from reading `path`, as a message; when lclb is confined and `path` lies outside the
/// folders it may read, one that says the confinement denied it and how to allow it.
pub fn explain_read(path: &Path, e: &io::Error) -> String {
    if e.kind() != io::ErrorKind::PermissionDenied {
        return e.to_string();
    }
    match CONFINED_TO.get() {
        Some(folders) if !beneath_any(path, folders) => denied_message(path, folders),
        _ => e.to_string(),
    }
}

/// `e` with its read error explained as [`explain_read`] does, when it is the config file's.
pub fn explain_config_read(e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Read { path, source } => {
            let message = explain_read(&path, &source);
            ConfigError::Read {
                source: io::Error::new(source.kind(), message),
                path,
            }
        }
        other => other,
    }
}

/// Whether `path`, read through its links, lies beneath one of `folders` (read through theirs:
/// `/proc/self` is the process's own folder).
fn beneath_any(path: &Path, folders: &[PathBuf]) -> bool {
    // Resolving a path is not a read: Landlock allows it anywhere.
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let resolved = canonical(path);
    folders.iter().any(|f| resolved.starts_with(canonical(f)))
}

fn denied_message(path: &Path, folders: &[PathBuf]) -> String {
    // A link is read through: name where it leads, which is what lies outside.
    let shown = match path.canonicalize() {
        Ok(target) if target != path => {
            format!("{} (a link to {})", path.display(), target.display())
        }
        _ => path.display().to_string(),
    };
    format!(
        "permission denied (EACCES, by Landlock): {shown} is outside the folders lclb confined \
         itself to at start-up ({}); restart lclb to allow a new folder",
        list(folders)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder for one test.
    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lclb-confine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.canonicalize().unwrap()
    }

    fn write(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "x").unwrap();
    }

    /// A config in `dir/conf/`, naming its TLS files by the absolute paths given.
    fn config_naming(dir: &Path, ca: &Path, cert: &Path, key: &Path, extra: &str) -> PathBuf {
        let path = dir.join("conf/lclb.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text = format!(
            "[tls]\nca_cert = {ca:?}\nserver_cert = {cert:?}\nserver_key = {key:?}\n{extra}\n\
             [[upstream]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\ngroup = \"web\"\n\
             [[client]]\ncn = \"c\"\ngroups = [\"web\"]\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn rules(path: &Path) -> Confinement {
        Confinement::for_config(path, &Config::load(path).unwrap())
    }

    #[test]
    fn the_folders_are_the_configs_and_each_named_files_deduplicated_with_proc_self_last() {
        let dir = temp("folders");
        let (ca, cert, key) = (
            dir.join("ca/ca.crt"),
            dir.join("tls/s.crt"),
            dir.join("tls/s.key"),
        );
        for f in [&ca, &cert, &key] {
            write(f);
        }
        let path = config_naming(&dir, &ca, &cert, &key, "");
        let c = rules(&path);
        assert_eq!(
            c.folders(),
            [
                dir.join("ca"),
                dir.join("conf"),
                dir.join("tls"),
                PathBuf::from("/proc/self")
            ]
        );
    }

    #[test]
    fn a_symlinked_files_target_folder_is_allowed_beside_the_links_folder() {
        let dir = temp("links");
        let archive = dir.join("archive/server-1.pem");
        write(&archive);
        std::fs::create_dir_all(dir.join("live")).unwrap();
        let link = dir.join("live/server.pem");
        std::os::unix::fs::symlink("../archive/server-1.pem", &link).unwrap();
        let ca = dir.join("conf/ca.crt");
        write(&ca);
        let path = config_naming(&dir, &ca, &link, &link, "");
        let c = rules(&path);
        assert_eq!(
            c.folders(),
            [
                dir.join("archive"),
                dir.join("conf"),
                dir.join("live"),
                PathBuf::from("/proc/self")
            ]
        );
    }

    #[test]
    fn a_folder_beneath_an_allowed_one_adds_no_rule() {
        let dir = temp("nested");
        // Everything beneath the config's folder, as `make certs` lays it out.
        let (ca, cert, key) = (
            dir.join("conf/certs/ca/ca.crt"),
            dir.join("conf/certs/server/s.crt"),
            dir.join("conf/certs/server/s.key"),
        );
        for f in [&ca, &cert, &key] {
            write(f);
        }
        let crl = dir.join("conf/certs/alt/ca.crl.pem");
        write(&crl);
        let path = config_naming(&dir, &ca, &cert, &key, &format!("crls = [{crl:?}]"));
        assert_eq!(
            rules(&path).folders(),
            [dir.join("conf"), PathBuf::from("/proc/self")]
        );
    }

    #[test]
    fn the_folders_of_crls_ticket_keys_extra_cas_and_group_tls_files_are_allowed() {
        let dir = temp("every-key");
        let ca = dir.join("conf/ca.crt");
        write(&ca);
        let named = [
            "crl",
            "partner",
            "partner-crl",
            "up-ca",
            "up-cert",
            "up-key",
            "tickets",
        ]
        .map(|name| dir.join(name).join("f.pem"));
        for f in &named {
            write(f);
        }
        let [crl, partner, partner_crl, up_ca, up_cert, up_key, tickets] = &named;
        let extra = format!(
            "crls = [{crl:?}]\nticket_keys = {tickets:?}\n[[ca]]\nname = \"p\"\ncert = {partner:?}\ncrls = [{partner_crl:?}]\n\
             [[group]]\nname = \"web\"\n[group.tls]\nca_cert = {up_ca:?}\n\
             client_cert = {up_cert:?}\nclient_key = {up_key:?}\n"
        );
        let path = config_naming(&dir, &ca, &ca, &ca, &extra);
        let mut expected: Vec<PathBuf> = named.iter().map(|f| f.parent().unwrap().into()).collect();
        expected.push(dir.join("conf"));
        expected.sort();
        expected.push(PathBuf::from("/proc/self"));
        assert_eq!(rules(&path).folders(), expected);
    }

    #[test]
    fn a_relative_config_path_gives_absolute_folders() {
        let dir = temp("relative");
        let ca = dir.join("conf/ca.crt");
        write(&ca);
        let path = config_naming(&dir, &ca, &ca, &ca, "");
        let cwd = std::env::current_dir().unwrap();
        let relative = pathdiff(&path, &cwd);
        let c = Confinement::for_config(&relative, &Config::load(&path).unwrap());
        assert_eq!(c.folders(), [dir.join("conf"), PathBuf::from("/proc/self")]);
    }

    /// `path` relative to `base` (both absolute), through `..` as needed.
    fn pathdiff(path: &Path, base: &Path) -> PathBuf {
        let common = path
            .components()
            .zip(base.components())
            .take_while(|(a, b)| a == b)
            .count();
        let mut out = PathBuf::new();
        for _ in base.components().skip(common) {
            out.push("..");
        }
        for c in path.components().skip(common) {
            out.push(c);
        }
        out
    }

    #[test]
    fn only_existing_name_resolution_files_are_listed() {
        let dir = temp("resolution");
        let ca = dir.join("conf/ca.crt");
        write(&ca);
        let c = rules(&config_naming(&dir, &ca, &ca, &ca, ""));
        let mut existing: Vec<PathBuf> = NAME_RESOLUTION_FILES
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect();
        // The test binary is linked dynamically: the loader's cache is read by a new lclb.
        if Path::new(LOADER_CACHE).exists() {
            existing.push(PathBuf::from(LOADER_CACHE));
        }
        assert_eq!(c.files(), existing);
    }

    #[test]
    fn the_folders_of_the_binary_and_its_libraries_may_be_run() {
        let dir = temp("exec");
        let ca = dir.join("conf/ca.crt");
        write(&ca);
        let c = rules(&config_naming(&dir, &ca, &ca, &ca, ""));
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert!(
            c.exec_folders().iter().any(|f| exe.starts_with(f)),
            "{:?} lacks the folder of {}",
            c.exec_folders(),
            exe.display()
        );
        let libc = mapped_executables()
            .into_iter()
            .find(|f| f.to_string_lossy().contains("libc.so"))
            .expect("the test binary is linked against libc");
        assert!(c.exec_folders().iter().any(|f| libc.starts_with(f)));
        assert!(c.exec_folders().iter().all(|f| f != Path::new("/")));
    }

    #[test]
    fn the_thread_count_is_read_from_proc() {
        // The test harness runs this test on a thread of its own: at least two.
        assert!(threads_running().is_some_and(|n| n >= 2));
    }

    #[test]
    fn outermost_keeps_ancestors_only_and_not_mere_name_prefixes() {
        let kept = outermost(
            ["/a/b/c", "/a/b", "/a/bc", "/a/b", "/d"]
                .map(PathBuf::from)
                .to_vec(),
        );
        assert_eq!(kept, ["/a/b", "/a/bc", "/d"].map(PathBuf::from));
    }

    #[test]
    fn a_denied_read_outside_the_folders_names_the_confinement_and_the_fix() {
        let folders = vec![PathBuf::from("/srv/lclb"), PathBuf::from(PROC_SELF)];
        let message = denied_message(Path::new("/etc/passwd"), &folders);
        assert_eq!(
            message,
            "permission denied (EACCES, by Landlock): /etc/passwd is outside the folders lclb \
             confined itself to at start-up (/srv/lclb, /proc/self); restart lclb to allow a new \
             folder"
        );
        assert!(!beneath_any(Path::new("/etc/passwd"), &folders));
        assert!(beneath_any(Path::new("/srv/lclb/certs/x.pem"), &folders));
        assert!(!beneath_any(Path::new("/srv/lclb-other/x.pem"), &folders));
    }

    #[test]
    fn an_error_other_than_permission_denied_is_shown_as_it_is() {
        let e = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(explain_read(Path::new("/etc/passwd"), &e), e.to_string());
    }
}
