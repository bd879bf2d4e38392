//! Cluster mode (CONTRACT.md "Cluster"): `REALTIME_NATS_URL` starts the cluster link and plugs
//! its queues, metrics and status into the server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;

use crate::config::{number, var};

/// `REALTIME_NODE_TIMEOUT_SECS` default.
const NODE_TIMEOUT_SECS_DEFAULT: u64 = 10;

/// Cluster mode, decided before anything starts: the queues between the replication fleet and
/// the link (created first, because the fleet needs its end when it starts), and the cell the
/// drain hook finds the link in.
pub(crate) struct Plan {
    remote: (flume::Sender<(engine::ShardId, engine::changes::PgOut)>, flume::Receiver<(engine::ShardId, engine::changes::PgOut)>),
    leadership: (flume::Sender<(engine::TenantId, bool)>, flume::Receiver<(engine::TenantId, bool)>),
    link: Arc<std::sync::OnceLock<Arc<powa_cluster::Link>>>,
}

impl Plan {
    /// The fleet's side of cluster mode.
    pub(crate) fn fleet(&self) -> replication::fleet::FleetCluster {
        let leadership = self.leadership.0.clone();
        replication::fleet::FleetCluster {
            remote: self.remote.0.clone(),
            // Unbounded in type, bounded in use: two messages per change of lead.
            leadership: Arc::new(move |tenant, leading| {
                let _ = leadership.send((tenant, leading));
            }),
        }
    }
}

/// `Some` in cluster mode (`REALTIME_NATS_URL` set).
pub(crate) fn plan() -> Result<Option<Plan>> {
    if var("REALTIME_NATS_URL").is_none() {
        return Ok(None);
    }
    Ok(Some(Plan { remote: flume::bounded(powa_cluster::pg::REMOTE_QUEUE_MAX), leadership: flume::unbounded(), link: Arc::default() }))
}

/// Routes the shards' Postgres Changes commands through the cluster link (subscriptions to the
/// database's leader node), and reports health from this node's own core.
#[derive(Debug)]
struct ClusterDatabases {
    inner: Arc<dyn net::server::Databases>,
    router: powa_cluster::PgRouter,
}

impl net::server::Databases for ClusterDatabases {
    fn handle(&self, tenant: engine::TenantId, url: &str) -> net::server::DbHandle {
        let local = self.inner.handle(tenant, url);
        net::server::DbHandle { commands: self.router.commands(tenant), healthy: local.healthy }
    }

    fn directory_changed(&self, directory: &tenants::Directory) {
        self.inner.directory_changed(directory);
    }
}

/// Starts the link when `plan` is set and connects it to `server` (and to the replication
/// fleet, whose shard senders are `pg_shards`, when there are databases).
pub(crate) fn attach(server: &mut net::server::ServerConfig, plan: Option<Plan>, pg_shards: Option<Vec<flume::Sender<engine::changes::PgOut>>>) -> Result<()> {
    let Some(plan) = plan else { return Ok(()) };
    let Some(urls) = var("REALTIME_NATS_URL") else { return Ok(()) };
    let cluster = var("REALTIME_CLUSTER").map(|c| c.trim().to_owned()).unwrap_or_else(|| "powa".into());
    let node_id = var("REALTIME_NODE_ID").map(|n| n.trim().to_owned()).unwrap_or_else(default_node_id);
    let timeout_secs: u64 = number("REALTIME_NODE_TIMEOUT_SECS", NODE_TIMEOUT_SECS_DEFAULT)?;
    if timeout_secs == 0 {
        bail!("REALTIME_NODE_TIMEOUT_SECS must be at least 1");
    }
    let config = powa_cluster::LinkConfig { urls, cluster: cluster.clone(), node_id: node_id.clone(), node_timeout: Duration::from_secs(timeout_secs), shards: server.shards };
    let pg = match (&server.postgres, pg_shards) {
        (Some(postgres), Some(shards)) => {
            let databases = Arc::clone(&postgres.databases);
            let registry = Arc::clone(&server.tenants);
            let local: powa_cluster::pg::LocalCore = Arc::new(move |tenant| {
                let directory = registry.load();
                let url = directory.get(tenant)?.database_url.clone()?;
                Some(databases.handle(tenant, &url).commands)
            });
            Some(powa_cluster::PgPort { local, shards, remote: plan.remote.1.clone(), leadership: plan.leadership.1.clone() })
        }
        _ => None,
    };
    let mut link = powa_cluster::Link::start(config, Arc::clone(&server.tenants), pg)?;
    if let (Some(router), Some(postgres)) = (link.pg_router.clone(), server.postgres.as_mut()) {
        let inner = Arc::clone(&postgres.databases);
        postgres.databases = Arc::new(ClusterDatabases { inner, router });
    }
    let inboxes = std::mem::take(&mut link.inboxes);
    let link = Arc::new(link);
    let queue_full_drops = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stats = Arc::clone(&link.stats);
    let connected = Box::new(move || stats.is_connected());
    let (stats, drops) = (Arc::clone(&link.stats), Arc::clone(&queue_full_drops));
    server.metrics_hooks.push(net::server::MetricsHook(Box::new(move |out: &mut String| {
        stats.render_metrics(out);
        use std::fmt::Write as _;
        let name = "realtime_cluster_queue_full_drops_total";
        let _ = writeln!(out, "# HELP {name} Broadcasts delivered on this node only because the link's queue was full.\n# TYPE {name} counter\n{name} {}", drops.load(std::sync::atomic::Ordering::Relaxed));
    })));
    let stats = Arc::clone(&link.stats);
    let (status_cluster, status_node, incarnation) = (cluster.clone(), node_id.clone(), link.incarnation);
    let status = net::server::StatusHook(Box::new(move || {
        use std::sync::atomic::Ordering::Relaxed;
        let nodes: Vec<_> = stats.nodes().into_iter().map(|n| json!({"node": n.node, "incarnation": format!("{:08x}", n.incarnation), "last_seen_ms": n.last_seen_ms})).collect();
        json!({
            "cluster": status_cluster,
            "node": status_node,
            "incarnation": format!("{incarnation:08x}"),
            "nats_connected": stats.is_connected(),
            "nodes": nodes,
            "routed_topics": stats.routed_topics.load(Relaxed),
            "messages_out": stats.messages_out.load(Relaxed),
            "bytes_out": stats.bytes_out.load(Relaxed),
            "messages_in": stats.messages_in.load(Relaxed),
            "bytes_in": stats.bytes_in.load(Relaxed),
            "dropped_out": stats.dropped_out.load(Relaxed),
            "dropped_in": stats.dropped_in.load(Relaxed),
            "database_leaders": stats.leaders().into_iter().map(|(tenant, leader)| json!({"tenant": tenant, "leader": leader})).collect::<Vec<_>>(),
        })
    }));
    server.cluster = Some(net::server::ClusterPort {
        node: link.incarnation,
        data: link.data.clone(),
        control: link.control.clone(),
        inboxes,
        connected,
        queue_full_drops,
        status: Some(status),
    });
    tracing::info!(%cluster, node = %node_id, "cluster mode: nodes meet over NATS");
    let _ = plan.link.set(link);
    Ok(())
}

/// The drain hook: the other nodes drop this node's presences at once.
pub(crate) fn on_drain(plan: &Option<Plan>) -> Option<Box<dyn Fn() + Send>> {
    let cell = Arc::clone(&plan.as_ref()?.link);
    Some(Box::new(move || {
        if let Some(link) = cell.get() {
            link.leave();
        }
    }))
}

/// The host name plus a random suffix.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{host}-{:06x}", (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff)
}
