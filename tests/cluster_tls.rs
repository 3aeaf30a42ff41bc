//! `[cluster]` over `rediss://`: a real `redis-server` (Debian's build, with TLS) whose
//! certificate comes from a private CA made here, and real lclb binaries confined by Landlock
//! (on by default). The redis crate builds its TLS config at every connect; with the bundled
//! roots it reads no system certificates there, and `cluster.ca_cert` (read at start-up) is
//! what it trusts: two confined instances share one burst through Redis over TLS, each
//! admission on a connection of its own made after the confinement. A Redis that requires
//! client certificates admits an instance with `client_cert`/`client_key` and not one without
//! (down, counted, `on_error` decides). A `ca_cert` of the wrong CA leaves the cluster down
//! with a log line naming the certificate problem, until a reload reads the right one from the
//! same path, in a folder of its own that the confinement allows.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::{ClientTlsConfig, TlsCertificates};
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");
const CLIENT: &str = "client1.lb.com";
const UP: &str = "lclb_cluster_up";
const ERRORS: &str = "lclb_cluster_errors_total";
/// What lclb logs when the kernel enforces its rules.
const CONFINED: &str = "landlock: confined to reading beneath ";
/// Generous for a TLS handshake on a slow, shared machine (the default is 50ms).
const TIMEOUT: &str = "timeout = \"1s\"\n";

/// A TLS-only `redis-server` on a loopback port, its certificate issued by `ca`, without
/// persistence; killed on drop.
struct TlsRedis {
    port: u16,
    /// The CA's PEM and a client certificate of it, for the test's own connections.
    ca_pem: Vec<u8>,
    client: Issued,
    child: Child,
}

