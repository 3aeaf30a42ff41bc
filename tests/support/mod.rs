//! Shared helpers for the integration tests: certificates minted at test time, config text
//! for them ([`Pki::config`], [`ConfigBuilder`]), real upstream servers on loopback, a running
//! lclb (in process, [`Lb`], or as the binary, [`Process`]), real rustls clients, openssl
//! ([`openssl`], [`s_client`]), and waits that give up after [`WAIT`] or a bound of the test's
//! ([`poll_within`]; [`wait_until`] and [`poll_until`] are it with [`WAIT`]).
//!
//! Ports never race: lclb always listens on port 0 and the tests read the address back
//! ([`Lb::addr`], [`Process::listen_addr`], [`Process::metrics_addr`]); upstreams bind port 0
//! too; a port that must refuse, or go away and come back, is a [`ClosedPort`] the test holds
//! throughout, and one that must never answer a [`Blackhole`].

#![allow(dead_code)]

use std::fmt::Display;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lclb::{Config, Server, ShutdownHandle};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A fresh, empty folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How long a wait helper waits for its condition before it gives up: generous, since the
/// machine running the tests may be slow and shared.
pub const WAIT: Duration = Duration::from_secs(10);

/// A `[rate_limit]` section far above what any test reaches (1000/s, burst 1000), for tests
/// that make many connections but are not about rate limiting.
pub const HIGH_RATE_LIMIT: &str = "[rate_limit]\nrate = 1000\nburst = 1000\n";

/// A certificate authority that can issue server and client certificates.
pub struct Ca {
    /// The self-signed CA certificate.
    pub cert: rcgen::Certificate,
    /// Its key, which signs what the CA issues (and CRLs).
    pub key: KeyPair,
}

