//! A shard's view of its tenants: the current configuration of each tenant it has connections
//! for, its share of the tenant-wide rate windows (PROTOCOL.md §9.2) and the tenant's Postgres
//! Changes core.
//!
//! Every connection holds an `Rc<ShardTenant>`; the frames it reads are handled with that
//! tenant's keys and limits, borrowed (no atomics, no lock). Once a second the shard compares
//! the directory's version with the one it last applied; on a change it re-reads each of its
//! tenants and disconnects the sockets of a tenant that was removed or whose keys,
//! `private_only` or `suspend` changed (PROTOCOL.md §1.11), while limit changes simply apply.
//! Every tick (5 s) it publishes its window sums into the tenant's shared counters and reads the
//! others' to decide which limits are triggered.

use std::cell::{Cell, Ref, RefCell};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use engine::rate::{above, HttpWindow, RateWindow};
use tenants::{ShardSlot, Tenant};

use super::DbHandle;
use crate::session::TenantGate;

/// One tenant on one shard.
#[derive(Debug)]
pub(crate) struct ShardTenant {
    shard: usize,
    tenant: RefCell<Arc<Tenant>>,
    /// The tenant was removed from the directory.
    gone: Cell<bool>,
    /// The tenant's core, once a connection of this shard needed it.
    db: RefCell<Option<DbHandle>>,
    events: RefCell<RateWindow>,
    db_events: RefCell<RateWindow>,
    joins: RefCell<RateWindow>,
    presence: RefCell<RateWindow>,
    http: RefCell<HttpWindow>,
    events_total: Cell<u64>,
    joins_total: Cell<u64>,
    limit_hits: Cell<u64>,
    /// This shard's verified tokens of the tenant (cleared whenever its entry changes).
    pub(crate) credentials: crate::session::Credentials,
}

impl ShardTenant {
    pub(crate) fn new(shard: usize, tenant: Arc<Tenant>) -> ShardTenant {
        ShardTenant {
            shard,
            tenant: RefCell::new(tenant),
            gone: Cell::new(false),
            db: RefCell::new(None),
            events: RefCell::new(RateWindow::default()),
            db_events: RefCell::new(RateWindow::default()),
            joins: RefCell::new(RateWindow::default()),
            presence: RefCell::new(RateWindow::default()),
            http: RefCell::new(HttpWindow::default()),
            events_total: Cell::new(0),
            joins_total: Cell::new(0),
            credentials: crate::session::Credentials::default(),
            limit_hits: Cell::new(0),
        }
    }