impl TlsRedis {
    /// A server on a free port (another one if the first cannot be bound); `auth` is its
    /// `tls-auth-clients`: `"optional"` or `"yes"`.
    fn start(name: &str, ca: &Ca, auth: &str) -> TlsRedis {
        let found = Command::new("redis-server").arg("--version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "redis-server is not installed: `apt-get install redis-server` (the [cluster] \
             tests run a real one; .ci/run installs it)"
        );
        let dir = temp_dir(name);
        let server = ca.server();
        std::fs::write(dir.join("redis.crt"), server.cert.pem()).unwrap();
        std::fs::write(dir.join("redis.key"), server.key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        let ca_pem = ca.pem().into_bytes();
        let client = ca.client("test.redis");
        for _ in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = spawn_tls_redis(&dir, port, auth, &ca_pem, &client) {
                return TlsRedis {
                    port,
                    ca_pem,
                    client,
                    child,
                };
            }
        }
        panic!(
            "redis-server did not start with TLS on any of 10 ports; see {}",
            dir.display()
        );
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    /// A connection of the test's own (trusting the CA, with a client certificate).
    fn conn(&self) -> redis::Connection {
        tls_conn(self.port, &self.ca_pem, &self.client).expect("the test's own connection")
    }

    /// Closes every connection but the test's own: lclb's next admission connects anew, on
    /// its (confined) connection thread.
    fn kill_clients(&self) {
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query(&mut self.conn())
            .unwrap();
        assert!(killed >= 1, "lclb's pooled connections were closed");
    }

    /// The whole tokens of `identity`'s shared bucket, if Redis has one.
    fn tokens(&self, identity: &str) -> Option<f64> {
        let tokens: Option<f64> = redis::cmd("HGET")
            .arg(format!("lclb:{{{identity}}}:rate"))
            .arg("tokens")
            .query(&mut self.conn())
            .unwrap();
        tokens.map(f64::floor)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS-only redis-server on `port` (`tls-auth-clients` = `auth`), once it answers PING over
/// TLS; `None` if it exits first (the port was taken) or does not answer within [`WAIT`].
fn spawn_tls_redis(
    dir: &Path,
    port: u16,
    auth: &str,
    ca_pem: &[u8],
    client: &Issued,
) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(dir.join("redis.crt"))
        .arg("--tls-key-file")
        .arg(dir.join("redis.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.crt"))
        .args(["--tls-auth-clients", auth])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join(format!("redis-{port}.log")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let answered = poll_until(|| {
        if child.try_wait().ok().flatten().is_some() {
            return Some(false);
        }
        tls_conn(port, ca_pem, client).map(|_| true)
    });
    if answered == Some(true) {
        return Some(child);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A connection to the TLS Redis on `port` trusting `ca_pem` and presenting `client`, once it
/// answers PING.
fn tls_conn(port: u16, ca_pem: &[u8], client: &Issued) -> Option<redis::Connection> {
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/0"),
        TlsCertificates {
            client_tls: Some(ClientTlsConfig {
                client_cert: client.cert.pem().into_bytes(),
                client_key: client.key.serialize_pem().into_bytes(),
            }),
            root_cert: Some(ca_pem.to_vec()),
        },
    )
    .ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .ok()?;
    let pong: String = redis::cmd("PING").query(&mut conn).ok()?;
    (pong == "PONG").then_some(conn)
}

/// Writes `issued`'s certificate and key as `NAME.crt` and `NAME.key` in `dir`.
fn write_issued(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.key.serialize_pem()).unwrap();
    (cert, key)
}

/// An lclb binary (Landlock on, the default) sharing client1's limits through `redis`, with
/// `cluster` more lines of its `[cluster]` and `client` more keys of client1's entry; the
/// config file `name`.toml is in `pki.dir`. With the lines it logged while starting.
fn instance(
    pki: &Pki,
    web1: &Upstream,
    redis: &TlsRedis,
    name: &str,
    cluster: &str,
    client: &str,
) -> (Process, Vec<String>) {
    let section = format!("[cluster]\nredis = \"{}\"\n{TIMEOUT}{cluster}", redis.url());
    let text = pki
        .builder()
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(&section)
        .upstream(web1, "web")
        .client_with(CLIENT, &["web"], client)
        .build();
    let path = pki.dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let p = Process::start(LCLB, &path);
    let lines = p
        .lines_until("lclb listening on ", WAIT)
        .expect("lclb did not start");
    if lines.iter().any(|l| l.contains(CONFINED)) {
        // The cluster's lease thread, too, starts after the confinement.
        assert!(
            lines.iter().all(|l| !l.contains("already running")),
            "{lines:#?}"
        );
    } else {
        eprintln!("note: this kernel does not confine lclb; the TLS checks still run");
    }
    (p, lines)
}

fn ca_line(path: &Path) -> String {
    format!("ca_cert = {:?}\n", path.display().to_string())
}

#[test]
fn two_confined_instances_share_one_burst_through_a_tls_redis_of_a_private_ca() {
    let redis_ca = Ca::new("redis-ca.example");
    let redis = TlsRedis::start("rediss-burst", &redis_ca, "optional");
    let pki = Pki::new("rediss-burst");
    // The Redis CA in a folder of its own, beside the config's.
    let roots = temp_dir("rediss-burst-roots").join("redis-ca.crt");
    std::fs::write(&roots, redis_ca.pem()).unwrap();
    let web1 = Upstream::start("web1", Mode::Echo);
    let rate = "rate = 0.001\nburst = 2\n";
    let (a, _) = instance(&pki, &web1, &redis, "a", &ca_line(&roots), rate);
    let (b, _) = instance(&pki, &web1, &redis, "b", &ca_line(&roots), rate);
    for p in [&a, &b] {
        assert_eq!(metric(p, UP), Some(1.0));
        assert_eq!(metric(p, ERRORS), Some(0.0));
    }
    // The start-up probes connected before the confinement; what follows connects after it.
    redis.kill_clients();

    let cfg = pki.client_config(Some(&pki.client(CLIENT)));
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        outcome(b.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    // A has a burst of 2 of its own, unspent: only the shared bucket refuses.
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("rate_limited"), 1.0);
    assert_eq!(metric(&b, &refusal_sample("rate_limited")), Some(0.0));
    assert_eq!(redis.tokens(CLIENT), Some(0.0), "Redis's bucket is spent");
    for p in [&a, &b] {
        assert_eq!(metric(p, UP), Some(1.0));
        assert_eq!(
            metric(p, ERRORS),
            Some(0.0),
            "every connect after the confinement succeeded"
        );
    }
}

#[test]
fn a_redis_that_requires_client_certificates_admits_lclb_with_its_certificate_only() {
    let redis_ca = Ca::new("redis-ca.example");
    let redis = TlsRedis::start("rediss-mtls", &redis_ca, "yes");
    let pki = Pki::new("rediss-mtls");
    let files = temp_dir("rediss-mtls-files");
    let roots = files.join("redis-ca.crt");
    std::fs::write(&roots, redis_ca.pem()).unwrap();
    let (cert, key) = write_issued(&files, "lclb", &redis_ca.client("lclb.redis"));
    let web1 = Upstream::start("web1", Mode::Echo);
    let rate = "rate = 0.001\nburst = 3\n";
    let with = format!(
        "{}client_cert = {:?}\nclient_key = {:?}\non_error = \"deny\"\n",
        ca_line(&roots),
        cert.display().to_string(),
        key.display().to_string()
    );
    let without = format!("{}on_error = \"deny\"\n", ca_line(&roots));
    let (a, _) = instance(&pki, &web1, &redis, "a", &with, rate);
    let (b, started) = instance(&pki, &web1, &redis, "b", &without, rate);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));

    assert_eq!(metric(&a, UP), Some(1.0));
    assert_eq!(metric(&a, ERRORS), Some(0.0));
    redis.kill_clients();
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        redis.tokens(CLIENT),
        Some(2.0),
        "A took its token from Redis's bucket"
    );
    assert_eq!(metric(&a, ERRORS), Some(0.0));