impl Ca {
    /// A fresh CA named `cn`, allowed to sign certificates and CRLs.
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a certificate with `params` for a fresh key.
    pub fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued { cert, key }
    }

    /// A server certificate for `localhost`, `server.lb.com` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "server.lb.com".to_string()])
                .unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name = dn("server.lb.com");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate (clientAuth) whose subject CN is `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(client_params(dn(cn)))
    }
}

/// A subject with only a common name.
pub fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Client certificate parameters (clientAuth) for `dn`, to adjust before [`Ca::issue`].
pub fn client_params(dn: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// A certificate and its key.
pub struct Issued {
    /// The certificate.
    pub cert: rcgen::Certificate,
    /// Its key.
    pub key: KeyPair,
}

impl Issued {
    /// The certificate alone, as a chain to present.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }

    /// The key, as rustls takes it.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key.serialize_pem().as_bytes()).unwrap()
    }
}

/// The certificates of one test: a CA with a server certificate, written to a folder so the
/// balancer loads them the way it does in production.
pub struct Pki {
    /// The test's folder: ca.crt, server.crt and server.key.pem, and whatever the test adds.
    pub dir: PathBuf,
    /// The CA every certificate of the test comes from.
    pub ca: Ca,
    /// lclb's server certificate.
    pub server: Issued,
}

impl Pki {
    /// A fresh CA and server certificate, written to a fresh folder named after `name`.
    pub fn new(name: &str) -> Pki {
        let dir = temp_dir(name);
        let ca = Ca::new("ca.lb.com");
        let server = ca.server();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.crt"), server.cert.pem()).unwrap();
        std::fs::write(dir.join("server.key.pem"), server.key.serialize_pem()).unwrap();
        Pki { dir, ca, server }
    }

    /// A client certificate for `cn`, issued by this test's CA.
    pub fn client(&self, cn: &str) -> Issued {
        self.ca.client(cn)
    }

    /// The `[tls]` section pointing at this PKI's files.
    pub fn tls_section(&self) -> String {
        self.tls_section_with("")
    }

    /// The `[tls]` section with `lines` (such as `crls = [...]`) before the file keys.
    fn tls_section_with(&self, lines: &str) -> String {
        format!(
            "[tls]\n{lines}ca_cert = {:?}\nserver_cert = {:?}\nserver_key = {:?}\n",
            self.dir.join("ca.crt"),
            self.dir.join("server.crt"),
            self.dir.join("server.key.pem")
        )
    }

    /// The usual config: this PKI's `[tls]`, then `extra` (sections such as `[limits]`, or more
    /// `[[upstream]]` entries), `upstreams` all in group `web`, and `client1.lb.com` allowed
    /// to `web`. [`Pki::usual`] is the same as a builder, to add to.
    pub fn config(&self, extra: &str, upstreams: &[&Upstream]) -> String {
        self.usual(upstreams).section(extra).build()
    }

    /// The usual config as a builder: `upstreams` all in group `web`, and `client1.lb.com`
    /// allowed to `web`.
    pub fn usual(&self, upstreams: &[&Upstream]) -> ConfigBuilder<'_> {
        self.builder()
            .upstreams(upstreams, "web")
            .client("client1.lb.com", &["web"])
    }

    /// A config built up piece by piece, starting from this PKI's `[tls]` section alone.
    pub fn builder(&self) -> ConfigBuilder<'_> {
        ConfigBuilder {
            pki: self,
            listen: None,
            metrics_listen: None,
            tls_lines: String::new(),
            sections: String::new(),
            limits: String::new(),
            upstreams: String::new(),
            clients: String::new(),
        }
    }

    /// A rustls client config trusting this PKI's CA, presenting `client` (or no certificate).
    pub fn client_config(&self, client: Option<&Issued>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert.der().clone()).unwrap();
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(c.chain(), c.key_der())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// A config's text, built from the parts tests vary. [`ConfigBuilder::build`] writes them in a
/// fixed order whatever the order of the calls: `listen`, `metrics_listen`, `[tls]`, the sections, one
/// `[limits]`, the upstreams (in call order: that order is the balancer's tie-break), the
/// clients. Without [`ConfigBuilder::listen`] there is no `listen` key, as [`Lb::start`] wants.
pub struct ConfigBuilder<'a> {
    pki: &'a Pki,
    listen: Option<String>,
    metrics_listen: Option<String>,
    tls_lines: String,
    sections: String,
    limits: String,
    upstreams: String,
    clients: String,
}

impl ConfigBuilder<'_> {
    /// `listen = "ADDR"`, for config files the binary or [`Lb::start_from_file`] reads. The
    /// last call wins.
    pub fn listen(mut self, addr: impl Display) -> Self {
        self.listen = Some(format!("listen = \"{addr}\"\n"));
        self
    }

    /// `metrics_listen = "ADDR"` (such as `"127.0.0.1:0"`, read back with
    /// [`Process::metrics_addr`]). The last call wins.
    pub fn metrics_listen(mut self, addr: impl Display) -> Self {
        self.metrics_listen = Some(format!("metrics_listen = \"{addr}\"\n"));
        self
    }

    /// One more line in `[tls]`, such as `crls = [...]`.
    pub fn tls(mut self, line: &str) -> Self {
        self.tls_lines.push_str(line);
        self.tls_lines.push('\n');
        self
    }

    /// Whole sections as TOML text, such as [`HIGH_RATE_LIMIT`] or `[health_check]` lines.
    /// With [`ConfigBuilder::limit`], `[limits]` lines go there instead, so that all make one
    /// section.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push_str(text);
        self
    }

    /// One line of the `[limits]` section, such as `idle_timeout = "1s"`.
    pub fn limit(mut self, line: &str) -> Self {
        self.limits.push_str(line);
        self.limits.push('\n');
        self
    }

    /// The test upstream `upstream` in `group`.
    pub fn upstream(self, upstream: &Upstream, group: &str) -> Self {
        self.upstream_at(&upstream.name, upstream.addr, group)
    }

    /// All of `upstreams` in `group`, in order.
    pub fn upstreams(self, upstreams: &[&Upstream], group: &str) -> Self {
        upstreams
            .iter()
            .fold(self, |b, u| b.upstream_at(&u.name, u.addr, group))
    }

    /// An upstream named `name` at `addr` (a dead port, a listener the test drives itself) in
    /// `group`.
    pub fn upstream_at(mut self, name: &str, addr: impl Display, group: &str) -> Self {
        self.upstreams.push_str(&upstream_entry(name, addr, group));
        self
    }

    /// The client identity `cn`, allowed to `groups`.
    pub fn client(self, cn: &str, groups: &[&str]) -> Self {
        self.client_with(cn, groups, "")
    }

    /// The client identity `cn`, allowed to `groups`, with more keys of its entry in `lines`
    /// (such as `"rate = 0.01\nburst = 3\n"`).
    pub fn client_with(mut self, cn: &str, groups: &[&str], lines: &str) -> Self {
        self.clients.push_str(&format!(
            "[[client]]\ncn = {cn:?}\ngroups = {groups:?}\n{lines}"
        ));
        self
    }

    /// The config text.
    pub fn build(self) -> String {
        assert!(
            self.limits.is_empty() || !self.sections.contains("[limits]"),
            "[limits] lines go through ConfigBuilder::limit, or the section appears twice"
        );
        let mut text = self.listen.unwrap_or_default();
        text.push_str(&self.metrics_listen.unwrap_or_default());
        text.push_str(&self.pki.tls_section_with(&self.tls_lines));
        text.push_str(&self.sections);
        if !self.limits.is_empty() {
            text.push_str("[limits]\n");
            text.push_str(&self.limits);
        }
        text.push_str(&self.upstreams);
        text.push_str(&self.clients);
        text
    }
}

/// The `[[upstream]]` entry for `name` at `addr` in `group`.
pub fn upstream_entry(name: &str, addr: impl Display, group: &str) -> String {
    format!("[[upstream]]\nname = {name:?}\naddress = \"{addr}\"\ngroup = {group:?}\n")
}

/// How a test upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends "NAME\n", then echoes every byte until EOF, then closes.
    Echo,
    /// Reads until EOF, then sends "NAME got N\n" followed by everything it read, then closes.
    Collect,
    /// Sends "NAME\n", reads until EOF, then neither sends nor closes (for up to a minute).
    Silent,
}

/// A real TCP upstream server on loopback.
pub struct Upstream {
    /// The name it greets with, and its name in configs.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted so far (health probes included).
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// An upstream named `name` on a free loopback port.
    pub fn start(name: &str, mode: Mode) -> Upstream {
        Upstream::start_on(name, mode, TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// An upstream named `name` on `listener` (to come back on the port of one stopped).
    pub fn start_on(name: &str, mode: Mode, listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (n, s, a) = (name.to_string(), stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            for sock in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(sock) = sock else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let n = n.clone();
                std::thread::spawn(move || {
                    let _ = serve_upstream(&n, mode, sock);
                });
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// The `[[upstream]]` entry for this server in `group`.
    pub fn entry(&self, group: &str) -> String {
        upstream_entry(&self.name, self.addr, group)
    }

    /// Stops accepting and closes the listening socket (connections in flight go on).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_upstream(name: &str, mode: Mode, mut sock: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    match mode {
        Mode::Echo => {
            sock.write_all(format!("{name}\n").as_bytes())?;
            loop {
                let n = sock.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sock.write_all(&buf[..n])?;
            }
        }
        Mode::Silent => {
            sock.write_all(format!("{name}\n").as_bytes())?;
            while sock.read(&mut buf)? > 0 {}
            std::thread::sleep(Duration::from_secs(60));
        }
        Mode::Collect => {
            let mut all = Vec::new();
            sock.read_to_end(&mut all)?;
            sock.write_all(format!("{name} got {}\n", all.len()).as_bytes())?;
            sock.write_all(&all)?;
        }
    }
    sock.shutdown(Shutdown::Write)
}

/// A running lclb on a loopback port.
pub struct Lb {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state: counters, the balancer, reload.
    pub shared: Arc<lclb::Shared>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl Lb {
    /// Starts lclb with `config` (TOML, without `listen`, which is set to a free port).
    pub fn start(config: &str) -> Lb {
        let text = format!("listen = \"127.0.0.1:0\"\n{config}");
        Lb::run(Config::parse(&text, Path::new(".")).unwrap())
    }

    /// Starts lclb from a config file (which sets `listen`), so tests can reload it.
    pub fn start_from_file(path: &Path) -> Lb {
        Lb::run(Config::load(path).unwrap())
    }

    fn run(config: Config) -> Lb {
        let _ = env_logger::builder().is_test(true).try_init();
        lclb::install_default_provider();
        let server = Server::bind(config).unwrap();
        let addr = server.local_addr();
        let shared = server.shared();
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        Lb {
            addr,
            shared,
            handle,
            thread: Some(thread),
        }
    }

    /// Stops the server and waits for it to drain.
    pub fn stop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> &lclb::Stats {
        &self.shared.stats
    }

    /// The least-connection table.
    pub fn table(&self) -> &lclb::UpstreamTable {
        self.shared.balancer.table()
    }

    /// Connections the balancer has opened to upstreams for clients (health probes excluded).
    pub fn forwarded(&self) -> u64 {
        self.shared.balancer.table().total_forwarded()
    }

    /// Waits until `what` holds of the counters; false after [`WAIT`].
    pub fn wait_for(&self, what: impl Fn(&lclb::Stats) -> bool) -> bool {
        wait_until(|| what(self.stats()))
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `what` until it holds; false after [`WAIT`].
pub fn wait_until(what: impl Fn() -> bool) -> bool {
    poll_until(|| what().then_some(())).is_some()
}

/// Polls `what` until it gives a value; None after [`WAIT`].
pub fn poll_until<T>(what: impl FnMut() -> Option<T>) -> Option<T> {
    poll_within(WAIT, what)
}

/// Polls `what` until it gives a value; None once `within` has passed. Every wait of the
/// tests is this loop (or a blocking call with a timeout): for a bound other than [`WAIT`].
pub fn poll_within<T>(within: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let until = deadline_in(within);
    loop {
        if let Some(value) = what() {
            return Some(value);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `within` from now.
pub fn deadline_in(within: Duration) -> Instant {
    Instant::now()
        .checked_add(within)
        .expect("the clock is far from its end")
}

/// True if a connection to `addr` with `config` is greeted by the upstream `name`; false if it
/// is refused, fails, or another upstream answers. A condition for [`wait_until`].
pub fn greeted_by(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> bool {
    greeting(addr, config.clone()).ok().as_deref() == Some(name)
}

/// True if a connection to `addr` with `config` is greeted by any upstream.
pub fn is_served(addr: SocketAddr, config: &Arc<ClientConfig>) -> bool {
    greeting(addr, config.clone()).is_ok()
}

/// A client-side TLS connection over TCP.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to `addr` with `config` and completes the handshake.
pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsStream> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let conn = ClientConnection::new(config, ServerName::try_from("localhost").unwrap())
        .map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Reads one line (without the newline).
pub fn read_line(stream: &mut TlsStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    String::from_utf8(line).map_err(io::Error::other)
}

/// Connects and returns the name of the upstream that greeted, or the error that refused us.
/// A refused client sees the connection closed (cleanly or not) with no greeting.
pub fn greeting(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<String> {
    let mut stream = connect(addr, config)?;
    let name = read_line(&mut stream)?;
    if name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "closed without a greeting",
        ));
    }
    stream.conn.send_close_notify();
    let _ = stream.flush();
    Ok(name)
}

/// Reads everything until the peer closes; a close without close_notify is an error
/// (UnexpectedEof, from rustls).
pub fn read_all(stream: &mut TlsStream) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    Ok(all)
}

/// Reads lines from a plain reader (used by tests that talk TCP directly).
pub fn lines(r: impl Read) -> Vec<String> {
    BufReader::new(r).lines().map_while(Result::ok).collect()
}

/// A running lclb process whose log lines arrive on a channel.
pub struct Process {
    /// The child process; killed and reaped on drop.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    bound: Arc<std::sync::Mutex<Bound>>,
}

/// The addresses a process logged that it bound.
#[derive(Debug, Default, Clone, Copy)]
struct Bound {
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

/// The address in `line` between `prefix` and the first `end` after it, if it parses.
fn address_after(line: &str, prefix: &str, end: char) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(prefix)?;
    rest.split(end).next()?.parse().ok()
}

impl Process {
    /// Runs the lclb binary (`bin`, the test's `env!("CARGO_BIN_EXE_lclb")`) on `config`.
    pub fn start(bin: &str, config: &Path) -> Process {
        let mut command = Command::new(bin);
        command.arg("--config").arg(config);
        Process::spawn(command)
    }

    /// Runs `command` with RUST_LOG=info, collecting its stderr lines (and noting the listen
    /// and metrics addresses it logs, for [`Process::listen_addr`] and
    /// [`Process::metrics_addr`]).
    pub fn spawn(mut command: Command) -> Process {
        let mut child = command
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let bound = Arc::new(std::sync::Mutex::new(Bound::default()));
        let err = child.stderr.take().unwrap();
        let seen = bound.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(addr) = address_after(&line, LISTENING_ON, ' ') {
                    seen.lock().unwrap().listen = Some(addr);
                }
                if let Some(addr) = address_after(&line, METRICS_ON, '/') {
                    seen.lock().unwrap().metrics = Some(addr);
                }
                let _ = tx.send(line);
            }
        });
        Process {
            child,
            lines,
            bound,
        }
    }

    /// Where the process listens for clients, as its start-up line says (`lclb listening on
    /// ADDR with ...`): with `listen = "127.0.0.1:0"` the port the kernel gave it, so no
    /// other program can have taken it in between. Waits for the line (up to [`WAIT`]), which
    /// comes once the signal handlers are in place; panics if it never comes. Log lines are
    /// not consumed.
    pub fn listen_addr(&self) -> SocketAddr {
        poll_until(|| self.bound.lock().unwrap().listen)
            .unwrap_or_else(|| panic!("lclb logged no `{LISTENING_ON}ADDR` line within {WAIT:?}"))
    }

    /// Where the process serves metrics, as its line `metrics on http://ADDR/metrics` says;
    /// waits and panics as [`Process::listen_addr`] does.
    pub fn metrics_addr(&self) -> SocketAddr {
        poll_until(|| self.bound.lock().unwrap().metrics).unwrap_or_else(|| {
            panic!("lclb logged no `{METRICS_ON}ADDR/metrics` line within {WAIT:?}")
        })
    }

    /// The next log line that contains `needle` (earlier ones are dropped); None after
    /// [`WAIT`] or once the process has closed its stderr.
    pub fn wait_line(&self, needle: &str) -> Option<String> {
        self.lines_until(needle, WAIT)
            .and_then(|mut seen| seen.pop())
    }

    /// Sends the signal `name` (TERM, HUP, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The exit code once the process has exited; None if it still runs after [`WAIT`] (or
    /// was killed by a signal).
    pub fn wait_exit(&mut self) -> Option<i32> {
        self.wait_exit_within(WAIT)
    }

    /// The exit code once the process has exited; None if it still runs after `within` (or
    /// was killed by a signal). For a promise such as "exits within drain_timeout + 2 s", the
    /// bound is what this waits, never a measured time.
    pub fn wait_exit_within(&mut self, within: Duration) -> Option<i32> {
        poll_within(within, || self.child.try_wait().unwrap()).and_then(|status| status.code())
    }
}

