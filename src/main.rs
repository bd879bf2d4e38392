//! `powa-realtime`: a Supabase Realtime compatible server.
//!
//! Commands (CONTRACT.md): `serve`, `dev`, `token`. Configuration comes from the environment.

mod cluster;
mod config;
mod databases;
mod dev;
mod pgmetrics;
mod signals;

use std::io::Read as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde_json::{Map, Value};

const USAGE: &str = "\
powa-realtime — a Supabase Realtime compatible server

USAGE:
    powa-realtime serve                 serve, configured by the environment (JWT_SECRET required)
    powa-realtime dev                   the embedded default: keep a secret under ./.powa/, print keys, serve
    powa-realtime token --role ROLE [--sub ID] [--exp SECONDS] [--claim K=V]...
                                        print a JWT signed with JWT_SECRET (exp: lifetime from now,
                                        default 3600; negative for an already expired token)

ENVIRONMENT: REALTIME_ADDR (127.0.0.1:4000), JWT_SECRET, JWT_JWKS, REALTIME_SHARDS (cores),
    DATABASE_URL, REALTIME_DRAIN_SECS (10), REALTIME_TLS_CERT + REALTIME_TLS_KEY (PEM; SIGHUP reloads), REALTIME_MAX_* limits, REALTIME_IDLE_TIMEOUT_SECS, REALTIME_JOIN_ERROR_DELAY_MS,
    REALTIME_CONNECT_ERROR_DELAY_MS, REALTIME_SLOT_NAME (powa_realtime), REALTIME_SLOT_MAX_RETAINED_MB (1024),
    REALTIME_SLOT_MAX_AWAY_SECS (600), REALTIME_NATS_URL + REALTIME_CLUSTER (powa), REALTIME_NODE_ID,
    REALTIME_NODE_TIMEOUT_SECS (10) for cluster mode, RUST_LOG (info), REALTIME_LOG_FORMAT (text|json). See README.md.
";

/// Exit status after a panic (Rust's own for a panicking main thread).
const PANIC_EXIT_STATUS: i32 = 101;

/// A panic anywhere (a shard, the replication or changes thread) is a bug, and a process with
/// one thread gone is worse than none: a dead shard's listener would keep taking connections
/// that are never served. So the process logs the panic and exits at once, non-zero, for its
/// supervisor to restart it (ARCHITECTURE.md, "A panic ends the process"). One exception: a
/// panic inside the NATS client on the cluster link's thread, which bytes from another NATS
/// client can cause; only that client's task ends and the link connects again
/// (`powa_cluster::link::contains_panic`).
fn install_panic_exit() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let current = std::thread::current();
        if powa_cluster::link::contains_panic(current.name(), info.location().map(|l| l.file())) {
            tracing::error!(panic = %info, "a panic inside a dependency on the cluster link's thread: that task ends, the link connects again");
            return;
        }
        let thread = current.name().unwrap_or("unnamed").to_string();
        tracing::error!(thread, panic = %info, "a thread panicked; exiting so that a supervisor restarts the server");
        default_hook(info);
        dev::shutdown_after_panic();
        // SAFETY: `_exit` ends the process without running atexit handlers, which is what we
        // want while other threads are still running (libc `exit` is not safe to race).
        unsafe { libc::_exit(PANIC_EXIT_STATUS) }
    }));
}

fn main() {
    install_panic_exit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        // After a drain other threads (the database side) still run: leave without exit
        // handlers, as the signal thread does.
        Some("serve") => serve().map(|()| signals::exit_now(0)),
        Some("dev") => dev().map(|()| signals::exit_now(0)),
        Some("token") => token(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
    };
    if let Err(error) = result {
        eprintln!("powa-realtime: {error:#}");
        std::process::exit(1);
    }
}

/// `RUST_LOG` filter (default `info`); `REALTIME_LOG_FORMAT=json` for one JSON object per line.
fn init_logging() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr);
    match std::env::var("REALTIME_LOG_FORMAT").ok().as_deref().map(str::trim) {
        None | Some("" | "text") => builder.init(),
        Some("json") => builder.json().with_current_span(false).with_span_list(false).init(),
        Some(other) => bail!("REALTIME_LOG_FORMAT={other:?}: use `text` or `json`"),
    }
    Ok(())
}

