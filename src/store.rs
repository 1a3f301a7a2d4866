//! The shared store (Redis or Valkey) every replica counts in: one node, a Sentinel-managed
//! primary or a Cluster, over TCP or TLS, with the password read from a mounted file.
//!
//! Each operation has one deadline (`--store-timeout`), the wait for a connection included, so a
//! slow or absent store costs a call at most that long. Connecting happens in a background task;
//! a connection that fails (or answers READONLY after a failover) is replaced by a new one, asked
//! of the Sentinels again where there are some, and a changed password file replaces it too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, FromRedisValue,
    IntoConnectionInfo, RedisFuture, TlsCertificates, TlsMode, Value,
};
use tracing::{info, warn};

/// How often the password file is compared with the one the connection was made with.
const PASSWORD_POLL: Duration = Duration::from_secs(1);
/// A failed connection is not replaced more often than this (an outage costs one attempt per
/// interval, not one per call).
const RECONNECT_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// How to reach the shared store; flattened into `run`, `serve` and `spend`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct StoreArgs {
    /// Share limits across replicas through this store: `redis://host:6379[/db]`, `rediss://`
    /// for TLS, `redis+sentinel://sentinel1:26379,sentinel2:26379/PRIMARY-NAME[/db]` or
    /// `redis+cluster://node1:6379,node2:6379` (`rediss+...` for TLS). A username may be given
    /// as `redis://USER@host`; give the password with --store-password-file. Without a store
    /// each replica counts alone.
    #[arg(long, env = "PORTCULLIS_LIMITS_STORE")]
    pub limits_store: Option<String>,
    /// The store's ACL username (instead of `USER@` in the URL).
    #[arg(long, env = "PORTCULLIS_STORE_USERNAME")]
    pub store_username: Option<String>,
    /// A file holding the store's password (a mounted Secret); re-read when it changes.
    #[arg(long, env = "PORTCULLIS_STORE_PASSWORD_FILE")]
    pub store_password_file: Option<PathBuf>,
    /// PEM CA bundle the store's TLS certificate must chain to (default: the system roots).
    #[arg(long, env = "PORTCULLIS_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// PEM client certificate for stores that require mutual TLS (with --store-client-key).
    #[arg(
        long,
        env = "PORTCULLIS_STORE_CLIENT_CERT",
        requires = "store_client_key"
    )]
    pub store_client_cert: Option<PathBuf>,
    /// PEM private key of --store-client-cert.
    #[arg(
        long,
        env = "PORTCULLIS_STORE_CLIENT_KEY",
        requires = "store_client_cert"
    )]
    pub store_client_key: Option<PathBuf>,
    /// Accept any TLS certificate from the store (no verification, no SNI). For tests only:
    /// anyone on the path can read and change every count.
    #[arg(long)]
    pub store_tls_insecure_skip_verify: bool,
    /// Longest a call waits on the store (connecting included) before it is counted by this
    /// replica alone: `50ms`, `0.2s`.
    #[arg(long, env = "PORTCULLIS_STORE_TIMEOUT", default_value = "50ms", value_parser = parse_timeout)]
    pub store_timeout: Duration,
}

/// `50ms`, `1.5s` or plain seconds; between 1 ms and 60 s.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 1.0)
    };
    let secs = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("not a duration: {text:?} (e.g. 50ms, 0.2s)"))?
        * scale;
    if !(0.001..=60.0).contains(&secs) {
        return Err("must be between 1ms and 60s".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    // The URL may carry a password: errors name only what is wrong with it.
    #[error(
        "--limits-store must be a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL: {0}"
    )]
    InvalidUrl(String),
    #[error("cannot read {0}: {1}")]
    File(PathBuf, String),
    #[error("{0}")]
    Tls(String),
}

