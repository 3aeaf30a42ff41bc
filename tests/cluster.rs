//! `[cluster]`: per-client limits shared through a real `redis-server` (Debian's package) on
//! loopback, by real lclb binaries. Two instances admit one identity's burst once and hold its
//! `max_concurrent` together; a killed instance's leases expire after `lease_ttl`; a killed
//! Redis leaves `on_error` to decide (`local`: this instance's buckets; `deny`:
//! `cluster_unavailable`) until it is started again on its port, when the limits are shared
//! again without a restart. The admission script's own semantics are checked against the same
//! Redis directly.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

/// A `redis-server` of its own on a loopback port, without persistence; killed on drop.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server on a free port (another one if the first cannot be bound).
    fn start(name: &str) -> RedisServer {
        RedisServer::start_with(name, &[])
    }

    /// As [`RedisServer::start`], with more arguments (`--replicaof HOST PORT`, or a config
    /// file and `--sentinel`).
    fn start_with(name: &str, args: &[&str]) -> RedisServer {
        let found = Command::new("redis-server").arg("--version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "redis-server is not installed: `apt-get install redis-server` (the [cluster] \
             tests run a real one; .ci/run installs it)"
        );
        let dir = temp_dir(name);
        for _ in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = spawn_redis(&dir, port, args) {
                return RedisServer {
                    port,
                    dir,
                    args: args.iter().map(|a| a.to_string()).collect(),
                    child: Some(child),
                };
            }
        }
        panic!(
            "redis-server did not start on any of 10 ports; see {}",
            dir.display()
        );
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (SIGKILL): whatever it held is gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends it `signal` (STOP freezes it: connections are accepted by the kernel and never
    /// answered; CONT thaws it).
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Starts it again on the same port, empty (it had no persistence).
    fn restart(&mut self) {
        self.kill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let child = poll_until(|| spawn_redis(&self.dir, self.port, &args))
            .unwrap_or_else(|| panic!("redis-server did not come back on port {}", self.port));
        self.child = Some(child);
    }

    /// A connection of the test's own, to look at the keys.
    fn conn(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).unwrap();
        client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    fn leases(&self, identity: &str) -> usize {
        let key = format!("lclb:{{{identity}}}:leases");
        redis::cmd("ZCARD")
            .arg(key)
            .query(&mut self.conn())
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// redis-server on `port`, once it answers PING; `None` if it exits first (the port was taken)
/// or does not answer within [`WAIT`].
fn spawn_redis(dir: &Path, port: u16, args: &[&str]) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(args)
        .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .args(["--port", &port.to_string()])
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
        pings(port).then_some(true)
    });
    if answered == Some(true) {
        return Some(child);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

const CLIENT: &str = "client1.lb.com";

/// An lclb binary sharing its limits through `redis`, with `cluster` more lines of its
/// `[cluster]` and `client` more keys of client1's entry.
fn instance(
    pki: &Pki,
    web1: &Upstream,
    redis: &RedisServer,
    name: &str,
    cluster: &str,
    client: &str,
) -> Process {
    let section = format!("[cluster]\nredis = \"{}\"\n{cluster}", redis.url());
    let path = write_config(pki, web1, name, &section, client);
    let p = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    p.listen_addr();
    p
}

/// The config file `name` of an instance with `section` (a `[cluster]`, or nothing) and
/// `client` more keys of client1's entry.
fn write_config(pki: &Pki, web1: &Upstream, name: &str, section: &str, client: &str) -> PathBuf {
    let text = pki
        .builder()
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(section)
        .upstream(web1, "web")
        .client_with(CLIENT, &["web"], client)
        .build();
    let path = pki.dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The whole tokens of `identity`'s shared bucket as last written (`rate` adds a fraction
/// between two admissions), if Redis has one.
fn tokens(redis: &RedisServer, identity: &str) -> Option<f64> {
    let tokens: Option<f64> = redis::cmd("HGET")
        .arg(format!("lclb:{{{identity}}}:rate"))
        .arg("tokens")
        .query(&mut redis.conn())
        .unwrap();
    tokens.map(f64::floor)
}

const UP: &str = "lclb_cluster_up";
const ERRORS: &str = "lclb_cluster_errors_total";

#[test]
fn two_instances_sharing_one_redis_admit_one_identitys_burst_once() {
    let redis = RedisServer::start("cluster-burst");
    let pki = Pki::new("cluster-burst");
    let web1 = Upstream::start("web1", Mode::Echo);
    let rate = "rate = 0.001\nburst = 3\n";
    let a = instance(&pki, &web1, &redis, "a", "", rate);
    let b = instance(&pki, &web1, &redis, "b", "", rate);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));
    for p in [&a, &b] {
        assert_eq!(metric(p, UP), Some(1.0));
        assert_eq!(metric(p, ERRORS), Some(0.0));
    }

    // Three tokens between them, wherever the client lands.
    for (i, p) in [&a, &b, &a].into_iter().enumerate() {
        let got = outcome(p.listen_addr(), &cfg);
        assert_eq!(got, Outcome::Greeted("web1".into()), "connection {i}");
    }
    // Each would have three more of its own; the shared bucket is empty on either.
    assert_eq!(outcome(b.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("rate_limited"), 1.0);
    expect_metric(&b, &refusal_sample("rate_limited"), 1.0);
    for p in [&a, &b] {
        assert_eq!(metric(p, ERRORS), Some(0.0), "no Redis call failed");
    }
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("lclb:{{{CLIENT}}}:rate"))
        .query(&mut redis.conn())
        .unwrap();
    assert!(ttl > 0, "the bucket expires once refilled (PTTL {ttl})");
}