fn serve() -> Result<()> {
    // Before any other thread exists, so that every thread inherits the mask.
    let blocked = signals::block()?;
    init_logging()?;
    let mut server = config::server_config(|| {
        let secret = std::env::var("JWT_SECRET").context("JWT_SECRET is required by `serve` in single-tenant mode (the HS256 secret project tokens are signed with); multi-tenant mode takes each tenant's keys from REALTIME_TENANTS")?;
        Ok(secret.into_bytes())
    })?;
    let plan = cluster::plan()?;
    signals::spawn(blocked, std::sync::Arc::clone(&server.control), server.drain, signals::Hooks { reload: reload_hook(&server), hangup_stops: false, before_exit: || {}, on_drain: cluster::on_drain(&plan) })?;
    attach_tenant_sources(&mut server)?;
    let replication = attach_database(&mut server, plan.as_ref().map(cluster::Plan::fleet))?;
    cluster::attach(&mut server, plan, replication.as_ref().map(Replication::shard_senders))?;
    let directory = server.tenants.load();
    tracing::info!(addr = %server.addr, shards = server.shards, database = server.postgres.is_some(), tenants = if directory.multi_tenant() { directory.len() } else { 0 }, "powa-realtime serving");
    drop(directory);
    net::server::run(server)?;
    // A clean stop (the drain finished): drop the replication slots.
    if let Some(replication) = replication {
        replication.stop();
    }
    Ok(())
}

/// SIGHUP's hook: re-read the TLS certificate and key (new handshakes use them) and the tenants
/// file (tenants swapped live; sockets of removed tenants or of tenants whose keys or gates
/// changed are disconnected by their shards). On any error the previous state stays.
fn reload_hook(server: &net::server::ServerConfig) -> Option<Box<dyn Fn() + Send>> {
    let tls = server.tls.clone();
    let tenants = config::tenants_file().map(|path| (path, std::sync::Arc::clone(&server.tenants)));
    if tls.is_none() && tenants.is_none() {
        return None;
    }
    Some(Box::new(move || {
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Err(error) => tracing::error!(%error, "SIGHUP: TLS reload failed; the previous certificate stays in use"),
            }
        }
        if let Some((path, registry)) = &tenants {
            let reloaded = config::read_tenants(path).and_then(|configs| registry.replace(configs).map_err(anyhow::Error::from));
            match reloaded {
                Ok(reload) => tracing::info!(
                    added = ?reload.added,
                    removed = ?reload.removed,
                    disconnected = ?reload.disconnected,
                    updated = ?reload.updated,
                    "SIGHUP: tenants file reloaded"
                ),
                Err(error) => tracing::error!(error = format!("{error:#}"), "SIGHUP: tenants file refused; the previous tenants stay"),
            }
        }
    }))
}

/// Multi-tenant mode: the control database (`REALTIME_CONTROL_DATABASE_URL`: migrate, load the
/// tenants, poll) and the tenant API (`API_JWT_SECRET`: read-only over a tenants file).
fn attach_tenant_sources(server: &mut net::server::ServerConfig) -> Result<()> {
    let api_keys = std::env::var("API_JWT_SECRET").ok().filter(|s| !s.trim().is_empty()).map(|s| auth::KeyStore::new(s.trim().as_bytes().to_vec()));
    let control_url = std::env::var("REALTIME_CONTROL_DATABASE_URL").ok().filter(|s| !s.trim().is_empty());
    if let Some(url) = control_url {
        // Without API_JWT_SECRET the tenants are still read (and polled); the API answers 404.
        let keys = api_keys.clone().unwrap_or_else(|| auth::KeyStore::new(Vec::new()));
        let handle = replication::control::start(url.trim().to_string(), std::sync::Arc::clone(&server.tenants), keys).context("REALTIME_CONTROL_DATABASE_URL")?;
        tracing::info!(tenants = server.tenants.load().len(), "multi-tenant mode: tenants from the control database");
        if api_keys.is_some() {
            server.tenant_api = Some(std::sync::Arc::new(databases::ControlApi(handle)));
        }
    } else if let (Some(keys), true) = (api_keys, server.tenants.load().multi_tenant()) {
        server.tenant_api = Some(std::sync::Arc::new(databases::FileApi { registry: std::sync::Arc::clone(&server.tenants), keys }));
    }
    Ok(())
}

/// What a clean stop must end: the single tenant's replication stream, or the fleet.
enum Replication {
    Single(ReaderControl, replication::fleet::Fleet),
    Fleet(replication::fleet::Fleet),
}