/// Why an operation did not get an answer it can use.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("timed out")]
    Timeout,
    #[error("not connected: {0}")]
    Unavailable(Arc<str>),
    /// The store answered with an error (a script failing on a key of the wrong type, READONLY).
    #[error("{0}")]
    Reply(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Topology {
    Node,
    Sentinel { primary: String },
    Cluster,
}

/// Everything needed to (re)connect; the password is read anew each time.
#[derive(Clone)]
struct Target {
    topology: Topology,
    /// One node, the Sentinels, or the Cluster's seeds.
    nodes: Vec<ConnectionInfo>,
    tls: Option<TlsMode>,
    certs: TlsCertificates,
    username: Option<String>,
    url_password: Option<String>,
    password_file: Option<PathBuf>,
    db: i64,
    timeout: Duration,
}

/// A connection to one node or to a Cluster (which routes each command by its keys' slot and
/// follows MOVED/ASK itself).
#[derive(Clone)]
enum Conn {
    Node(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

type Connecting = Shared<BoxFuture<'static, Result<Conn, Arc<str>>>>;

struct Slot {
    generation: u64,
    conn: Connecting,
    started: Instant,
}

struct Inner {
    target: Target,
    slot: Mutex<Slot>,
}

/// A handle on the shared store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Checks the configuration and starts connecting in the background (needs a Tokio runtime).
    pub fn open(args: &StoreArgs, url: &str) -> Result<Store, StoreConfigError> {
        let target = target(args, url)?;
        if args.store_tls_insecure_skip_verify {
            warn!(
                "--store-tls-insecure-skip-verify: the store's TLS certificate is NOT verified; anyone on the network path can read and change every count"
            );
        }
        if target.url_password.is_some() && target.password_file.is_none() {
            warn!(
                "the --limits-store URL carries a password, readable by anyone who can read the Deployment; mount it from a Secret and give --store-password-file"
            );
        }
        Ok(Store::with_target(target))
    }

    /// The same store through a connection of its own, made on the current runtime (its
    /// connection task runs there): for a single-threaded worker, a round trip without hopping to
    /// another thread's connection task and back.
    pub fn reopen(&self) -> Store {
        Store::with_target(self.inner.target.clone())
    }

    /// Whether both handles share one connection.
    #[cfg(test)]
    pub fn same_connection(&self, other: &Store) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn with_target(target: Target) -> Store {
        let inner = Arc::new(Inner {
            slot: Mutex::new(Slot {
                generation: 0,
                conn: connecting(target.clone()),
                started: Instant::now(),
            }),
            target,
        });
        if let Some(path) = inner.target.password_file.clone()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(watch_password(Arc::downgrade(&inner), path));
        }
        Store { inner }
    }

    pub fn timeout(&self) -> Duration {
        self.inner.target.timeout
    }

    /// A Cluster: keys one script touches must share a hash slot.
    pub fn is_cluster(&self) -> bool {
        self.inner.target.topology == Topology::Cluster
    }

    /// Runs a script within the deadline.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.with_deadline(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await
    }

    /// Runs a command within the deadline.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.with_deadline(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs a pipeline within the deadline.
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.with_deadline(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// Waits for the first connection (a command-line tool, unlike a call, can wait for it).
    pub async fn ready(&self) -> Result<(), StoreError> {
        let connecting = self.inner.slot.lock().conn.clone();
        let wait = connect_timeout(&self.inner.target) + Duration::from_millis(100);
        match tokio::time::timeout(wait, connecting).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(e)),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Every primary node of a Cluster as a one-node store (to SCAN each), or this store.
    pub async fn primaries(&self) -> Result<Vec<Store>, StoreError> {
        if !self.is_cluster() {
            return Ok(vec![self.clone()]);
        }
        let shards: Vec<Value> = self.query(redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let mut out = Vec::new();
        for shard in shards {
            // [start, end, [host, port, id...], replicas...]
            let Value::Array(items) = shard else { continue };
            let Some(Value::Array(primary)) = items.get(2) else {
                continue;
            };
            let (Some(host), Some(Value::Int(port))) = (primary.first(), primary.get(1)) else {
                continue;
            };
            let host = match host {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => {
                    return Err(StoreError::Reply(
                        "CLUSTER SLOTS: a host is not a string".into(),
                    ));
                }
            };
            let mut target = self.inner.target.clone();
            target.topology = Topology::Node;
            let port = u16::try_from(*port)
                .map_err(|_| StoreError::Reply("CLUSTER SLOTS: a port out of range".into()))?;
            let node = node_info(&host, port, target.tls)
                .map_err(|e| StoreError::Reply(format!("CLUSTER SLOTS: {:?}", e.kind())))?;
            target.nodes = vec![node];
            out.push(Store {
                inner: Arc::new(Inner {
                    slot: Mutex::new(Slot {
                        generation: 0,
                        conn: connecting(target.clone()),
                        started: Instant::now(),
                    }),
                    target,
                }),
            });
        }
        Ok(out)
    }

    async fn with_deadline<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let (generation, connecting) = {
            let slot = self.inner.slot.lock();
            (slot.generation, slot.conn.clone())
        };
        let outcome = tokio::time::timeout(self.timeout(), async {
            let conn = connecting.await.map_err(StoreError::Unavailable)?;
            op(conn).await.map_err(|e| {
                // A reply error (a script failing on a key of the wrong type) leaves the
                // connection usable; anything else, or a former primary, means a new one.
                let reply = e.code().is_some()
                    && !matches!(
                        e.code(),
                        Some("READONLY" | "MASTERDOWN" | "LOADING" | "NOAUTH" | "CLUSTERDOWN")
                    );
                if reply {
                    StoreError::Reply(format!("{:?}", e.kind()))
                } else {
                    StoreError::Unavailable(format!("{:?}", e.kind()).into())
                }
            })
        })
        .await
        .unwrap_or(Err(StoreError::Timeout));
        if let Err(StoreError::Unavailable(_)) = &outcome {
            self.reconnect(generation, false);
        }
        outcome
    }

    /// Replaces connection `generation` with a new one (once, and not too often unless `now`).
    fn reconnect(&self, generation: u64, now: bool) {
        let mut slot = self.inner.slot.lock();
        if slot.generation != generation
            || (!now && slot.started.elapsed() < RECONNECT_MIN_INTERVAL)
        {
            return;
        }
        slot.generation += 1;
        slot.conn = connecting(self.inner.target.clone());
        slot.started = Instant::now();
    }
}

/// Polls the password file; a new password means a new connection (the old one keeps serving
/// until it is replaced). Ends with the store.
async fn watch_password(inner: Weak<Inner>, path: PathBuf) {
    let mut last = read_password(&path).ok();
    loop {
        tokio::time::sleep(PASSWORD_POLL).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = read_password(&path).ok();
        if now.is_some() && now != last {
            info!(file = %path.display(), "the store password file changed; reconnecting");
            last = now;
            let generation = inner.slot.lock().generation;
            Store { inner }.reconnect(generation, true);
        }
    }
}

fn read_password(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    // Secrets written with `echo` end in a newline that is not part of the password.
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Starts connecting now, in a task of its own, so a connection comes up even while no call
/// waits for it.
fn connecting(target: Target) -> Connecting {
    let task = tokio::runtime::Handle::try_current()
        .ok()
        .map(|rt| rt.spawn(connect(target.clone())));
    async move {
        match task {
            Some(task) => task
                .await
                .map_err(|_| Arc::<str>::from("connect task ended"))?,
            None => connect(target).await,
        }
    }
    .boxed()
    .shared()
}

/// Longest a (background) connection attempt may take: TLS handshakes and Sentinel queries
/// take several round trips.
fn connect_timeout(target: &Target) -> Duration {
    (target.timeout * 20).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

async fn connect(target: Target) -> Result<Conn, Arc<str>> {
    let deadline = connect_timeout(&target);
    let attempt = tokio::time::timeout(deadline, try_connect(&target)).await;
    let error = match attempt {
        Ok(Ok(conn)) => return Ok(conn),
        Ok(Err(e)) => e,
        Err(_) => "connecting timed out".to_string(),
    };
    warn!(error = %error, "cannot connect to the shared store");
    Err(error.into())
}

/// What a connection error says, without the URL or password: the kind and, for TLS, the reason
/// (an unknown issuer, a name mismatch).
fn describe(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if text.contains("certificate") || text.contains("Certificate") || text.contains("TLS") {
        format!("TLS: {text}")
    } else {
        format!("{:?}", e.kind())
    }
}

async fn try_connect(target: &Target) -> Result<Conn, String> {
    let password = match &target.password_file {
        Some(path) => Some(
            read_password(path)
                .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?,
        ),
        None => target.url_password.clone(),
    };
    let settings = |info: &ConnectionInfo| {
        let mut redis = info.redis_settings().clone().set_db(target.db);
        if let Some(user) = &target.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &password {
            redis = redis.set_password(password);
        }
        info.clone().set_redis_settings(redis)
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout(target)))
        .set_response_timeout(Some(target.timeout));
    match &target.topology {
        Topology::Node => {
            let client = client(settings(&target.nodes[0]), &target.certs)?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| describe(&e))?;
            Ok(Conn::Node(conn))
        }
        Topology::Sentinel { primary } => {
            let mut builder = redis::sentinel::SentinelClientBuilder::new(
                target.nodes.iter().map(|n| n.addr().clone()),
                primary,
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| describe(&e))?
            .set_client_to_redis_db(target.db);
            if let Some(tls) = target.tls {
                builder = builder
                    .set_client_to_redis_tls_mode(tls)
                    .set_client_to_sentinel_tls_mode(tls)
                    .set_client_to_redis_certificates(target.certs.clone())
                    .set_client_to_sentinel_certificates(target.certs.clone());
            }
            if let Some(user) = &target.username {
                builder = builder.set_client_to_redis_username(user);
            }
            if let Some(password) = &password {
                builder = builder.set_client_to_redis_password(password);
            }
            let mut sentinel = builder.build().map_err(|e| describe(&e))?;
            let client = sentinel
                .async_get_client()
                .await
                .map_err(|e| describe(&e))?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| describe(&e))?;
            Ok(Conn::Node(conn))
        }
        Topology::Cluster => {
            let mut builder = redis::cluster::ClusterClientBuilder::new(target.nodes.clone())
                .connection_timeout(connect_timeout(target))
                .response_timeout(target.timeout)
                .retries(1);
            if let Some(tls) = target.tls {
                builder = builder.tls(tls).certs(target.certs.clone());
            }
            if let Some(user) = &target.username {
                builder = builder.username(user);
            }
            if let Some(password) = &password {
                builder = builder.password(password);
            }
            let client = builder.build().map_err(|e| describe(&e))?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(|e| describe(&e))?;
            Ok(Conn::Cluster(conn))
        }
    }
}