#[test]
fn max_concurrent_holds_across_two_instances_and_a_closed_connection_frees_its_slot() {
    let redis = RedisServer::start("cluster-concurrent");
    let pki = Pki::new("cluster-concurrent");
    let web1 = Upstream::start("web1", Mode::Echo);
    let client = "rate = 1000\nburst = 1000\nmax_concurrent = 2\n";
    let a = instance(&pki, &web1, &redis, "a", "", client);
    let b = instance(&pki, &web1, &redis, "b", "", client);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));

    let (mut held, _) = hold(a.listen_addr(), &cfg, 2);
    assert_eq!(redis.leases(CLIENT), 2);
    assert_eq!(outcome(b.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&b, &refusal_sample("concurrency_limited"), 1.0);
    assert_eq!(redis.leases(CLIENT), 2, "a refusal leaves no lease");

    drop(held.pop());
    assert!(
        wait_until(|| redis.leases(CLIENT) == 1),
        "the closed connection's lease is removed"
    );
    let (on_b, _) = hold(b.listen_addr(), &cfg, 1);
    assert_eq!(redis.leases(CLIENT), 2);
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("concurrency_limited"), 1.0);
    drop((held, on_b));
    assert!(wait_until(|| redis.leases(CLIENT) == 0));
}

#[test]
fn an_instance_killed_with_sigkill_gives_its_leases_back_after_lease_ttl() {
    let redis = RedisServer::start("cluster-sigkill");
    let pki = Pki::new("cluster-sigkill");
    let web1 = Upstream::start("web1", Mode::Echo);
    let client = "rate = 1000\nburst = 1000\nmax_concurrent = 1\n";
    let ttl = "lease_ttl = \"1s\"\n";
    let mut a = instance(&pki, &web1, &redis, "a", ttl, client);
    let b = instance(&pki, &web1, &redis, "b", ttl, client);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));

    let (held, _) = hold(a.listen_addr(), &cfg, 1);
    let key = format!("lclb:{{{CLIENT}}}:leases");
    let score = || -> Option<f64> {
        let scores: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut redis.conn())
            .unwrap();
        scores.first().map(|(_, s)| *s)
    };
    let first = score().expect("the held connection has a lease");
    // Alive, its instance refreshes it: the lease outlives its first expiry.
    assert!(
        wait_until(|| score().is_some_and(|s| s >= first + 1000.0)),
        "the lease was refreshed past its first expiry"
    );
    assert_eq!(outcome(b.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);

    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(
        wait_until(|| redis.leases(CLIENT) == 0),
        "the dead instance's lease expired"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(exists, 0, "the set itself expired with its last lease");
    assert_eq!(
        outcome(b.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    drop(held);
}

#[test]
fn with_redis_killed_local_serves_from_its_own_bucket_and_shares_again_once_it_is_back() {
    let mut redis = RedisServer::start("cluster-local");
    let pki = Pki::new("cluster-local");
    let web1 = Upstream::start("web1", Mode::Echo);
    let rate = "rate = 0.001\nburst = 2\n";
    let a = instance(&pki, &web1, &redis, "a", "on_error = \"local\"\n", rate);
    let b = instance(&pki, &web1, &redis, "b", "on_error = \"local\"\n", rate);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));
    let greeted = || Outcome::Greeted("web1".into());

    redis.kill();
    // The first admission finds Redis gone, counts one error and falls back to A's own bucket
    // (full: A never used it).
    assert_eq!(outcome(a.listen_addr(), &cfg), greeted());
    assert!(a.wait_line("cluster: Redis redis://127.0.0.1").is_some());
    assert_eq!(metric(&a, UP), Some(0.0));
    assert_eq!(metric(&a, ERRORS), Some(1.0));
    assert_eq!(outcome(a.listen_addr(), &cfg), greeted());
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::CloseNotifyNoBytes,
        "A's own burst of 2 is spent"
    );
    expect_metric(&a, &refusal_sample("rate_limited"), 1.0);
    assert_eq!(
        metric(&a, ERRORS),
        Some(1.0),
        "while down, admission does not try Redis, and failed probes are not counted"
    );

    redis.restart();
    expect_metric(&a, UP, 1.0);
    assert!(a.wait_line("answers again").is_some());
    assert_eq!(metric(&a, ERRORS), Some(1.0));
    // Shared again: the restarted Redis has a fresh bucket of 2 for both instances together
    // (and no script: the NOSCRIPT fallback loads it).
    assert_eq!(outcome(a.listen_addr(), &cfg), greeted());
    assert_eq!(outcome(b.listen_addr(), &cfg), greeted());
    assert_eq!(outcome(b.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("rate_limited"), 2.0);
    expect_metric(&b, &refusal_sample("rate_limited"), 1.0);
    for p in [&a, &b] {
        assert_eq!(metric(p, UP), Some(1.0));
    }
    assert_eq!(
        metric(&b, ERRORS),
        Some(0.0),
        "B's stale pooled connection was replaced, not taken for an outage"
    );
}

#[test]
fn with_redis_killed_deny_refuses_as_cluster_unavailable_until_it_is_back() {
    let mut redis = RedisServer::start("cluster-deny");
    let pki = Pki::new("cluster-deny");
    let web1 = Upstream::start("web1", Mode::Echo);
    let a = instance(
        &pki,
        &web1,
        &redis,
        "a",
        "on_error = \"deny\"\n",
        "rate = 1000\nburst = 1000\nmax_concurrent = 5\n",
    );
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        metric(&a, &refusal_sample("cluster_unavailable")),
        Some(0.0)
    );

    redis.kill();
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("cluster_unavailable"), 2.0);
    assert_eq!(metric(&a, UP), Some(0.0));
    assert_eq!(
        metric(&a, ERRORS),
        Some(1.0),
        "only the first refusal tried Redis"
    );
    let line = a.wait_line("cluster_unavailable").unwrap();
    assert!(line.contains(CLIENT), "{line}");

    redis.restart();
    expect_metric(&a, UP, 1.0);
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(metric(&a, ERRORS), Some(1.0));
}

