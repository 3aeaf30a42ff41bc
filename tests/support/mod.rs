//! Shared helpers for the integration tests: certificates minted at test time, real upstream
//! servers on loopback, a running lclb on port 0, and real rustls clients.

#![allow(dead_code)]

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

/// A certificate authority that can issue server and client certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a certificate with `params` for a fresh key.
    pub fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued { cert, key }
    }

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

    pub fn client(&self, cn: &str) -> Issued {
        self.issue(client_params(dn(cn)))
    }
}

pub fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

pub fn client_params(dn: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// A certificate and its key.
pub struct Issued {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Issued {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key.serialize_pem().as_bytes()).unwrap()
    }
}

/// The certificates of one test: a CA with a server certificate, written to a folder so the
/// balancer loads them the way it does in production.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
    pub server: Issued,
}

impl Pki {
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
        format!(
            "[tls]\nca_cert = {:?}\nserver_cert = {:?}\nserver_key = {:?}\n",
            self.dir.join("ca.crt"),
            self.dir.join("server.crt"),
            self.dir.join("server.key.pem")
        )
    }

    /// A whole config: this PKI's `[tls]`, then `extra` (sections such as `[limits]`, or more
    /// `[[upstream]]` entries), `upstreams` all in group `web`, and `client1.lb.com` allowed
    /// to `web`.
    pub fn config(&self, extra: &str, upstreams: &[&Upstream]) -> String {
        let mut config = self.tls_section();
        config.push_str(extra);
        for u in upstreams {
            config.push_str(&u.entry("web"));
        }
        config.push_str("[[client]]\ncn = \"client1.lb.com\"\ngroups = [\"web\"]\n");
        config
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
    pub name: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(name: &str, mode: Mode) -> Upstream {
        Upstream::start_on(name, mode, TcpListener::bind("127.0.0.1:0").unwrap())
    }

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
        format!(
            "[[upstream]]\nname = {:?}\naddress = \"{}\"\ngroup = {:?}\n",
            self.name, self.addr, group
        )
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
    pub addr: SocketAddr,
    pub shared: Arc<lclb::server::Shared>,
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
        lclb::tls::install_default_provider();
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
    pub fn stats(&self) -> &lclb::stats::Stats {
        &self.shared.stats
    }

    /// The least-connection table.
    pub fn table(&self) -> &lclb::table::UpstreamTable {
        self.shared.balancer.table()
    }

    /// Connections the balancer has opened to upstreams for clients (health probes excluded).
    pub fn forwarded(&self) -> u64 {
        self.shared.balancer.table().total_forwarded()
    }

    /// Waits until `what` holds; false after 10 s.
    pub fn wait_for(&self, what: impl Fn(&lclb::stats::Stats) -> bool) -> bool {
        wait_until(|| what(self.stats()))
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `what` until it holds; false after 10 s.
pub fn wait_until(what: impl Fn() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

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

/// Reads everything until the peer closes; tolerates a missing close_notify only if `strict`
/// is false.
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
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Runs the lclb binary (`bin`, the test's `env!("CARGO_BIN_EXE_lclb")`) on `config`.
    pub fn start(bin: &str, config: &Path) -> Process {
        let mut command = Command::new(bin);
        command.arg("--config").arg(config);
        Process::spawn(command)
    }

    /// Runs `command` with RUST_LOG=info, collecting its stderr lines.
    pub fn spawn(mut command: Command) -> Process {
        let mut child = command
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Process { child, lines }
    }

    pub fn wait_line(&self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

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