/// What lclb's start-up line says before its listen address.
const LISTENING_ON: &str = "lclb listening on ";

/// What the metrics server's start-up line says before its address.
const METRICS_ON: &str = "metrics on http://";

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rustls client config trusting `pki`'s CA and presenting `client`, speaking only
/// `version`. Its resumption store is its own and shared by every connection made with it.
pub fn client_config_for(
    pki: &Pki,
    client: &Issued,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.cert.der().clone()).unwrap();
    let mut config = ClientConfig::builder_with_protocol_versions(&[version])
        .with_root_certificates(roots)
        .with_client_auth_cert(client.chain(), client.key_der())
        .unwrap();
    config.resumption = rustls::client::Resumption::in_memory_sessions(64);
    Arc::new(config)
}

/// The TLS error inside an I/O error from a rustls stream, if that is what it is.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A PEM CRL signed by `ca`, revoking `revoked` (serial numbers), issued on `this_update` and
/// current until `next_update` (year, month, day).
pub fn crl_pem(
    ca: &Ca,
    revoked: &[u64],
    this_update: (i32, u8, u8),
    next_update: (i32, u8, u8),
) -> String {
    use rcgen::{date_time_ymd, RevocationReason, RevokedCertParams, SerialNumber};
    rcgen::CertificateRevocationListParams {
        this_update: date_time_ymd(this_update.0, this_update.1, this_update.2),
        next_update: date_time_ymd(next_update.0, next_update.1, next_update.2),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|&serial| RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: date_time_ymd(this_update.0, this_update.1, this_update.2),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&ca.cert, &ca.key)
    .unwrap()
    .pem()
    .unwrap()
}