impl Replication {
    /// The shards' Postgres inboxes the cores send to (cluster mode delivers the leader's
    /// messages through them).
    fn shard_senders(&self) -> Vec<flume::Sender<engine::changes::PgOut>> {
        match self {
            Replication::Single(_, fleet) | Replication::Fleet(fleet) => fleet.shard_senders(),
        }
    }

    /// A clean stop (the drain finished): leave the streams and drop the slots.
    fn stop(&self) {
        match self {
            Replication::Single(control, _) => replication::start::stop(control, SLOT_DROP_WAIT),
            Replication::Fleet(fleet) => {
                fleet.stop_all(SLOT_DROP_WAIT);
            }
        }
    }
}

/// Multi-tenant mode: the fleet that runs each tenant's Postgres side on a fixed set of worker
/// threads, started on a tenant's first need and stopped when it has had no socket, no
/// subscription and no command for 5 minutes.
fn attach_fleet(server: &mut net::server::ServerConfig, cluster: Option<replication::fleet::FleetCluster>) -> Result<replication::fleet::Fleet> {
    let mut config = replication::fleet::FleetConfig::new(server.shards);
    config.slot = config::slot_config()?;
    config.cluster = cluster;
    let registry = std::sync::Arc::clone(&server.tenants);
    config.in_use = Some(std::sync::Arc::new(move |tenant| registry.load().get(tenant).is_some_and(|t| t.counters.connections() > 0)));
    let (fleet, inboxes) = replication::fleet::Fleet::new(config);
    let databases = databases::Fleet { fleet: fleet.clone(), registry: std::sync::Arc::clone(&server.tenants) };
    server.postgres = Some(net::server::PgLink { inboxes, databases: std::sync::Arc::new(databases) });
    server.metrics_hooks.push(pgmetrics::fleet_hook(fleet.clone()));
    Ok(fleet)
}

/// With `DATABASE_URL` (single-tenant mode): install the schema and start the replication side.
/// Multi-tenant mode: the fleet.
fn attach_database(server: &mut net::server::ServerConfig, cluster: Option<replication::fleet::FleetCluster>) -> Result<Option<Replication>> {
    if server.tenants.load().multi_tenant() {
        return attach_fleet(server, cluster).map(|fleet| Some(Replication::Fleet(fleet)));
    }
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => attach_database_url(server, url.trim(), cluster).map(|(c, fleet)| Some(Replication::Single(c, fleet))),
        _ => Ok(None),
    }
}

/// How long a clean stop waits for the replication slot to be dropped.
const SLOT_DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

type ReaderControl = std::sync::Arc<replication::reader::ReaderControl>;

fn attach_database_url(server: &mut net::server::ServerConfig, url: &str, cluster: Option<replication::fleet::FleetCluster>) -> Result<(ReaderControl, replication::fleet::Fleet)> {
    let postgres = replication::start::start_with(url, server.shards, server.limits.payload_bytes_max, config::slot_config()?, cluster).context("DATABASE_URL")?;
    let control = std::sync::Arc::clone(&postgres.control);
    server.tenants.set_single_database(Some(url.to_string()));
    server.metrics_hooks.push(pgmetrics::hook(std::sync::Arc::clone(&postgres.reader_stats), std::sync::Arc::clone(&postgres.core_stats), std::sync::Arc::clone(&postgres.healthy)));
    server.postgres_status = Some(pgmetrics::status(postgres.reader_stats, postgres.core_stats, std::sync::Arc::clone(&postgres.healthy)));
    let handle = net::server::DbHandle { commands: postgres.commands, healthy: postgres.healthy };
    server.postgres = Some(net::server::PgLink { inboxes: postgres.inboxes, databases: std::sync::Arc::new(databases::Single(handle)) });
    Ok((control, postgres.fleet))
}