/// The admission script, run as lclb runs it: keys, then rate, burst, max, lease id, ttl.
fn admit(conn: &mut redis::Connection, id: &str, burst: u32, max: u32, lease: &str) -> i64 {
    redis::Script::new(include_str!("../src/cluster/admit.lua"))
        .key(format!("t:{{{id}}}:rate"))
        .key(format!("t:{{{id}}}:leases"))
        .arg(0.001)
        .arg(burst)
        .arg(max)
        .arg(lease)
        .arg(300)
        .invoke(conn)
        .unwrap()
}

#[test]
fn the_admission_script_takes_a_token_and_a_lease_only_when_it_admits() {
    let redis = RedisServer::start("cluster-script");
    let mut conn = redis.conn();
    let tokens = |conn: &mut redis::Connection, id: &str| -> f64 {
        redis::cmd("HGET")
            .arg(format!("t:{{{id}}}:rate"))
            .arg("tokens")
            .query(conn)
            .unwrap()
    };

    // Rate: a burst of 3, then refused (1), a refusal taking nothing.
    assert_eq!(
        (0..4)
            .map(|i| admit(&mut conn, "r", 3, 0, &format!("l{i}")))
            .collect::<Vec<_>>(),
        [0, 0, 0, 1]
    );
    assert!(tokens(&mut conn, "r") < 1.0);
    let no_leases: i64 = redis::cmd("EXISTS")
        .arg("t:{r}:leases")
        .query(&mut conn)
        .unwrap();
    assert_eq!(no_leases, 0, "no cap: no lease is written");

    // Concurrency: two leases, the third refused (2) without taking a token.
    assert_eq!(admit(&mut conn, "c", 10, 2, "x"), 0);
    assert_eq!(admit(&mut conn, "c", 10, 2, "y"), 0);
    let before = tokens(&mut conn, "c");
    assert_eq!(admit(&mut conn, "c", 10, 2, "z"), 2);
    assert_eq!(tokens(&mut conn, "c"), before, "a refusal takes no token");
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("t:{c}:leases")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(members, ["x", "y"]);
    for key in ["t:{c}:leases", "t:{c}:rate"] {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
        assert!(
            ttl > 0 && ttl <= 2_592_000_000,
            "{key} expires (PTTL {ttl})"
        );
    }

    // Leases expire on Redis's clock (300 ms here): the next admission finds room.
    assert!(
        wait_until(|| admit(&mut redis.conn(), "c", 10, 2, "w") == 0),
        "expired leases are dropped by the next admission"
    );
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("t:{c}:leases")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert!(
        members.contains(&"w".to_string()) && !members.contains(&"x".to_string()),
        "the first expired lease made room for w: {members:?}"
    );
}