/// A client certificate for `cn` with serial number `serial`, issued by `ca`.
pub fn client_with_serial(ca: &Ca, cn: &str, serial: u64) -> Issued {
    let mut params = client_params(dn(cn));
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    ca.issue(params)
}

/// `config` (as [`Pki::config`] makes it) with `tls_keys` (such as `crls = [...]`) added to
/// its `[tls]` section.
pub fn with_tls_keys(config: &str, tls_keys: &str) -> String {
    config.replacen("[tls]\n", &format!("[tls]\n{tls_keys}"), 1)
}

impl Process {
    /// Every line the process writes until one contains `needle` (that line included), or
    /// until `within` has passed; `None` if the needle never came.
    pub fn lines_until(&self, needle: &str, within: Duration) -> Option<Vec<String>> {
        let deadline = deadline_in(within);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return Some(seen);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }
}

/// What a client saw when it tried to be served: the refusals of README "What clients see".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An upstream greeted with this name.
    Greeted(String),
    /// The handshake (or the first read after it) ended with this TLS alert from lclb.
    Alert(rustls::AlertDescription),
    /// The handshake completed, then lclb sent close_notify without a byte before it.
    CloseNotifyNoBytes,
    /// The socket was closed (EOF or reset) before the handshake completed, with no alert.
    ClosedBeforeHandshake,
    /// Anything else, as text.
    Other(String),
}

/// Connects to `addr` with `config`, reads the greeting line, and says how it went.
pub fn outcome(addr: SocketAddr, config: &Arc<ClientConfig>) -> Outcome {
    let failed = |e: io::Error, handshaking: bool| match tls_error(&e) {
        Some(rustls::Error::AlertReceived(alert)) => Outcome::Alert(*alert),
        _ if handshaking
            && matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Outcome::ClosedBeforeHandshake
        }
        _ => Outcome::Other(format!("{e:?}")),
    };
    let mut stream = match connect(addr, config.clone()) {
        Ok(stream) => stream,
        Err(e) => return failed(e, true),
    };
    match read_line(&mut stream) {
        Ok(name) if name.is_empty() => Outcome::CloseNotifyNoBytes,
        Ok(name) => {
            stream.conn.send_close_notify();
            let _ = stream.flush();
            Outcome::Greeted(name)
        }
        Err(e) => failed(e, false),
    }
}

impl Pki {
    /// Adds `other` to this PKI's `ca.crt`, so a server configured with it trusts both CAs.
    pub fn trust_also(&self, other: &Ca) {
        std::fs::write(
            self.dir.join("ca.crt"),
            format!("{}{}", self.ca.pem(), other.pem()),
        )
        .unwrap();
    }
}

// Identity helpers: certificates that name a client by more than its CN, chains through an
// intermediate CA, more trust roots, and key pins.

impl Ca {
    /// An intermediate CA named `cn`, signed by this CA: it issues like any [`Ca`], and its
    /// certificate (`.cert`) is what a client sends after its own, for
    /// [`Pki::client_config_chain`].
    pub fn intermediate(&self, cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Ca { cert, key }
    }

    /// Issues a certificate with `params` for the key of `existing`: a re-issue (new serial,
    /// new validity, whatever `params` says) that keeps the key, and so its pin.
    pub fn reissue(&self, params: CertificateParams, existing: &Issued) -> Issued {
        let key = KeyPair::from_pem(&existing.key.serialize_pem()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued { cert, key }
    }

    /// A client certificate with the URI SANs `uris` and, when `cn` is given, that subject CN
    /// (without one, the subject is `O=lclb`).
    pub fn client_with_uris(&self, cn: Option<&str>, uris: &[&str]) -> Issued {
        self.issue(san_params(cn, uris, &[]))
    }

    /// A client certificate with the DNS SANs `names` and, when `cn` is given, that subject CN
    /// (without one, the subject is `O=lclb`).
    pub fn client_with_dns(&self, cn: Option<&str>, names: &[&str]) -> Issued {
        self.issue(san_params(cn, &[], names))
    }
}

/// Client certificate parameters with subject CN `cn` (or, for `None`, only `O=lclb`), URI
/// SANs `uris` and DNS SANs `names`.
pub fn san_params(cn: Option<&str>, uris: &[&str], names: &[&str]) -> CertificateParams {
    let subject = match cn {
        Some(cn) => dn(cn),
        None => no_cn(),
    };
    let mut params = client_params(subject);
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*uri).try_into().unwrap()));
    }
    for name in names {
        params
            .subject_alt_names
            .push(SanType::DnsName((*name).try_into().unwrap()));
    }
    params
}