    let line = started
        .iter()
        .find(|l| l.contains("is down ("))
        .expect("B logged at start-up that Redis is down");
    assert!(
        line.contains("received fatal alert: CertificateRequired"),
        "{line}"
    );
    assert_eq!(metric(&b, UP), Some(0.0), "Redis refused B's handshake");
    assert_eq!(
        metric(&b, ERRORS),
        Some(1.0),
        "the start-up probe's failure"
    );
    assert_eq!(outcome(b.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&b, &refusal_sample("cluster_unavailable"), 1.0);
    assert_eq!(redis.tokens(CLIENT), Some(2.0), "B never reached Redis");
}

#[test]
fn a_wrong_ca_cert_leaves_the_cluster_down_naming_the_certificate_until_a_reload_reads_the_right_one(
) {
    let redis_ca = Ca::new("redis-ca.example");
    let redis = TlsRedis::start("rediss-wrong-ca", &redis_ca, "optional");
    let pki = Pki::new("rediss-wrong-ca");
    // Outside the config's folder: a reload reads it only if the confinement allows its folder.
    let roots = temp_dir("rediss-wrong-ca-roots").join("redis-ca.crt");
    std::fs::write(&roots, Ca::new("stranger.example").pem()).unwrap();
    let web1 = Upstream::start("web1", Mode::Echo);
    let section = format!("{}on_error = \"deny\"\n", ca_line(&roots));
    let (a, started) = instance(
        &pki,
        &web1,
        &redis,
        "a",
        &section,
        "rate = 1000\nburst = 1000\n",
    );
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));

    let line = started
        .iter()
        .find(|l| l.contains("is down ("))
        .expect("lclb logged at start-up that Redis is down");
    assert!(
        line.contains(&redis.url()) && line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
    assert_eq!(metric(&a, UP), Some(0.0));
    assert_eq!(metric(&a, ERRORS), Some(1.0));
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("cluster_unavailable"), 1.0);

    // The right CA at the same path: a reload reads it again and builds a new client.
    std::fs::write(&roots, redis_ca.pem()).unwrap();
    a.signal("HUP");
    assert!(a.wait_line("reload: [cluster] changed").is_some());
    expect_metric(&a, UP, 1.0);
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        metric(&a, &refusal_sample("cluster_unavailable")),
        Some(1.0)
    );
}
