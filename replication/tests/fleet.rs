//! The fleet of tenants' Postgres sides against a real PostgreSQL 15: two tenants on two
//! databases of one cluster through one `Fleet` with one worker thread — each tenant's rows and
//! `realtime.send()` broadcasts reach only that tenant; a tenant with a wrong password gets the
//! database error while the other works; an idle tenant is stopped (its slot dropped) and
//! starts again on a new handle.

mod common;

use std::time::Duration;

use common::*;
use engine::TenantId;
use powa_replication::fleet::{tenant_slot_name, Fleet, FleetConfig, TenantState};

#[test]
fn two_tenants_stay_apart_and_a_broken_tenant_affects_only_itself() {
    let (cluster, _guard) = powa_replication::cluster::Cluster::throwaway().expect("PostgreSQL 15");
    let port = cluster.port();
    for db in ["tenant_a", "tenant_b"] {
        cluster.psql(&format!("create database {db}")).unwrap();
        psql_db(port, db, "create table public.items (id int primary key, owner text); create publication supabase_realtime for table public.items").unwrap();
    }
    // A role that must give its password (the cluster trusts everyone else on loopback).
    cluster.psql("create role locked login superuser replication password 'right'").unwrap();
    require_password(&cluster, "locked");

    let mut config = FleetConfig::new(2);
    config.workers = 1;
    let (fleet, inboxes) = Fleet::new(config);
    let (a, b, broken) = (TenantId(1), TenantId(2), TenantId(3));
    let url_a = format!("postgres://postgres@127.0.0.1:{port}/tenant_a");
    let url_b = format!("postgres://postgres@127.0.0.1:{port}/tenant_b");
    let url_broken = format!("postgres://locked:wrong@127.0.0.1:{port}/tenant_a");
    let mut inbox = Inbox::new(inboxes);

    let (commands_a, healthy_a) = fleet.handle(a, "acme", &url_a, 3_000_000);
    let (commands_b, healthy_b) = fleet.handle(b, "globex", &url_b, 3_000_000);
    let (commands_broken, healthy_broken) = fleet.handle(broken, "broken", &url_broken, 3_000_000);
    // The same tenant asked again gets the same queue.
    let (again, _) = fleet.handle(a, "acme", &url_a, 3_000_000);
    assert!(again.same_channel(&commands_a));

    // Same channel key shape on every tenant: only the tenant's own core answers it.
    commands_a.send(subscribe(key(0, 1, 1), "items")).unwrap();
    commands_b.send(subscribe(key(1, 2, 1), "items")).unwrap();
    commands_broken.send(subscribe(key(0, 3, 1), "items")).unwrap();
    inbox.expect_system(1, 1, "ok", "Subscribed to PostgreSQL");
    inbox.expect_system(2, 1, "ok", "Subscribed to PostgreSQL");
    inbox.expect_system(3, 1, "error", "Realtime was unable to connect to the project database");
    assert!(healthy_a.load(std::sync::atomic::Ordering::Relaxed));
    assert!(healthy_b.load(std::sync::atomic::Ordering::Relaxed));
    assert!(!healthy_broken.load(std::sync::atomic::Ordering::Relaxed), "the broken tenant is reported unhealthy");

    // A row committed in A reaches only A's subscriber; B's only B's.
    psql_db(port, "tenant_a", "insert into public.items values (1, 'alice-in-a')").unwrap();
    let (targets, payload) = inbox.expect_change(1);
    assert_eq!(targets, vec![(1, 1)]);
    assert!(payload.contains("alice-in-a"), "{payload}");
    psql_db(port, "tenant_b", "insert into public.items values (1, 'bob-in-b')").unwrap();
    let (targets, payload) = inbox.expect_change(2);
    assert_eq!(targets, vec![(2, 1)]);
    assert!(payload.contains("bob-in-b"), "{payload}");

    // realtime.send() in A's database: a broadcast keyed by A's tenant; in B's: by B's.
    psql_db(port, "tenant_a", r#"select realtime.send('{"from":"a"}', 'evt', 'room', false)"#).unwrap();
    let (topic, _) = inbox.expect_publish();
    assert_eq!((topic.tenant, &*topic.sub, topic.private), (a, "room", false));
    psql_db(port, "tenant_b", r#"select realtime.send('{"from":"b"}', 'evt', 'room', true)"#).unwrap();
    let (topic, _) = inbox.expect_publish();
    assert_eq!((topic.tenant, &*topic.sub, topic.private), (b, "room", true));
    inbox.expect_quiet(Duration::from_millis(500));

    // The broken tenant's policy checks fail with the database error; it is not retried at
    // once (a definite error), and its stats say why.
    commands_broken.send(authorize(key(0, 3, 2), "room")).unwrap();
    let error = inbox.expect_authorized(3, 2);
    assert!(error.contains("28P01"), "{error}");
    let stats = fleet.stats();
    assert_eq!(stats.iter().map(|s| (s.tenant, s.external_id.as_str(), s.state)).collect::<Vec<_>>(), vec![(a, "acme", TenantState::Running), (b, "globex", TenantState::Running), (broken, "broken", TenantState::Failed)]);
    assert!(stats[2].error.as_deref().unwrap_or("").contains("password"), "{:?}", stats[2].error);
    assert_eq!(stats[0].core.deliveries.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(stats[0].reader.changes_decoded.load(std::sync::atomic::Ordering::Relaxed) >= 2, "A decoded its row and its broadcast");
    // Connections per running tenant: 1 replication + at most 3 SQL.
    let per_database = cluster.psql("select datname, count(*) from pg_stat_activity where application_name = 'powa-realtime' group by 1 order by 1").unwrap();
    for line in per_database.lines() {
        let (db, count) = line.split_once('|').unwrap();
        assert!(count.parse::<u32>().unwrap() <= 4, "{db}: {count} connections");
    }
    eprintln!("connections per tenant database (datname|count):\n{per_database}");
    assert!(per_database.contains("tenant_a|") && per_database.contains("tenant_b|"), "{per_database}");
    // Each tenant's slot carries its external id.
    let slots = cluster.psql("select slot_name from pg_replication_slots order by 1").unwrap();
    assert_eq!(slots, format!("{}\n{}", tenant_slot_name("powa_realtime", "acme"), tenant_slot_name("powa_realtime", "globex")));

    // A retired tenant stops at once (its slot is dropped); the other keeps working.
    fleet.retire(b);
    wait_until(Duration::from_secs(15), || commands_b.is_disconnected());
    wait_until(Duration::from_secs(15), || cluster.psql("select count(*) from pg_replication_slots").unwrap() == "1");
    psql_db(port, "tenant_a", "insert into public.items values (2, 'still-a')").unwrap();
    let (targets, payload) = inbox.expect_change(1);
    assert_eq!(targets, vec![(1, 1)]);
    assert!(payload.contains("still-a"), "{payload}");

    assert!(fleet.stop_all(Duration::from_secs(20)), "every tenant stopped in time");
    assert_eq!(cluster.psql("select count(*) from pg_replication_slots").unwrap(), "0", "a clean stop drops every slot");
    assert!(commands_a.is_disconnected());
    // Stopped runs leave no connection behind (their LocalSets took their SQL clients along).
    wait_until(Duration::from_secs(10), || cluster.psql("select count(*) from pg_stat_activity where application_name = 'powa-realtime'").unwrap() == "0");
}

#[test]
fn an_idle_tenant_stops_and_starts_again_on_a_new_handle() {
    let (cluster, _guard) = powa_replication::cluster::Cluster::throwaway().expect("PostgreSQL 15");
    cluster.psql("create table public.items (id int primary key, owner text); create publication supabase_realtime for table public.items").unwrap();
    let mut config = FleetConfig::new(1);
    config.workers = 1;
    config.idle_stop = Some(Duration::from_secs(1));
    let (fleet, inboxes) = Fleet::new(config);
    let mut inbox = Inbox::new(inboxes);
    let tenant = TenantId(7);
    let url = cluster.url();

    let (commands, _) = fleet.handle(tenant, "idle-one", &url, 3_000_000);
    commands.send(subscribe(key(0, 1, 1), "items")).unwrap();
    inbox.expect_system(1, 1, "ok", "Subscribed to PostgreSQL");
    // Subscribed: never idle, however long.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!commands.is_disconnected(), "a tenant with a subscription is not idle");
    commands.send(powa_replication::changes::Command::Unsubscribe(key(0, 1, 1))).unwrap();
    // No subscription, no command: stopped, slot dropped, the queue disconnected.
    wait_until(Duration::from_secs(15), || commands.is_disconnected());
    wait_until(Duration::from_secs(15), || cluster.psql("select count(*) from pg_replication_slots").unwrap() == "0");
    assert!(fleet.stats().is_empty());

    // Asked again: a new run on the same database.
    let (commands, _) = fleet.handle(tenant, "idle-one", &url, 3_000_000);
    commands.send(subscribe(key(0, 1, 2), "items")).unwrap();
    inbox.expect_system(1, 2, "ok", "Subscribed to PostgreSQL");
    cluster.psql("insert into public.items values (1, 'after-restart')").unwrap();
    let (targets, payload) = inbox.expect_change(1);
    assert_eq!(targets, vec![(1, 2)]);
    assert!(payload.contains("after-restart"), "{payload}");
    assert!(fleet.stop_all(Duration::from_secs(20)));
}

#[test]
fn beyond_databases_max_a_tenant_gets_the_database_error_and_a_slot_name_is_per_tenant() {
    let (cluster, _guard) = powa_replication::cluster::Cluster::throwaway().expect("PostgreSQL 15");
    cluster.psql("create table public.items (id int primary key, owner text); create publication supabase_realtime for table public.items").unwrap();
    let mut config = FleetConfig::new(1);
    config.workers = 1;
    config.databases_max = 1;
    let (fleet, inboxes) = Fleet::new(config);
    let mut inbox = Inbox::new(inboxes);
    let (first, _) = fleet.handle(TenantId(1), "first", &cluster.url(), 3_000_000);
    let (second, healthy) = fleet.handle(TenantId(2), "second", &cluster.url(), 3_000_000);
    first.send(subscribe(key(0, 1, 1), "items")).unwrap();
    second.send(subscribe(key(0, 2, 1), "items")).unwrap();
    inbox.expect_system(1, 1, "ok", "Subscribed to PostgreSQL");
    inbox.expect_system(2, 1, "error", "Realtime was unable to connect to the project database");
    assert!(!healthy.load(std::sync::atomic::Ordering::Relaxed));
    let stats = fleet.stats();
    assert!(stats[1].error.as_deref().unwrap_or("").contains("databases_max"), "{:?}", stats[1].error);
    assert!(fleet.stop_all(Duration::from_secs(20)));
}

/// The single-tenant server's path: `start::start` is a fleet of one tenant with the slot's name
/// as configured; its runs outlive the `Fleet` handle (the binary keeps only the queues), and
/// `Postgres::stop` drops the slot.
#[test]
fn the_single_tenant_start_keeps_its_slot_name_and_outlives_the_fleet_handle() {
    let (cluster, _guard) = powa_replication::cluster::Cluster::throwaway().expect("PostgreSQL 15");
    cluster.psql("create table public.items (id int primary key, owner text); create publication supabase_realtime for table public.items").unwrap();
    let postgres = powa_replication::start::start(&cluster.url(), 2, 3_000_000, powa_replication::reader::SlotConfig::default()).expect("start");
    let powa_replication::start::Postgres { commands, inboxes, control, fleet, .. } = postgres;
    drop(fleet);
    let mut inbox = Inbox::new(inboxes);
    commands.send(subscribe(key(1, 5, 1), "items")).unwrap();
    inbox.expect_system(5, 1, "ok", "Subscribed to PostgreSQL");
    assert_eq!(cluster.psql("select slot_name from pg_replication_slots").unwrap(), "powa_realtime");
    cluster.psql("insert into public.items values (1, 'single')").unwrap();
    let (targets, payload) = inbox.expect_change(5);
    assert_eq!(targets, vec![(5, 1)]);
    assert!(payload.contains("single"), "{payload}");
    cluster.psql(r#"select realtime.send('{"n":1}', 'evt', 'room', false)"#).unwrap();
    let (topic, _) = inbox.expect_publish();
    assert_eq!(topic.tenant, TenantId::SINGLE);
    powa_replication::start::stop(&control, Duration::from_secs(10));
    assert!(control.stopped.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(cluster.psql("select count(*) from pg_replication_slots").unwrap(), "0");
}

/// A tenant whose database is down at its first need: its commands wait while the start is
/// retried with backoff, it is reported unhealthy, and once the database is up the queued
/// subscription is answered and changes flow.
#[test]
fn an_unreachable_database_is_retried_until_it_is_up() {
    let (mut cluster, _guard) = powa_replication::cluster::Cluster::throwaway().expect("PostgreSQL 15");
    let port = cluster.port();
    cluster.psql("create table public.items (id int primary key, owner text); create publication supabase_realtime for table public.items").unwrap();
    let url = cluster.url();
    let data_dir = cluster.data_dir().to_path_buf();
    cluster.stop();
    let mut config = FleetConfig::new(1);
    config.workers = 1;
    let (fleet, inboxes) = Fleet::new(config);
    let mut inbox = Inbox::new(inboxes);
    let (commands, healthy) = fleet.handle(TenantId(4), "late", &url, 3_000_000);
    commands.send(subscribe(key(0, 1, 1), "items")).unwrap();
    wait_until(Duration::from_secs(10), || !healthy.load(std::sync::atomic::Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(2));
    inbox.expect_quiet(Duration::from_millis(100));
    let stats = fleet.stats();
    assert_eq!(stats[0].state, TenantState::Starting);
    assert!(stats[0].reader.reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 2, "retried");
    let cluster = powa_replication::cluster::Cluster::start(&data_dir, port).expect("start PostgreSQL again");
    inbox.expect_system(1, 1, "ok", "Subscribed to PostgreSQL");
    assert!(healthy.load(std::sync::atomic::Ordering::Relaxed));
    cluster.psql("insert into public.items values (1, 'late-row')").unwrap();
    let (targets, payload) = inbox.expect_change(1);
    assert_eq!(targets, vec![(1, 1)]);
    assert!(payload.contains("late-row"), "{payload}");
    assert!(fleet.stop_all(Duration::from_secs(20)));
}