    /// The tenant's current configuration (borrowed for one call; replaced only by the tick).
    pub(crate) fn get(&self) -> Ref<'_, Arc<Tenant>> {
        self.tenant.borrow()
    }

    fn slot(&self) -> Ref<'_, ShardSlot> {
        Ref::map(self.tenant.borrow(), |t| t.counters.slot(self.shard))
    }

    /// What the tenant allows now, for a session call.
    pub(crate) fn gate(&self) -> TenantGate {
        let tenant = self.tenant.borrow();
        let users_max = tenant.limits.concurrent_users_max;
        TenantGate {
            id: tenant.id,
            gone: self.gone.get(),
            suspended: tenant.suspend,
            private_only: tenant.private_only,
            presence_enabled: tenant.presence_enabled,
            users_full: users_max != 0 && tenant.counters.users() >= u64::from(users_max),
            joins_exceeded: tenant.counters.joins_exceeded.load(Relaxed),
        }
    }

    /// Whether the tenant is at its concurrent-users limit (upgrade row 11).
    pub(crate) fn users_full(&self) -> bool {
        let tenant = self.tenant.borrow();
        let max = tenant.limits.concurrent_users_max;
        max != 0 && tenant.counters.users() >= u64::from(max)
    }

    /// Whether the tenant's joins per second are triggered (upgrade row 12).
    pub(crate) fn joins_exceeded(&self) -> bool {
        self.tenant.borrow().counters.joins_exceeded.load(Relaxed)
    }

    /// Whether the tenant's events per second are triggered (§9.3).
    pub(crate) fn events_exceeded(&self) -> bool {
        self.tenant.borrow().counters.events_exceeded.load(Relaxed)
    }

    /// Whether the tenant's presence events per second are triggered (§4.6).
    pub(crate) fn presence_exceeded(&self) -> bool {
        self.tenant.borrow().counters.presence_exceeded.load(Relaxed)
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.gone.get()
    }

    /// Counts events (§9.1: client broadcasts, deliveries to channels, REST and database
    /// messages).
    pub(crate) fn count_events(&self, n: u64) {
        if n > 0 {
            self.events.borrow_mut().add(n);
            self.events_total.set(self.events_total.get() + n);
        }
    }

    /// Counts Postgres Changes deliveries (§9.1 "database events per second": +1 per matching
    /// subscription, limited by the events-per-second value).
    pub(crate) fn count_db_events(&self, n: u64) {
        if n > 0 {
            self.db_events.borrow_mut().add(n);
        }
    }

    /// Whether the tenant's database events per second are triggered (changes are dropped).
    pub(crate) fn db_events_exceeded(&self) -> bool {
        self.tenant.borrow().counters.db_events_exceeded.load(Relaxed)
    }

    /// Counts one REST broadcast request (PROTOCOL.md §8.1's HTTP rate, 1 s ticks).
    pub(crate) fn count_http(&self) {
        self.http.borrow_mut().add(1);
    }

    /// The tenant's REST rate as of the last second: (rolling average per second, limit); the
    /// limit is the tenant's events per second (0 = unlimited).
    pub(crate) fn http_rate(&self) -> (u64, u32) {
        let tenant = self.tenant.borrow();
        (tenant.counters.http_rolling.load(Relaxed), tenant.limits.events_per_second_max)
    }

    /// Every second: publish this shard's REST request window and compute the tenant-wide
    /// rolling average.
    pub(crate) fn tick_http(&self) {
        let tenant = self.tenant.borrow();
        let counters = &tenant.counters;
        let mut window = self.http.borrow_mut();
        let seconds = window.seconds();
        counters.slot(self.shard).http_window.store(window.sum(), Relaxed);
        counters.http_rolling.store(counters.sum(|s| &s.http_window) / seconds.max(1), Relaxed);
        window.tick();
    }

    /// Counts joins that passed the private-only and users checks.
    pub(crate) fn count_joins(&self, n: u64) {
        if n > 0 {
            self.joins.borrow_mut().add(n);
            self.joins_total.set(self.joins_total.get() + n);
        }
    }

    /// Counts presence events (tracks, delivered diffs).
    pub(crate) fn count_presence(&self, n: u64) {
        if n > 0 {
            self.presence.borrow_mut().add(n);
        }
    }

    /// Counts a refusal or shutdown caused by a tenant limit.
    pub(crate) fn count_limit_hit(&self) {
        self.limit_hits.set(self.limit_hits.get() + 1);
    }

    /// A connection of this tenant opened (+1) or closed (-1) on this shard.
    pub(crate) fn add_connection(&self, opened: bool) {
        let slot = self.slot();
        if opened {
            slot.connections.fetch_add(1, Relaxed);
        } else {
            slot.connections.fetch_sub(1, Relaxed);
        }
    }

    /// A connection became a user (its first channel) or stopped being one.
    pub(crate) fn add_user(&self, added: bool) {
        let slot = self.slot();
        if added {
            slot.users.fetch_add(1, Relaxed);
        } else {
            slot.users.fetch_sub(1, Relaxed);
        }
    }

    /// Every rate tick: publish this shard's window sums, decide from every shard's whether the
    /// tenant's limits are triggered, and roll the windows.
    pub(crate) fn tick(&self) {
        let tenant = self.tenant.borrow();
        let counters = &tenant.counters;
        let slot = counters.slot(self.shard);
        let limits = &tenant.limits;
        let decide = |window: &RefCell<RateWindow>, field: fn(&ShardSlot) -> &std::sync::atomic::AtomicU64, limit: u32, flag: &std::sync::atomic::AtomicBool| {
            let mut window = window.borrow_mut();
            let seconds = window.seconds();
            field(slot).store(window.sum(), Relaxed);
            let total = counters.sum(field);
            flag.store(above_or_at(total, seconds, limit), Relaxed);
            window.tick();
        };
        decide(&self.events, |s| &s.events_window, limits.events_per_second_max, &counters.events_exceeded);
        decide(&self.joins, |s| &s.joins_window, limits.joins_per_second_max, &counters.joins_exceeded);
        decide(&self.db_events, |s| &s.db_events_window, limits.events_per_second_max, &counters.db_events_exceeded);
        // Presence: "average > limit at use time" (§9.2).
        let mut presence = self.presence.borrow_mut();
        let seconds = presence.seconds();
        slot.presence_window.store(presence.sum(), Relaxed);
        counters.presence_exceeded.store(above(counters.sum(|s| &s.presence_window), seconds, limits.presence_events_per_second_max), Relaxed);
        presence.tick();
    }

    /// Every second: publish the totals for `/metrics`.
    pub(crate) fn publish_totals(&self) {
        let slot = self.slot();
        slot.events_total.store(self.events_total.get(), Relaxed);
        slot.joins_total.store(self.joins_total.get(), Relaxed);
        slot.limit_hits_total.store(self.limit_hits.get(), Relaxed);
    }

    /// Takes the directory's current entry for this tenant; returns whether its sockets must
    /// be disconnected (removed, or a disconnecting field changed).
    pub(crate) fn refresh(&self, current: Option<&Arc<Tenant>>) -> bool {
        match current {
            None => {
                let was = self.gone.replace(true);
                *self.db.borrow_mut() = None;
                self.credentials.clear();
                !was
            }
            Some(new) => {
                let mut tenant = self.tenant.borrow_mut();
                let disconnect = new.epoch != tenant.epoch || self.gone.get();
                if new.database_url != tenant.database_url {
                    *self.db.borrow_mut() = None;
                }
                if !Arc::ptr_eq(new, &tenant) {
                    // Keys may have changed: nothing verified under the old entry is reused.
                    self.credentials.clear();
                }
                *tenant = Arc::clone(new);
                self.gone.set(false);
                disconnect
            }
        }
    }

    /// The tenant's core: cached; asked again when it stopped (the sender reports
    /// disconnected) or was never asked. `None` without a database, and for a tenant removed
    /// from the directory: its closing sockets' unsubscribes must not start its stream again.
    pub(crate) fn db(&self, link: &super::PgLink) -> Option<DbHandle> {
        if self.gone.get() {
            return None;
        }
        if let Some(handle) = self.db.borrow().as_ref() {
            if !handle.commands.is_disconnected() {
                return Some(handle.clone());
            }
        }
        let tenant = self.tenant.borrow();
        let url = tenant.database_url.as_deref()?;
        let handle = link.databases.handle(tenant.id, url);
        *self.db.borrow_mut() = Some(handle.clone());
        Some(handle)
    }
}