#[test]
fn a_reload_that_adds_changes_or_drops_cluster_takes_effect_without_a_restart() {
    let redis = RedisServer::start("cluster-reload");
    let pki = Pki::new("cluster-reload");
    let web1 = Upstream::start("web1", Mode::Echo);
    let rate = "rate = 0.001\nburst = 3\n";
    let path = write_config(&pki, &web1, "a", "", rate);
    let a = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));
    assert_eq!(metric(&a, UP), None, "no [cluster], no cluster metrics");
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        tokens(&redis, CLIENT),
        None,
        "local limits: nothing in Redis"
    );

    let section = format!("[cluster]\nredis = \"{}\"\n", redis.url());
    write_config(&pki, &web1, "a", &section, rate);
    a.signal("HUP");
    assert!(a
        .wait_line("per-client limits shared through Redis")
        .is_some());
    expect_metric(&a, UP, 1.0);
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        tokens(&redis, CLIENT),
        Some(2.0),
        "the shared bucket took the token"
    );

    let changed = format!("{section}on_error = \"deny\"\n");
    write_config(&pki, &web1, "a", &changed, rate);
    a.signal("HUP");
    assert!(a.wait_line("reload: [cluster] changed").is_some());
    assert!(a.wait_line("config reloaded").is_some());
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        tokens(&redis, CLIENT),
        Some(1.0),
        "the new client shares the same bucket"
    );

    write_config(&pki, &web1, "a", "", rate);
    a.signal("HUP");
    assert!(wait_until(|| metric(&a, UP).is_none()), "[cluster] dropped");
    // Back to A's own bucket, which has spent one token of its 3.
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        tokens(&redis, CLIENT),
        Some(1.0),
        "Redis is not asked any more"
    );
}