/// A subject without a common name: `O=lclb` alone.
pub fn no_cn() -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "lclb");
    dn
}

/// A subject with two common names, `first` and `second`, in two RDNs (rcgen keeps one value
/// per known type, so the second goes in under the CN's OID as a custom type).
pub fn two_cns(first: &str, second: &str) -> DistinguishedName {
    let mut dn = dn(first);
    dn.push(DnType::CustomDnType(vec![2, 5, 4, 3]), second);
    dn
}

impl Issued {
    /// The SHA-256 of this certificate's DER SubjectPublicKeyInfo as lclb reads it from the
    /// certificate: 64 lowercase hex digits, what `spki_sha256` takes.
    pub fn spki_sha256(&self) -> String {
        lclb::CertNames::read(self.cert.der())
            .unwrap()
            .spki_sha256
            .to_string()
    }

    /// The same pin computed from the key alone (rcgen's DER SubjectPublicKeyInfo, hashed
    /// here), without lclb's certificate parsing.
    pub fn key_sha256(&self) -> String {
        sha256_hex(&self.key.public_key_der())
    }

    /// The same pin computed the way the README tells operators to:
    /// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum`, on this
    /// certificate's PEM written to `dir`.
    pub fn openssl_spki_sha256(&self, dir: &Path) -> String {
        let pem = dir.join(format!("pin-{}.crt", &sha256_hex(self.cert.der())[..16]));
        std::fs::write(&pem, self.cert.pem()).unwrap();
        let script = format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
            pem.display()
        );
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().next().unwrap().to_string()
    }
}

/// `bytes`' SHA-256 in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Pki {
    /// A rustls client config trusting this PKI's CA, presenting `leaf` followed by the
    /// certificates of `intermediates` (nearest the leaf first).
    pub fn client_config_chain(&self, leaf: &Issued, intermediates: &[&Ca]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert.der().clone()).unwrap();
        let mut chain = leaf.chain();
        chain.extend(intermediates.iter().map(|ca| ca.cert.der().clone()));
        Arc::new(
            ClientConfig::builder()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, leaf.key_der())
                .unwrap(),
        )
    }

    /// Writes `ca`'s certificate to `NAME-ca.crt` in this PKI's folder and returns its `[[ca]]`
    /// section (named `name`, with `lines` such as `crls = [...]` added), for
    /// [`ConfigBuilder::section`].
    pub fn ca_section(&self, name: &str, ca: &Ca, lines: &str) -> String {
        let path = self.dir.join(format!("{name}-ca.crt"));
        std::fs::write(&path, ca.pem()).unwrap();
        format!("[[ca]]\nname = {name:?}\ncert = {path:?}\n{lines}")
    }
}

impl ConfigBuilder<'_> {
    /// A `[[client]]` entry of `keys` (TOML lines such as `name = "x"\nuri_san = "..."\n`),
    /// allowed to `groups`; after the entries added before it, since order decides.
    pub fn client_entry(mut self, keys: &str, groups: &[&str]) -> Self {
        self.clients
            .push_str(&format!("[[client]]\n{keys}groups = {groups:?}\n"));
        self
    }
}

/// A rustls client config trusting `pki`'s CA, presenting `leaf` followed by `intermediates`,
/// speaking only `version`, with a resumption store of its own shared by every connection
/// made with it.
pub fn client_config_chain_for(
    pki: &Pki,
    leaf: &Issued,
    intermediates: &[&Ca],
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.cert.der().clone()).unwrap();
    let mut chain = leaf.chain();
    chain.extend(intermediates.iter().map(|ca| ca.cert.der().clone()));
    let mut config = ClientConfig::builder_with_protocol_versions(&[version])
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, leaf.key_der())
        .unwrap();
    config.resumption = rustls::client::Resumption::in_memory_sessions(64);
    Arc::new(config)
}

/// An X.509 v1 client certificate for `cn` from `pki`'s CA, made the way the original
/// project's scripts made them (openssl `x509 -req` without an extension file): NAME.crt and
/// NAME.key in `pki.dir`. rcgen only writes v3.
pub fn openssl_v1_client(pki: &Pki, cn: &str, name: &str) -> (PathBuf, PathBuf) {
    let d = &pki.dir;
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    // OpenSSL 3's `x509 -req` without an extension file issues X.509 v1 certificates, as the
    // original project's scripts did.
    std::fs::write(d.join("ca.key"), pki.ca.key.serialize_pem()).unwrap();
    let run = |args: &[&str]| {
        openssl_ok(d, args);
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &key,
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        &csr,
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "7",
        "-days",
        "2",
        "-out",
        &crt,
    ]);
    let text = openssl_ok(d, &["x509", "-in", &crt, "-noout", "-text"]);
    assert!(
        text.contains("Version: 1"),
        "the fixture is a v1 certificate"
    );

    (d.join(crt), d.join(key))
}

// Ports without races, sockets the server closes, openssl, and metrics: helpers shared by the
// files that had their own copies.

/// A loopback port of the test's own: bound, so no request for a free port (a bind to port 0,
/// an outgoing connect) elsewhere can get it, and listening only while the test says so. Closed (at first, and after [`ClosedPort::close`]), a connect
/// to it is refused (RST); after [`ClosedPort::listen`] it is a listener again on the same
/// port. An upstream that goes away and comes back, without the port ever being free for
/// another program to bind in between, as a port released and bound again would be.
pub struct ClosedPort {
    /// The port's address.
    pub addr: SocketAddr,
    socket: socket2::Socket,
}