/// §9.2: a limit is triggered at the tick where the average is at least the limit
/// (0 = unlimited).
fn above_or_at(sum: u64, seconds: u64, limit: u32) -> bool {
    limit != 0 && sum >= u64::from(limit) * seconds.max(1)
}

/// Most tenants `/metrics` names; the rest are summed under `tenant="other"` (bounded
/// cardinality whatever the number of tenants).
pub(crate) const METRICS_TENANTS_MAX: usize = 100;
/// Most tenants `/api/status` lists.
const STATUS_TENANTS_MAX: usize = 20;

/// Tenants by open connections, busiest first (ties by external id).
fn busiest(directory: &tenants::Directory) -> Vec<(&Arc<Tenant>, u64)> {
    let mut all: Vec<(&Arc<Tenant>, u64)> = directory.tenants().into_iter().map(|t| (t, t.counters.connections())).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.external_id.cmp(&b.0.external_id)));
    all
}

/// The per-tenant series of `/metrics` (multi-tenant mode): the [`METRICS_TENANTS_MAX`]
/// tenants with the most connections by name, every other tenant summed as `other`.
pub(crate) fn render_metrics(directory: &tenants::Directory, out: &mut String) {
    use std::fmt::Write as _;
    if !directory.multi_tenant() {
        return;
    }
    super::metrics::series(out, "realtime_tenants", "gauge", "Tenants configured", directory.len());
    type Field = fn(&ShardSlot) -> &std::sync::atomic::AtomicU64;
    let families: [(&str, &str, &str, Field); 5] = [
        ("realtime_tenant_connections", "gauge", "Open WebSocket connections per tenant", |s| &s.connections),
        ("realtime_tenant_users", "gauge", "Connections with a joined channel per tenant (the concurrent-users limit)", |s| &s.users),
        ("realtime_tenant_joins_total", "counter", "Joins counted toward the joins-per-second limit, per tenant (published each second)", |s| &s.joins_total),
        ("realtime_tenant_events_total", "counter", "Events counted toward the events-per-second limit, per tenant (published each second)", |s| &s.events_total),
        ("realtime_tenant_limit_hits_total", "counter", "Refusals and channel shutdowns caused by a tenant limit (published each second)", |s| &s.limit_hits_total),
    ];
    let ranked = busiest(directory);
    for (name, kind, help, field) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        let mut other = 0u64;
        for (i, (tenant, _)) in ranked.iter().enumerate() {
            let value = tenant.counters.local_sum(field);
            if i < METRICS_TENANTS_MAX {
                let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {value}", tenant.external_id);
            } else {
                other += value;
            }
        }
        if ranked.len() > METRICS_TENANTS_MAX {
            let _ = writeln!(out, "{name}{{tenant=\"other\"}} {other}");
        }
    }
}