fn client(info: ConnectionInfo, certs: &TlsCertificates) -> Result<Client, String> {
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    if tls {
        Client::build_with_tls(info, certs.clone()).map_err(|e| describe(&e))
    } else {
        Client::open(info).map_err(|e| describe(&e))
    }
}

fn node_info(host: &str, port: u16, tls: Option<TlsMode>) -> redis::RedisResult<ConnectionInfo> {
    let addr = match tls {
        Some(mode) => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: mode == TlsMode::Insecure,
            tls_params: None,
        },
        None => ConnectionAddr::Tcp(host.to_string(), port),
    };
    addr.into_connection_info()
}

fn target(args: &StoreArgs, url: &str) -> Result<Target, StoreConfigError> {
    let bad = |what: &str| StoreConfigError::InvalidUrl(what.to_string());
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (tls, topology_word) = match scheme {
        "redis" => (false, ""),
        "rediss" => (true, ""),
        "redis+sentinel" => (false, "sentinel"),
        "rediss+sentinel" => (true, "sentinel"),
        "redis+cluster" => (false, "cluster"),
        "rediss+cluster" => (true, "cluster"),
        _ => return Err(bad("unsupported scheme")),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (url_user, url_password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (Some(user), Some(pass)),
            None => (Some(u), None),
        },
        None => (None, None),
    };
    let decode = |s: &str| -> Result<String, StoreConfigError> {
        percent_decode(s).ok_or_else(|| bad("bad percent-encoding in the user or password"))
    };
    let username = match (&args.store_username, url_user) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(u)) if !u.is_empty() => Some(decode(u)?),
        _ => None,
    };
    let url_password = url_password
        .filter(|p| !p.is_empty())
        .map(decode)
        .transpose()?;
    let mode = tls.then_some(if args.store_tls_insecure_skip_verify {
        TlsMode::Insecure
    } else {
        TlsMode::Secure
    });
    let default_port = if topology_word == "sentinel" {
        26379
    } else {
        6379
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !n.ends_with(']') || host.starts_with('[') => (
                n.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().map_err(|_| bad("bad port"))?,
            ),
            _ => (host, default_port),
        };
        if name.is_empty() {
            return Err(bad("empty host"));
        }
        nodes.push(node_info(name, port, mode).map_err(|_| bad("bad host"))?);
    }
    if nodes.is_empty() {
        return Err(bad("no host"));
    }
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let topology = match topology_word {
        "sentinel" => Topology::Sentinel {
            primary: segments
                .next()
                .ok_or_else(|| bad("redis+sentinel:// needs the primary's name as its path"))?
                .to_string(),
        },
        "cluster" => Topology::Cluster,
        _ => {
            if nodes.len() > 1 {
                return Err(bad(
                    "several hosts need redis+sentinel:// or redis+cluster://",
                ));
            }
            Topology::Node
        }
    };
    let db = match segments.next() {
        Some(n) => n.parse::<i64>().map_err(|_| bad("bad database number"))?,
        None => 0,
    };
    if topology == Topology::Cluster && db != 0 {
        return Err(bad("a Cluster has only database 0"));
    }
    if segments.next().is_some() {
        return Err(bad("unexpected path"));
    }
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StoreConfigError::File(p.clone(), e.to_string()))
    };
    let root_cert = args.store_ca_file.as_ref().map(read).transpose()?;
    let client_tls = match (&args.store_client_cert, &args.store_client_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    if !tls && (root_cert.is_some() || client_tls.is_some()) {
        return Err(StoreConfigError::Tls(
            "--store-ca-file and --store-client-cert need a rediss:// URL".into(),
        ));
    }
    if let Some(path) = &args.store_password_file {
        read_password(path).map_err(|e| StoreConfigError::File(path.clone(), e.to_string()))?;
    }
    Ok(Target {
        topology,
        nodes,
        tls: mode,
        certs: TlsCertificates {
            client_tls,
            root_cert,
        },
        username,
        url_password,
        password_file: args.store_password_file.clone(),
        db,
        timeout: args.store_timeout,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The key prefix a store shares between a counter's keys: in a Cluster, `{name}` so that every
/// key of one Route (or Team) lands in one hash slot and one script can touch them all.
pub fn tag(name: &str, cluster: bool) -> String {
    if cluster {
        format!("{{{name}}}")
    } else {
        name.to_string()
    }
}

/// The fixed start of one owner's keys (`portcullis:team:name`), made once per Route or Team
/// rather than per call, in both spellings: plain, and with `name` as a Cluster hash tag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPrefix {
    plain: Box<str>,
    tagged: Box<str>,
}

impl KeyPrefix {
    pub fn new(start: &str, name: &str) -> KeyPrefix {
        KeyPrefix {
            plain: format!("{start}{}", tag(name, false)).into(),
            tagged: format!("{start}{}", tag(name, true)).into(),
        }
    }

    pub fn get(&self, cluster: bool) -> &str {
        if cluster { &self.tagged } else { &self.plain }
    }
}

/// The hash tag of a key (`{...}`, as Redis Cluster reads it), or the whole key.
pub fn slot_of(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> StoreArgs {
        StoreArgs {
            store_timeout: Duration::from_millis(50),
            ..StoreArgs::default()
        }
    }

    #[test]
    fn urls_of_each_topology_parse() {
        let t = target(&args(), "redis://h:7000/2").unwrap();
        assert_eq!(
            (t.topology, t.nodes.len(), t.db, t.tls),
            (Topology::Node, 1, 2, None)
        );
        let t = target(&args(), "rediss://user:p%40ss@h").unwrap();
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.url_password.as_deref(), Some("p@ss"));
        assert_eq!(t.tls, Some(TlsMode::Secure));
        let t = target(&args(), "redis+sentinel://a:26379,b,c:1/mymaster/1").unwrap();
        assert_eq!(
            t.topology,
            Topology::Sentinel {
                primary: "mymaster".into()
            }
        );
        assert_eq!((t.nodes.len(), t.db), (3, 1));
        assert!(matches!(t.nodes[1].addr(), ConnectionAddr::Tcp(h, 26379) if h == "b"));
        let t = target(&args(), "rediss+cluster://a:1,b:2").unwrap();
        assert_eq!((t.topology, t.nodes.len()), (Topology::Cluster, 2));
        for bad in [
            "http://x",
            "redis://",
            "redis://a,b",
            "redis+sentinel://a",
            "redis+cluster://a/3",
            "redis://a:port",
            "redis://a/x",
        ] {
            assert!(target(&args(), bad).is_err(), "{bad}");
        }
        // Errors never echo the URL (it may hold a password).
        let e = target(&args(), "redis://u:secret@a:bad").err().unwrap();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_timeout("0.2s").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_timeout("1").unwrap(), Duration::from_secs(1));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("1h").is_err());
    }

    #[test]
    fn hash_tags() {
        assert_eq!(tag("chat", true), "{chat}");
        assert_eq!(tag("chat", false), "chat");
        assert_eq!(slot_of("portcullis:{ns/chat}:0:calls:*:1"), "ns/chat");
        assert_eq!(slot_of("portcullis:chat:0"), "portcullis:chat:0");
    }
}