impl ClosedPort {
    /// A fresh loopback port, held closed.
    pub fn new() -> ClosedPort {
        use socket2::{Domain, Socket, Type};
        let reusable = || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_reuse_address(true).unwrap();
            socket
        };
        // A socket bound to port 0 gives its port back when a listen on it is shut down, so
        // the port is taken by one, then bound by its number (which keeps it across shutdowns)
        // by a second while the first still holds it.
        let first = reusable();
        first
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let socket = reusable();
        socket.bind(&addr.into()).unwrap();
        drop(first);
        ClosedPort { addr, socket }
    }

    /// Starts listening: connects succeed from now on. The listener returned shares the
    /// socket, for [`Upstream::start_on`]; dropping it does not close the port.
    pub fn listen(&self) -> TcpListener {
        self.socket.listen(128).unwrap();
        self.socket.try_clone().unwrap().into()
    }

    /// Stops listening (connections waiting in the backlog are reset): connects are refused
    /// again, and the port stays this test's. Stop the [`Upstream`] serving it first.
    pub fn close(&self) {
        self.socket.shutdown(Shutdown::Both).unwrap();
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// A loopback port where a TCP connect neither succeeds nor fails: it listens with a backlog
/// of 0 and one connection already queued, so the kernel drops every further SYN and the
/// connecting side retransmits (after 1 s, 3 s, 7 s, ...) until its own timeout. What an
/// unreachable upstream looks like, for connect and probe timeouts.
pub struct Blackhole {
    /// The address that never answers.
    pub addr: SocketAddr,
    listener: TcpListener,
    _queued: TcpStream,
}

impl Blackhole {
    /// A fresh black hole on loopback.
    pub fn new() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let queued = TcpStream::connect(addr).unwrap();
        Blackhole {
            addr,
            listener,
            _queued: queued,
        }
    }

    /// Takes the queued connection off the backlog and hands the listener back: the next SYN
    /// retransmission of a connect in progress gets through, as do new connects.
    pub fn open(self) -> TcpListener {
        let (queued, _) = self.listener.accept().unwrap();
        drop(queued);
        self.listener
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Blackhole::new()
    }
}

/// How the server closed a plain TCP socket: what it sent first, and whether it ended with a
/// reset rather than a FIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The bytes that came before the close.
    pub sent: Vec<u8>,
    /// True for a reset (or an abort), false for a clean end of stream.
    pub reset: bool,
}

/// Reads `s` until the server closes it (EOF or reset) and says how; None if it is still
/// open at `deadline`. Any other read error fails the test.
pub fn server_closes(s: &mut TcpStream, deadline: Instant) -> Option<Closed> {
    let mut sent = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        // A zero read timeout would mean none at all.
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(Closed { sent, reset: false }),
            Ok(n) => sent.extend_from_slice(&buf[..n]),
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return None,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => return Some(Closed { sent, reset: true }),
                _ => panic!("reading a socket the server should close: {e}"),
            },
        }
    }
}

/// True once the server has closed `s` (EOF or reset), whatever it sent first; false if it
/// is still open after [`WAIT`].
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    server_closes(s, deadline_in(WAIT)).is_some()
}

/// Whether this machine has an IPv6 loopback: a connect to `[::1]:9` (the discard port,
/// closed) is refused rather than impossible.
pub fn ipv6_loopback() -> bool {
    match TcpStream::connect("[::1]:9") {
        Ok(_) => true,
        Err(e) => {
            e.kind() != io::ErrorKind::AddrNotAvailable
                && e.raw_os_error() != Some(97) // EAFNOSUPPORT
                && e.raw_os_error() != Some(101) // ENETUNREACH
        }
    }
}

/// A rustls client config trusting every CA of `roots` for the server's certificate and
/// presenting `client` (or no certificate): for a server whose CA changes under it.
pub fn client_config_trusting(roots: &[&Ca], client: Option<&Issued>) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for ca in roots {
        store.add(ca.cert.der().clone()).unwrap();
    }
    let builder = ClientConfig::builder().with_root_certificates(store);
    Arc::new(match client {
        Some(c) => builder
            .with_client_auth_cert(c.chain(), c.key_der())
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// Runs `openssl ARGS` in `dir` and returns what it did, whatever its exit status.
pub fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed")
}

/// Runs `openssl ARGS` in `dir`, which must succeed; its stdout.
pub fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let out = openssl(dir, args);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `openssl s_client` saw: the upstream's greeting line, if one arrived, its stderr
/// (with `-brief`: the negotiated protocol and suite, or the alert that ended the handshake)
/// and `-msg`'s trace of the handshake messages.
pub struct OpensslRun {
    /// The first line of application data, if any came within [`WAIT`].
    pub greeting: Option<String>,
    /// s_client's stderr.
    pub stderr: String,
    /// `-msg`'s trace of the handshake messages, each line naming its record's version.
    pub messages: String,
}

impl OpensslRun {
    /// Asserts the handshake completed with `protocol` and `suite`, and `upstream` greeted.
    pub fn served_by(&self, upstream: &str, protocol: &str, suite: &str) {
        assert_eq!(
            self.greeting.as_deref(),
            Some(upstream),
            "not served by {upstream}: {}",
            self.stderr
        );
        assert!(
            self.stderr
                .contains(&format!("Protocol version: {protocol}"))
                && self.stderr.contains(&format!("Ciphersuite: {suite}")),
            "want {protocol} with {suite}: {}",
            self.stderr
        );
    }

    /// Asserts lclb refused the handshake with TLS alert `alert` after the client sent a
    /// ClientHello as `offered` ("TLS 1.2"): openssl did not stop at its own configuration,
    /// the server said no.
    pub fn refused_with_alert(&self, alert: u8, offered: &str) {
        assert_eq!(
            self.greeting, None,
            "served, but should be refused: {}",
            self.stderr
        );
        let hello = format!(">>> {offered}, Handshake");
        assert!(
            self.messages
                .lines()
                .any(|l| l.starts_with(&hello) && l.contains("ClientHello")),
            "want a {offered} ClientHello sent: {}",
            self.messages
        );
        assert!(
            self.stderr.contains(&format!("alert number {alert}")),
            "want alert {alert} from lclb: {}",
            self.stderr
        );
    }
}

/// Connects to `addr` with `openssl s_client -brief -msg`, presenting `cert` and `key` (files
/// in `dir`) and checking the server against `dir/ca.crt`, with `args` added. Stdin stays
/// open until the greeting arrives or the client ends, since s_client closes the connection
/// as soon as stdin ends.
pub fn s_client(addr: SocketAddr, dir: &Path, cert: &str, key: &str, args: &[&str]) -> OpensslRun {
    static N: AtomicUsize = AtomicUsize::new(0);
    let msgfile = format!("msg-{}.txt", N.fetch_add(1, Ordering::SeqCst));
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(["-cert", cert, "-key", key])
        .args(["-CAfile", "ca.crt", "-servername", "localhost", "-brief"])
        .args(["-msg", "-msgfile", &msgfile])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let first = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|line| !line.is_empty());
        let _ = tx.send(first);
    });
    let greeting = rx.recv_timeout(WAIT).ok().flatten();
    let _ = child.kill();
    let _ = child.wait();
    let mut text = String::new();
    let _ = stderr.read_to_string(&mut text);
    OpensslRun {
        greeting,
        stderr: text,
        messages: std::fs::read_to_string(dir.join(&msgfile)).unwrap_or_default(),
    }
}