/// Reads or creates the dev secret under `./.powa/`.
fn dev_secret(dir: &Path) -> Result<String> {
    let path = dir.join("jwt_secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_string();
        if !secret.is_empty() {
            return Ok(secret);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}

/// Lifetime of the keys `dev` prints: ten years, like Supabase's API keys.
const DEV_KEY_LIFETIME_SECS: i64 = 10 * 365 * 24 * 3600;

fn dev() -> Result<()> {
    // Before any other thread exists: Ctrl-C must stop the embedded PostgreSQL too.
    let blocked = signals::block()?;
    init_logging()?;
    let dir = Path::new(".powa");
    if config::tenants_file().is_some() {
        bail!("`dev` serves one project; for multi-tenant mode run `powa-realtime serve` with REALTIME_TENANTS=<tenants.toml> (README \"Multi-tenant mode\")");
    }
    let secret = match std::env::var("JWT_SECRET") {
        Ok(secret) => secret,
        Err(_) => dev_secret(dir)?,
    };
    let mut server = config::server_config(|| Ok(secret.clone().into_bytes()))?;
    // The server drains first; `dev::shutdown` after `run` stops PostgreSQL.
    let plan = cluster::plan()?;
    signals::spawn(blocked, std::sync::Arc::clone(&server.control), server.drain, signals::Hooks { reload: reload_hook(&server), hangup_stops: true, before_exit: dev::shutdown, on_drain: cluster::on_drain(&plan) })?;
    let database = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => None,
        _ => Some(dev::start_database(dir)?),
    };
    let url = match &database {
        Some(_) => dev::database_url(),
        None => std::env::var("DATABASE_URL").ok(),
    };
    let mut replication = None;
    if let Some(url) = url {
        match attach_database_url(&mut server, url.trim(), plan.as_ref().map(cluster::Plan::fleet)) {
            Ok(started) => replication = Some(started),
            Err(error) => {
                dev::shutdown();
                return Err(error);
            }
        }
    }
    cluster::attach(&mut server, plan, replication.as_ref().map(|(_, fleet)| fleet.shard_senders()))?;
    let exp = now() + DEV_KEY_LIFETIME_SECS;
    let key = |role: &str| {
        let mut claims = Map::new();
        claims.insert("role".into(), Value::from(role));
        claims.insert("exp".into(), Value::from(exp));
        auth::sign_hs256(secret.as_bytes(), &claims)
    };
    println!("powa-realtime dev");
    println!("  WebSocket:        ws://{}/realtime/v1/websocket?apikey=<key>&vsn=1.0.0", server.addr);
    println!("  realtime-js URL:  ws://{}/realtime/v1", server.addr);
    println!("  REST broadcast:   http://{}/realtime/v1/api/broadcast", server.addr);
    println!("  JWT secret:       kept in {}", dir.join("jwt_secret").display());
    println!("  anon key:         {}", key("anon"));
    println!("  service_role key: {}", key("service_role"));
    match &database {
        Some(database) => {
            println!("  DATABASE_URL:     {}", database.url);
            println!("  PostgreSQL:       data in {}, log in {}", database.data_dir.display(), database.log.display());
            println!("  Postgres Changes: stream a table's changes by adding it to the supabase_realtime publication:");
            println!("                      psql {} -c 'CREATE PUBLICATION supabase_realtime'", database.url);
            println!("                      psql {} -c 'ALTER PUBLICATION supabase_realtime ADD TABLE public.<table>'", database.url);
        }
        None => println!("  DATABASE_URL:     from the environment"),
    }
    println!("  Ctrl-C stops the server{}.", if database.is_some() { " and PostgreSQL" } else { "" });
    println!("  Many projects on one server: `powa-realtime serve` with REALTIME_TENANTS=<tenants.toml> (README \"Multi-tenant mode\").");
    let result = net::server::run(server);
    if let Some((control, _)) = replication {
        replication::start::stop(&control, SLOT_DROP_WAIT);
    }
    dev::shutdown();
    result?;
    Ok(())
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn token(args: &[String]) -> Result<()> {
    let secret = std::env::var("JWT_SECRET").context("JWT_SECRET is required by `token`")?;
    let mut claims = Map::new();
    let mut lifetime: i64 = 3600;
    let mut role = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(value) => Ok(value.clone()),
                None => iter.next().cloned().with_context(|| format!("{flag} needs a value")),
            }
        };
        match flag {
            "--role" => role = Some(value()?),
            "--sub" => {
                claims.insert("sub".into(), Value::from(value()?));
            }
            "--exp" => lifetime = value()?.parse().context("--exp takes whole seconds (e.g. 3600, or --exp=-30)")?,
            "--claim" => {
                let pair = value()?;
                let (key, raw) = pair.split_once('=').context("--claim takes K=V")?;
                let parsed = serde_json::from_str(raw).unwrap_or_else(|_| Value::from(raw));
                claims.insert(key.to_string(), parsed);
            }
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    let Some(role) = role else { bail!("--role is required\n\n{USAGE}") };
    claims.insert("role".into(), Value::from(role));
    claims.insert("exp".into(), Value::from(now() + lifetime));
    claims.entry("iat").or_insert_with(|| Value::from(now()));
    println!("{}", auth::sign_hs256(secret.as_bytes(), &claims));
    Ok(())
}
