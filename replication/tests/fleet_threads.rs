//! No thread per tenant: 20 tenants (20 databases of one cluster, each streaming and
//! subscribed) on a fleet of 2 workers run on the same threads as one tenant. Its own test
//! binary, so no other test's threads are counted.

mod common;

use std::time::Duration;

use common::*;
use engine::TenantId;
use powa_replication::fleet::{Fleet, FleetConfig, TenantState, BLOCKING_THREADS_PER_WORKER};

const TENANTS: usize = 20;
const WORKERS: usize = 2;

/// Resident memory of this process, KiB (for the report; not asserted).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").expect("/proc/self/task").count()
}

#[test]
fn twenty_tenants_share_two_worker_threads() {
    let (mut cluster, _guard) = powa_replication::cluster::Cluster::throwaway().expect("PostgreSQL 15");
    let port = cluster.port();
    // Room for 20 walsenders and slots (and the ones a clean stop opens to drop them).
    for setting in ["max_wal_senders = 50", "max_replication_slots = 50", "max_connections = 200"] {
        cluster.psql(&format!("alter system set {setting}")).unwrap();
    }
    cluster.stop();
    let data_dir = cluster.data_dir().to_path_buf();
    drop(cluster);
    let cluster = powa_replication::cluster::Cluster::start(&data_dir, port).expect("restart");
    for n in 0..TENANTS {
        cluster.psql(&format!("create database t{n}")).unwrap();
        psql_db(port, &format!("t{n}"), "create table public.items (id int primary key, owner text); create publication supabase_realtime for table public.items").unwrap();
    }

    let before = threads();
    let rss_before = rss_kib();
    let mut config = FleetConfig::new(2);
    config.workers = WORKERS;
    let (fleet, inboxes) = Fleet::new(config);
    let mut inbox = Inbox::new(inboxes);
    let url = |n: usize| format!("postgres://postgres@127.0.0.1:{port}/t{n}");

    let start = |n: usize| {
        let (commands, _) = fleet.handle(TenantId(n as u32 + 1), &format!("tenant-{n}"), &url(n), 3_000_000);
        commands.send(subscribe(key(0, n as u64 + 1, 1), "items")).unwrap();
        commands
    };
    let first = start(0);
    inbox.expect_system(1, 1, "ok", "Subscribed to PostgreSQL");
    let with_one = threads();
    let rss_one = rss_kib();
    let mut queues = vec![first];
    for n in 1..TENANTS {
        queues.push(start(n));
    }
    for n in 1..TENANTS {
        inbox.expect_system(n as u64 + 1, 1, "ok", "Subscribed to PostgreSQL");
    }
    let stats = fleet.stats();
    assert_eq!(stats.len(), TENANTS);
    assert!(stats.iter().all(|s| s.state == TenantState::Running), "{:?}", stats.iter().map(|s| s.state).collect::<Vec<_>>());
    // Every tenant streams: a row in each database reaches its subscriber.
    for n in 0..TENANTS {
        psql_db(port, &format!("t{n}"), &format!("insert into public.items values (1, 'row-of-{n}')")).unwrap();
    }
    for n in 0..TENANTS {
        let (targets, payload) = inbox.expect_change(n as u64 + 1);
        assert_eq!(targets, vec![(n as u64 + 1, 1)]);
        assert!(payload.contains(&format!("row-of-{n}\"")), "{payload}");
    }
    let with_all = threads();
    let rss_all = rss_kib();
    eprintln!("threads: {before} before the fleet, {with_one} with 1 tenant, {with_all} with {TENANTS} tenants");
    eprintln!("RSS: {rss_before} KiB before the fleet, {rss_one} KiB with 1 tenant, {rss_all} KiB with {TENANTS} tenants");
    let fleet_threads_max = WORKERS * (1 + BLOCKING_THREADS_PER_WORKER);
    assert!(with_one - before <= fleet_threads_max, "{before} → {with_one}");
    assert!(with_all - before <= fleet_threads_max, "the fleet's threads do not grow with its tenants: {before} → {with_one} (1 tenant) → {with_all} ({TENANTS} tenants)");
    assert!(fleet.stop_all(Duration::from_secs(30)), "every tenant stopped in time");
    assert_eq!(cluster.psql("select count(*) from pg_replication_slots").unwrap(), "0", "every tenant's slot was dropped");
    assert!(queues.iter().all(|q| q.is_disconnected()));
    assert!(threads() <= before, "stop_all ends the worker threads");
}
