//! Cluster mode (CONTRACT.md "Cluster"): `REALTIME_NATS_URL` starts the cluster link and plugs
//! its queues, metrics and status into the server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;

use crate::config::{number, var};

/// `REALTIME_NODE_TIMEOUT_SECS` default.
const NODE_TIMEOUT_SECS_DEFAULT: u64 = 10;

/// Starts the link when `REALTIME_NATS_URL` is set and connects it to `server`.
pub(crate) fn attach(server: &mut net::server::ServerConfig) -> Result<Option<Arc<powa_cluster::Link>>> {
    let Some(urls) = var("REALTIME_NATS_URL") else { return Ok(None) };
    let cluster = var("REALTIME_CLUSTER").map(|c| c.trim().to_owned()).unwrap_or_else(|| "powa".into());
    let node_id = var("REALTIME_NODE_ID").map(|n| n.trim().to_owned()).unwrap_or_else(default_node_id);
    let timeout_secs: u64 = number("REALTIME_NODE_TIMEOUT_SECS", NODE_TIMEOUT_SECS_DEFAULT)?;
    if timeout_secs == 0 {
        bail!("REALTIME_NODE_TIMEOUT_SECS must be at least 1");
    }
    let config = powa_cluster::LinkConfig { urls, cluster: cluster.clone(), node_id: node_id.clone(), node_timeout: Duration::from_secs(timeout_secs), shards: server.shards };
    let mut link = powa_cluster::Link::start(config, Arc::clone(&server.tenants))?;
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
    Ok(Some(link))
}

/// The drain hook: the other nodes drop this node's presences at once.
pub(crate) fn on_drain(link: Option<Arc<powa_cluster::Link>>) -> Option<Box<dyn Fn() + Send>> {
    let link = link?;
    Some(Box::new(move || link.leave()))
}

/// The host name plus a random suffix.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{host}-{:06x}", (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff)
}
