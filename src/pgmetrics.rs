//! The Postgres side of `/metrics` (README.md "Metrics"): the replication reader's and the
//! changes core's counters, rendered by a hook the server calls at each scrape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use net::server::{series, MetricsHook, StatusHook};
use replication::changes::CoreStats;
use replication::reader::ReaderStats;

/// The hook for one database.
pub(crate) fn hook(reader: Arc<ReaderStats>, core: Arc<CoreStats>, healthy: Arc<AtomicBool>) -> MetricsHook {
    MetricsHook(Box::new(move |out| render(&reader, &core, &healthy, out)))
}

/// The Postgres Changes section of `GET /api/status` (the status page shows it as it is).
pub(crate) fn status(reader: Arc<ReaderStats>, core: Arc<CoreStats>, healthy: Arc<AtomicBool>) -> StatusHook {
    StatusHook(Box::new(move || {
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        let (rls_checks, rls_mean_micros) = core.rls_latency.count_and_mean_micros();
        let millis = |micros: u64| micros as f64 / 1000.0;
        serde_json::json!({
            "database_connected": healthy.load(Ordering::Relaxed),
            "replication_lag_bytes": load(&reader.server_wal_end).saturating_sub(load(&reader.received_lsn)),
            "replication_lag_seconds": load(&reader.commit_lag_micros) as f64 / 1e6,
            "replication_reconnects": load(&reader.reconnects),
            "changes_decoded": load(&reader.changes_decoded),
            "transactions_dropped": load(&reader.txns_dropped),
            "subscriptions": load(&core.channels),
            "deliveries": load(&core.deliveries),
            "rls_checks": rls_checks,
            "rls_check_mean_ms": millis(rls_mean_micros),
            "rls_check_p99_ms_at_most": core.rls_latency.quantile_bound_micros(0.99).filter(|&b| b != u64::MAX).map(millis),
        })
    }))
}

fn render(reader: &ReaderStats, core: &CoreStats, healthy: &AtomicBool, out: &mut String) {
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    let wal_end = load(&reader.server_wal_end);
    let received = load(&reader.received_lsn);
    series(out, "realtime_database_up", "gauge", "1 while the changes core is connected to the database", u8::from(healthy.load(Ordering::Relaxed)));
    series(out, "realtime_replication_lag_bytes", "gauge", "The server's end of WAL minus the position read by the replication stream", wal_end.saturating_sub(received));
    series(out, "realtime_replication_lag_seconds", "gauge", "For the last transaction decoded: from its commit to its decoding", load(&reader.commit_lag_micros) as f64 / 1e6);
    series(out, "realtime_replication_confirmed_lsn", "gauge", "The last WAL position confirmed to the server", load(&reader.confirmed_lsn));
    series(out, "realtime_replication_reconnects_total", "counter", "Replication stream reconnections", load(&reader.reconnects));
    series(out, "realtime_postgres_changes_decoded_total", "counter", "Row changes decoded from the replication stream", load(&reader.changes_decoded));
    series(out, "realtime_postgres_transactions_dropped_total", "counter", "Transactions dropped because the changes core was behind", load(&reader.txns_dropped));
    series(out, "realtime_postgres_changes_dropped_total", "counter", "Row changes dropped beyond the per-transaction limit", load(&reader.changes_dropped));
    series(out, "realtime_postgres_changes_deliveries_total", "counter", "Postgres Changes messages delivered (per channel)", load(&core.deliveries));
    series(out, "realtime_postgres_changes_inbox_dropped_total", "counter", "Postgres Changes messages dropped because a shard's inbox was full", load(&core.inbox_dropped));
    series(out, "realtime_postgres_changes_subscriptions", "gauge", "Channels with Postgres Changes bindings", load(&core.channels));
    series(out, "realtime_rls_checks_total", "counter", "RLS check round trips", load(&core.rls_queries));
    engine::histogram::Histogram::render("realtime_rls_check_seconds", "Round-trip time of the RLS check queries", std::iter::once(&core.rls_latency), out);
}

/// Multi-tenant mode: the fleet's tenant databases by state, and totals over every tenant
/// (bounded cardinality: no per-tenant series here; per-tenant health is in the tenant API's
/// `/api/tenants/{id}/health`).
pub(crate) fn fleet_hook(fleet: replication::fleet::Fleet) -> MetricsHook {
    MetricsHook(Box::new(move |out| {
        use std::fmt::Write as _;
        let stats = fleet.stats();
        let name = "realtime_tenant_databases";
        let _ = writeln!(out, "# HELP {name} Tenant databases the server runs a replication stream for, by state\n# TYPE {name} gauge");
        for state in [
            replication::fleet::TenantState::Starting,
            replication::fleet::TenantState::Running,
            replication::fleet::TenantState::Failed,
            replication::fleet::TenantState::Stopping,
            replication::fleet::TenantState::Stopped,
        ] {
            let count = stats.iter().filter(|s| s.state == state).count();
            let _ = writeln!(out, "{name}{{state=\"{}\"}} {count}", format!("{state:?}").to_lowercase());
        }
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        series(out, "realtime_tenant_databases_up", "gauge", "Tenant databases whose connections are up", stats.iter().filter(|s| s.healthy.load(Ordering::Relaxed)).count());
        series(out, "realtime_postgres_changes_decoded_total", "counter", "Row changes decoded (all tenants)", stats.iter().map(|s| load(&s.reader.changes_decoded)).sum::<u64>());
        series(out, "realtime_postgres_changes_deliveries_total", "counter", "Change messages delivered (all tenants)", stats.iter().map(|s| load(&s.core.deliveries)).sum::<u64>());
    }))
}