/// [`s_client`] as a fresh `client1.lb.com` of `pki` (written to `c.crt` and `c.key` in its
/// folder).
pub fn openssl_client(addr: SocketAddr, pki: &Pki, args: &[&str]) -> OpensslRun {
    let client = pki.client("client1.lb.com");
    std::fs::write(pki.dir.join("c.crt"), client.cert.pem()).unwrap();
    std::fs::write(pki.dir.join("c.key"), client.key.serialize_pem()).unwrap();
    s_client(addr, &pki.dir, "c.crt", "c.key", args)
}

/// GETs `path` from `addr` (HTTP/1.1, read until the server closes); the status line and the
/// body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("a whole answer");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// `GET /metrics` from `addr`, which must answer 200; the body.
pub fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// Prometheus text as `name{labels}` -> value, comments skipped.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("a sample is `name value`");
            (k.to_string(), v.parse().expect("the value is a number"))
        })
        .collect()
}

impl ConfigBuilder<'_> {
    /// The test upstream `upstream` in `group`, with more keys of its entry in `lines` (such
    /// as `"weight = 3\n"` or `"slow_start = \"1h\"\n"`).
    pub fn upstream_with(mut self, upstream: &Upstream, group: &str, lines: &str) -> Self {
        self.upstreams
            .push_str(&upstream_entry(&upstream.name, upstream.addr, group));
        self.upstreams.push_str(lines);
        self
    }
}

impl Lb {
    /// The id of the configured upstream `name`; panics if there is none.
    pub fn upstream_id(&self, name: &str) -> lclb::UpstreamId {
        self.table()
            .snapshot()
            .iter()
            .find(|u| &*u.name == name)
            .unwrap_or_else(|| panic!("no upstream {name}"))
            .id
    }

    /// Failed client connects to the configured upstream `name` so far.
    pub fn connect_failures(&self, name: &str) -> u64 {
        self.table()
            .snapshot()
            .iter()
            .find(|u| &*u.name == name)
            .unwrap_or_else(|| panic!("no upstream {name}"))
            .stats
            .connect_failures
            .load(Ordering::SeqCst)
    }
}

/// Opens `n` connections with `config` and keeps them open; returns them with how many each
/// upstream (by greeting) got.
pub fn hold(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    n: usize,
) -> (Vec<TlsStream>, std::collections::BTreeMap<String, usize>) {
    let mut held = Vec::new();
    let mut count = std::collections::BTreeMap::new();
    for i in 0..n {
        let mut s = connect(addr, config.clone())
            .unwrap_or_else(|e| panic!("held connection {i} of {n}: {e}"));
        let name = read_line(&mut s).unwrap();
        *count.entry(name).or_default() += 1;
        held.push(s);
    }
    (held, count)
}

// TLS upstreams: a real rustls server on loopback, as `Upstream` is a real TCP one, for the
// `[group.tls]` tests.

/// How a TLS test upstream answers, after its handshake. "Closes" is close_notify, then FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Sends "NAME\n", then echoes every byte until the client's close_notify, then closes.
    Echo,
    /// Reads until the client's close_notify, then sends "NAME got N\n" followed by everything
    /// it read, then closes.
    Collect,
    /// Sends "NAME\n" and closes its sending side at once (close_notify), then reads until the
    /// client's close_notify and keeps what it read (see [`TlsSeen::received`]).
    CloseFirst,
    /// Sends "NAME\n", then ends its sending side with a FIN and no close_notify, and reads
    /// until the client's FIN.
    Truncate,
    /// Sends "NAME\n", then a TLS 1.3 key update that asks for one in return, then echoes as
    /// [`TlsMode::Echo`] does.
    Rekey,
}

/// What a TLS test upstream saw on one connection, recorded when the connection ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSeen {
    /// How the handshake went; `None` when it failed.
    pub kind: Option<rustls::HandshakeKind>,
    /// Why the handshake failed, when it did.
    pub error: Option<String>,
    /// Whether the client (lclb) presented a certificate.
    pub client_cert: bool,
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// The plaintext bytes it read.
    pub received: Vec<u8>,
    /// Whether the client's stream ended with close_notify.
    pub close_notify: bool,
    /// How reading the client's stream failed, if it did (a FIN without close_notify is
    /// `UnexpectedEof`; a reset, `ConnectionReset`).
    pub read_error: Option<io::ErrorKind>,
}

/// A real TLS upstream server (rustls, its own session cache, so clients can resume) on
/// loopback.
pub struct TlsUpstream {
    /// The name it greets with, and its name in configs.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every connection that ended so far, health probes included, in the order they ended.
    pub seen: Arc<std::sync::Mutex<Vec<TlsSeen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TlsUpstream {
    /// An upstream named `name` presenting `cert` (with its CA's chain of one), answering as
    /// `mode`; with `client_ca`, it requires a client certificate from that CA. TLS 1.3 and 1.2.
    pub fn start(name: &str, mode: TlsMode, cert: &Issued, client_ca: Option<&Ca>) -> TlsUpstream {
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        TlsUpstream::start_with(name, mode, cert, client_ca, &versions)
    }

    /// As [`TlsUpstream::start`], speaking only `versions`.
    pub fn start_with(
        name: &str,
        mode: TlsMode,
        cert: &Issued,
        client_ca: Option<&Ca>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsUpstream {
        lclb::install_default_provider();
        let builder = rustls::ServerConfig::builder_with_protocol_versions(versions);
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.cert.der().clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = Arc::new(
            builder
                .with_single_cert(cert.chain(), cert.key_der())
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (n, s, record) = (name.to_string(), stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            for sock in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(sock) = sock else { continue };
                let (n, config, record) = (n.clone(), config.clone(), record.clone());
                std::thread::spawn(move || {
                    let seen = serve_tls_upstream(&n, mode, config, sock);
                    record.lock().unwrap().push(seen);
                });
            }
        });
        TlsUpstream {
            name: name.to_string(),
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The connections that carried at least one byte from the client (health probes carry
    /// none), in the order they ended.
    pub fn served(&self) -> Vec<TlsSeen> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| !s.received.is_empty())
            .cloned()
            .collect()
    }

    /// Stops accepting and closes the listening socket (connections in flight go on).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_tls_upstream(
    name: &str,
    mode: TlsMode,
    config: Arc<rustls::ServerConfig>,
    mut sock: TcpStream,
) -> TlsSeen {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(30)));
    let mut seen = TlsSeen {
        kind: None,
        error: None,
        client_cert: false,
        sni: None,
        received: Vec::new(),
        close_notify: false,
        read_error: None,
    };
    let mut conn = rustls::ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            seen.error = Some(e.to_string());
            return seen;
        }
    }
    seen.kind = conn.handshake_kind();
    seen.client_cert = conn.peer_certificates().is_some();
    seen.sni = conn.server_name().map(str::to_string);
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let _ = tls_upstream_answer(name, mode, &mut stream, &mut seen);
    seen
}