#[test]
fn through_sentinels_lclb_follows_a_failover_to_the_promoted_replica() {
    let mut master = RedisServer::start("cluster-sentinel-master");
    let port = master.port.to_string();
    let replica = RedisServer::start_with(
        "cluster-sentinel-replica",
        &["--replicaof", "127.0.0.1", &port],
    );
    let dir = temp_dir("cluster-sentinel");
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "sentinel monitor mymaster 127.0.0.1 {port} 1\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 10000\n"
        ),
    )
    .unwrap();
    let sentinel = RedisServer::start_with(
        "cluster-sentinel-sentinel",
        &[conf.to_str().unwrap(), "--sentinel"],
    );
    let knows_replica = || {
        let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg("mymaster")
            .query(&mut sentinel.conn())
            .unwrap();
        !replicas.is_empty()
    };
    assert!(
        poll_within(Duration::from_secs(30), || knows_replica().then_some(())).is_some(),
        "the sentinel found the replica"
    );

    let pki = Pki::new("cluster-sentinel");
    let web1 = Upstream::start("web1", Mode::Echo);
    let section = format!(
        "[cluster]\nsentinels = [\"127.0.0.1:{}\"]\nsentinel_master = \"mymaster\"\n",
        sentinel.port
    );
    let path = write_config(&pki, &web1, "a", &section, "rate = 0.001\nburst = 5\n");
    let a = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));
    assert_eq!(metric(&a, UP), Some(1.0));
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        tokens(&master, CLIENT),
        Some(4.0),
        "the sentinel named the master"
    );
    assert!(
        wait_until(|| tokens(&replica, CLIENT) == Some(4.0)),
        "the replica has the bucket too"
    );

    master.kill();
    // The next admission finds the master gone: down, on_error = local serves it.
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(metric(&a, ERRORS), Some(1.0));
    // Once the sentinel has promoted the replica, the probe finds it there.
    assert!(
        poll_within(Duration::from_secs(60), || (metric(&a, UP) == Some(1.0))
            .then_some(()))
        .is_some(),
        "lclb is up again on the promoted replica"
    );
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(
        tokens(&replica, CLIENT),
        Some(3.0),
        "the promoted replica's bucket, carried over from the old master, goes on"
    );
}

#[test]
fn with_redis_killed_allow_admits_past_every_limit_and_its_leases_reach_redis_when_it_is_back() {
    let mut redis = RedisServer::start("cluster-allow");
    let pki = Pki::new("cluster-allow");
    let web1 = Upstream::start("web1", Mode::Echo);
    let client = "rate = 0.001\nburst = 1\nmax_concurrent = 1\n";
    let a = instance(&pki, &web1, &redis, "a", "on_error = \"allow\"\n", client);
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));

    redis.kill();
    // Burst 1 and one connection at a time, yet both are let in while Redis is down.
    let (held, _) = hold(a.listen_addr(), &cfg, 2);
    assert_eq!(metric(&a, UP), Some(0.0));
    assert_eq!(metric(&a, ERRORS), Some(1.0));

    redis.restart();
    expect_metric(&a, UP, 1.0);
    assert!(
        wait_until(|| redis.leases(CLIENT) == 2),
        "the open connections' leases were written once Redis came back"
    );
    // They count: the cap of 1 is taken, whatever the (fresh) bucket says.
    assert_eq!(outcome(a.listen_addr(), &cfg), Outcome::CloseNotifyNoBytes);
    expect_metric(&a, &refusal_sample("concurrency_limited"), 1.0);
    drop(held);
    assert!(wait_until(|| redis.leases(CLIENT) == 0));
}

#[test]
fn a_stalled_redis_costs_one_admission_its_timeout_then_local_decides_until_it_answers() {
    let redis = RedisServer::start("cluster-stalled");
    let pki = Pki::new("cluster-stalled");
    let web1 = Upstream::start("web1", Mode::Echo);
    let a = instance(&pki, &web1, &redis, "a", "", "rate = 0.001\nburst = 1000\n");
    let cfg = pki.client_config(Some(&pki.client(CLIENT)));

    redis.signal("STOP");
    // The admission waits its 50 ms for a reply that never comes (the client would give up
    // after 10 s), then A's own bucket admits.
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    let line = a.wait_line("is down").unwrap();
    assert!(line.contains("admission"), "{line}");
    assert_eq!(metric(&a, UP), Some(0.0));
    assert_eq!(metric(&a, ERRORS), Some(1.0));
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );

    redis.signal("CONT");
    expect_metric(&a, UP, 1.0);
    assert_eq!(
        outcome(a.listen_addr(), &cfg),
        Outcome::Greeted("web1".into())
    );
    // Shared again. The call that timed out was still in Redis's socket when it thawed, and
    // may have run then (its token spent, lclb having decided without it) or not.
    let left = tokens(&redis, CLIENT);
    assert!(
        left == Some(998.0) || left == Some(999.0),
        "the shared bucket took this admission's token: {left:?}"
    );
    assert_eq!(metric(&a, ERRORS), Some(1.0));
}