/// The `tenants` section of `GET /api/status` (multi-tenant mode): how many, the busiest, and
/// the last Hosts that named no tenant (the classic self-host failure: a proxy rewriting Host).
pub(crate) fn status_json(directory: &tenants::Directory, registry: &tenants::Registry) -> serde_json::Value {
    let busiest: Vec<serde_json::Value> = busiest(directory)
        .into_iter()
        .take(STATUS_TENANTS_MAX)
        .map(|(t, connections)| serde_json::json!({"external_id": &*t.external_id, "connections": connections, "users": t.counters.users(), "suspended": t.suspend}))
        .collect();
    let unknown: Vec<serde_json::Value> = registry
        .unknown_hosts()
        .into_iter()
        .map(|u| serde_json::json!({"host": u.host, "derived_tenant": u.derived, "count": u.count, "last_seen": u.last_seen}))
        .collect();
    serde_json::json!({"count": directory.len(), "busiest": busiest, "unknown_hosts": unknown})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(events: u32) -> Arc<Tenant> {
        let config = tenants::TenantConfig { external_id: "a".into(), jwt_secret: Some("s".into()), max_events_per_second: Some(events), max_joins_per_second: Some(1), ..Default::default() };
        let registry = tenants::Registry::multi(vec![config], tenants::ProcessLimits::of(&engine::Limits::default()), 2).unwrap();
        Arc::clone(registry.load().by_external_id("a").unwrap())
    }

    #[test]
    fn limits_trigger_on_the_tenant_wide_sum_at_the_tick() {
        let tenant = tenant(10);
        let (a, b) = (ShardTenant::new(0, Arc::clone(&tenant)), ShardTenant::new(1, Arc::clone(&tenant)));
        // 10/s over the first 5 s window = 50 events, split over two shards.
        a.count_events(25);
        assert!(!a.events_exceeded(), "nothing is decided mid-tick");
        b.count_events(25);
        b.tick();
        a.tick();
        assert!(a.events_exceeded(), "a sees both shards' shares");
        // The next tick: b's published share is still 25, a's new window is 0 → 25/10 s.
        a.tick();
        assert!(!a.events_exceeded());
        a.count_joins(4);
        a.tick();
        assert!(!a.joins_exceeded(), "4 joins over 20 s");
        a.count_joins(20);
        a.tick();
        assert!(a.joins_exceeded());
    }

    #[test]
    fn users_are_counted_tenant_wide() {
        let config = tenants::TenantConfig { external_id: "a".into(), jwt_secret: Some("s".into()), max_concurrent_users: Some(2), ..Default::default() };
        let registry = tenants::Registry::multi(vec![config], tenants::ProcessLimits::of(&engine::Limits::default()), 2).unwrap();
        let tenant = Arc::clone(registry.load().by_external_id("a").unwrap());
        let (a, b) = (ShardTenant::new(0, Arc::clone(&tenant)), ShardTenant::new(1, tenant));
        a.add_user(true);
        assert!(!b.users_full());
        b.add_user(true);
        assert!(a.users_full() && b.gate().users_full);
        a.add_user(false);
        assert!(!b.users_full());
    }
}