/// Reads plaintext until the client's close_notify (`Ok`) or anything else (`Err`, also kept
/// in `seen`).
fn read_until_close_notify(
    stream: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    seen: &mut TlsSeen,
    echo: bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                seen.read_error = Some(e.kind());
                return Err(e);
            }
        };
        if n == 0 {
            seen.close_notify = true;
            return Ok(());
        }
        seen.received.extend_from_slice(&buf[..n]);
        if echo {
            stream.write_all(&buf[..n])?;
        }
    }
}

fn close_notify_and_fin(
    stream: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
) -> io::Result<()> {
    stream.conn.send_close_notify();
    stream.flush()?;
    stream.sock.shutdown(Shutdown::Write)
}

fn tls_upstream_answer(
    name: &str,
    mode: TlsMode,
    stream: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    seen: &mut TlsSeen,
) -> io::Result<()> {
    let greeting = format!("{name}\n");
    match mode {
        TlsMode::Echo | TlsMode::Rekey => {
            stream.write_all(greeting.as_bytes())?;
            if mode == TlsMode::Rekey {
                stream
                    .conn
                    .refresh_traffic_keys()
                    .map_err(io::Error::other)?;
            }
            stream.flush()?;
            read_until_close_notify(stream, seen, true)?;
            close_notify_and_fin(stream)
        }
        TlsMode::Collect => {
            read_until_close_notify(stream, seen, false)?;
            stream.write_all(format!("{name} got {}\n", seen.received.len()).as_bytes())?;
            let all = seen.received.clone();
            stream.write_all(&all)?;
            close_notify_and_fin(stream)
        }
        TlsMode::CloseFirst => {
            stream.write_all(greeting.as_bytes())?;
            stream.conn.send_close_notify();
            stream.flush()?;
            read_until_close_notify(stream, seen, false)?;
            stream.sock.shutdown(Shutdown::Write)
        }
        TlsMode::Truncate => {
            stream.write_all(greeting.as_bytes())?;
            stream.flush()?;
            stream.sock.shutdown(Shutdown::Write)?;
            // Keep reading (raw) until the client's FIN, so closing sends no reset.
            let mut buf = [0u8; 4096];
            while stream.sock.read(&mut buf)? > 0 {}
            Ok(())
        }
    }
}

impl Ca {
    /// Writes this CA's certificate to `dir/NAME` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A server certificate (serverAuth) for `names`: DNS names, or IP addresses when they
    /// parse as one.
    pub fn server_for(&self, names: &[&str]) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name = dn(names.first().copied().unwrap_or("upstream"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }
}

impl Issued {
    /// Writes this certificate and its key to `dir/NAME.crt` and `dir/NAME.key.pem`; returns
    /// both paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key.pem")),
        );
        std::fs::write(&cert, self.cert.pem()).unwrap();
        std::fs::write(&key, self.key.serialize_pem()).unwrap();
        (cert, key)
    }
}

/// A `[[group]]` entry for `group` with a `[group.tls]` whose roots are `ca_cert`, followed by
/// `lines` (such as `server_name = "..."`), for [`ConfigBuilder::section`].
pub fn group_tls_section(group: &str, ca_cert: &Path, lines: &str) -> String {
    format!("[[group]]\nname = {group:?}\n[group.tls]\nca_cert = {ca_cert:?}\n{lines}")
}

/// [`http_get`] with the status code as a number: the code and the body.
pub fn fetch(addr: SocketAddr, target: &str) -> (u16, String) {
    let (status, body) = http_get(addr, target);
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {status:?}"));
    (code, body)
}

/// `GET /status` from the metrics server at `addr`, parsed; it must answer 200.
pub fn status_json(addr: SocketAddr) -> serde_json::Value {
    let (code, body) = fetch(addr, "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// The entry named `name` in the list `list` (`"upstreams"` or `"clients"`) of a `/status`.
pub fn status_entry<'a>(
    status: &'a serde_json::Value,
    list: &str,
    name: &str,
) -> &'a serde_json::Value {
    status[list]
        .as_array()
        .unwrap_or_else(|| panic!("/status has no list {list}: {status}"))
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("/status {list} has no {name}: {status}"))
}

impl Process {
    /// Runs the lclb binary on `config` with `RUST_LOG=filter` (such as
    /// `"info,lclb::watch=debug"`). [`Process::spawn`] sets `RUST_LOG=info`, so the filter
    /// goes through env(1), which then runs lclb in its own place: the child's pid is lclb's,
    /// and [`Process::signal`] reaches it.
    pub fn start_with_log(bin: &str, config: &Path, filter: &str) -> Process {
        let mut command = Command::new("env");
        command
            .arg(format!("RUST_LOG={filter}"))
            .arg(bin)
            .arg("--config")
            .arg(config);
        Process::spawn(command)
    }
}

/// Writes `text` to `path` the way an atomic deploy does: to a sibling file, renamed over
/// `path`, so a reader sees the old content or the new, never part of it.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Points the symlink `link` at `target` the way Kubernetes updates a mounted secret's
/// `..data` link: a new symlink beside it, renamed over it in one step.
#[cfg(unix)]
pub fn swap_symlink(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// The value of the sample `name` (labels included, as exported) on `p`'s `/metrics` now.
pub fn metric(p: &Process, name: &str) -> Option<f64> {
    parse_metrics(&scrape(p.metrics_addr())).get(name).copied()
}

/// Waits until the sample `name` of `p` is `value`; panics with the last value seen if not.
pub fn expect_metric(p: &Process, name: &str, value: f64) {
    if !wait_until(|| metric(p, name) == Some(value)) {
        panic!("{name} is {:?}, not {value}", metric(p, name));
    }
}

/// The sample name of the refusal counter for `reason`.
pub fn refusal_sample(reason: &str) -> String {
    format!("lclb_rejected_connections_total{{reason=\"{reason}\"}}")
}
