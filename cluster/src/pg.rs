//! Postgres Changes across nodes: each tenant database has one *leader* node (the fleet's
//! leader lock, `replication::fleet::FleetCluster`), which runs the replication stream and the
//! changes core for every node's subscribers.
//!
//! - **Shards → router.** In cluster mode a shard's commands for a tenant go to the tenant's
//!   router task on the link thread ([`PgRouter::commands`]). Policy checks and replays go to
//!   this node's own core, as on a single node. Subscriptions are kept in the router's registry
//!   (to re-send them to a new leader) and forwarded to the leader: this node's core when it
//!   leads, else a [`Wire::PgCommand`] on the leader's subject `<cluster>.pgc.<incarnation>`.
//! - **Leader.** Remote subscriptions enter its core with a *virtual* shard id (from
//!   `engine::changes::REMOTE_SHARD_BASE`) per (node, shard); RLS runs there once per claims
//!   group; the core's messages for virtual shards come back to the link (the remote sink),
//!   which packs everything queued for one node into one [`Wire::PgOut`] on
//!   `<cluster>.pgo.<incarnation>`.
//! - **Follower.** It hands the leader's messages to its shards' Postgres inboxes as if its own
//!   core had sent them, so the session code is the same.
//! - **Leader changes.** Heartbeats name the tenants a node leads, and a node that takes or
//!   loses a lead sends a heartbeat at once. A leader that goes away (node gone, lead lost):
//!   every follower's channels get the stream-lost `system` error, then, as soon as a new leader
//!   is known, every subscription is re-sent to it, whose core answers "Subscribed to
//!   PostgreSQL" again; the shared slot makes it resume where the old leader confirmed. A node
//!   that loses its lead unsubscribes every channel from its own core.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use engine::changes::{ChangeDelivery, ChannelKey, Command, PgOut, Subscription, REMOTE_SHARD_BASE};
use engine::client_error::ChangesNotice;
use engine::{ChannelSerial, ConnId, ShardId, TenantId};

use crate::wire::{PgCommand, PgOutItem};

/// Commands from shards waiting for a tenant's router task.
pub const ROUTER_QUEUE_MAX: usize = engine::changes::COMMANDS_MAX;
/// Messages from the cores for other nodes' channels waiting for the link.
pub const REMOTE_QUEUE_MAX: usize = 65_536;

/// Finds (starting on first need) this node's core of a tenant: the binary's fleet.
pub type LocalCore = Arc<dyn Fn(TenantId) -> Option<flume::Sender<Command>> + Send + Sync>;

/// What the link needs for Postgres Changes (cluster mode with tenant databases).
pub struct PgPort {
    /// This node's cores.
    pub local: LocalCore,
    /// The shards' Postgres inboxes (the fleet's), indexed by shard id.
    pub shards: Vec<flume::Sender<PgOut>>,
    /// The cores' messages for other nodes' channels.
    pub remote: flume::Receiver<(ShardId, PgOut)>,
    /// This node's fleet taking (`true`) or losing a tenant's lead.
    pub leadership: flume::Receiver<(TenantId, bool)>,
}

/// The shards' side: one command queue per tenant, served by a router task on the link thread.
#[derive(Clone)]
pub struct PgRouter {
    queues: Arc<Mutex<HashMap<TenantId, flume::Sender<Command>>>>,
    new_tenants: flume::Sender<(TenantId, flume::Receiver<Command>)>,
}

impl std::fmt::Debug for PgRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgRouter")
    }
}

impl PgRouter {
    pub(crate) fn new() -> (PgRouter, flume::Receiver<(TenantId, flume::Receiver<Command>)>) {
        // Unbounded in type, bounded in use: one entry per tenant ever routed.
        let (new_tenants, receiver) = flume::unbounded();
        (PgRouter { queues: Arc::default(), new_tenants }, receiver)
    }

    /// The command queue of `tenant` (bounded: [`ROUTER_QUEUE_MAX`]). Non-blocking.
    pub fn commands(&self, tenant: TenantId) -> flume::Sender<Command> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = queues.get(&tenant) {
            return queue.clone();
        }
        let (sender, receiver) = flume::bounded(ROUTER_QUEUE_MAX);
        let _ = self.new_tenants.send((tenant, receiver));
        queues.insert(tenant, sender.clone());
        sender
    }
}

/// A tenant's routing state on this node.
#[derive(Default)]
struct Tenant {
    /// Who runs the stream: an incarnation (possibly this node's), or nobody known.
    leader: Option<u32>,
    /// This node's subscriptions (to re-send to a new leader).
    subscriptions: BTreeMap<ChannelKey, Subscription>,
}

/// The link thread's Postgres routing state.
pub(crate) struct PgState {
    port: PgPort,
    me: u32,
    tenants: RefCell<HashMap<TenantId, Tenant>>,
    /// Tenants this node leads.
    leading: RefCell<HashSet<TenantId>>,
    /// What the other nodes' heartbeats say they lead: node → tenant (external id) → since when
    /// (the newest claim wins while an old leader's claim lingers until it is declared gone).
    leads: RefCell<HashMap<u32, HashMap<String, std::time::Instant>>>,
    /// Virtual shard ids of other nodes' (incarnation, shard), both ways.
    virtual_ids: RefCell<HashMap<(u32, u16), u16>>,
    virtual_of: RefCell<HashMap<u16, (u32, u16)>>,
    next_virtual: Cell<u16>,
    /// Ids of nodes that went, oldest first: reused only once the fresh range is spent, so a
    /// late answer for a gone node's channel cannot reach a node that just got its id.
    free_virtual: RefCell<std::collections::VecDeque<u16>>,
    /// Other nodes' channels subscribed in this node's cores (unsubscribed when the node goes).
    remote_keys: RefCell<HashMap<u32, HashSet<(TenantId, ChannelKey)>>>,
}

/// What the router asks the link to do on NATS.
pub(crate) enum Outgoing {
    /// Send a command to the leader `to`.
    Command { to: u32, tenant: Arc<str>, command: PgCommand },
}

impl PgState {
    pub(crate) fn new(port: PgPort, me: u32) -> PgState {
        PgState {
            port,
            me,
            tenants: RefCell::default(),
            leading: RefCell::default(),
            leads: RefCell::default(),
            virtual_ids: RefCell::default(),
            virtual_of: RefCell::default(),
            next_virtual: Cell::new(REMOTE_SHARD_BASE),
            free_virtual: RefCell::default(),
            remote_keys: RefCell::default(),
        }
    }

    pub(crate) fn remote(&self) -> &flume::Receiver<(ShardId, PgOut)> {
        &self.port.remote
    }

    pub(crate) fn leadership(&self) -> &flume::Receiver<(TenantId, bool)> {
        &self.port.leadership
    }

    /// Each routed tenant's leader (incarnation), for the status page.
    pub(crate) fn leaders(&self) -> Vec<(TenantId, Option<u32>)> {
        self.tenants.borrow().iter().map(|(t, e)| (*t, e.leader)).collect()
    }

    /// The tenants this node leads (for heartbeats), by id.
    pub(crate) fn leading(&self) -> Vec<TenantId> {
        self.leading.borrow().iter().copied().collect()
    }

    async fn to_local(&self, tenant: TenantId, command: Command) {
        if let Some(core) = (self.port.local)(tenant) {
            let _ = core.send_async(command).await;
        }
    }

    /// A command from one of this node's shards.
    pub(crate) async fn from_shard(&self, tenant: TenantId, external_id: Option<Arc<str>>, command: Command) -> Option<Outgoing> {
        let (key, forward) = match &command {
            Command::Subscribe(subscription) => (subscription.key, Some(subscription.clone())),
            Command::Unsubscribe(key) => (*key, None),
            // Policy checks and replays run on this node, as on a single node.
            Command::Authorize { .. } | Command::Replay { .. } => {
                self.to_local(tenant, command).await;
                return None;
            }
        };
        let leader = {
            let mut tenants = self.tenants.borrow_mut();
            let entry = tenants.entry(tenant).or_default();
            match &forward {
                Some(subscription) => {
                    entry.subscriptions.insert(key, subscription.clone());
                }
                None => {
                    entry.subscriptions.remove(&key);
                }
            }
            entry.leader
        };
        // This node's run competes for the lead while it has subscribers.
        let local = (self.port.local)(tenant);
        match leader {
            Some(leader) if leader == self.me => {
                if let Some(core) = local {
                    let _ = core.send_async(command).await;
                }
                None
            }
            Some(leader) => external_id.zip(wire_command(&command)).map(|(tenant, command)| Outgoing::Command { to: leader, tenant, command }),
            // Kept; sent when a leader is known.
            None => None,
        }
    }

    /// A command from a follower (this node leads the tenant, or did).
    pub(crate) async fn from_node(&self, tenant: TenantId, from: u32, command: PgCommand) {
        let (shard, conn, channel) = match &command {
            PgCommand::Subscribe { shard, conn, channel, .. } | PgCommand::Unsubscribe { shard, conn, channel } => (*shard, *conn, *channel),
        };
        let Some(virtual_shard) = self.virtual_shard(from, shard) else {
            tracing::warn!("cluster link: out of virtual shard ids for other nodes' channels");
            return;
        };
        let key = ChannelKey { shard: ShardId(virtual_shard), conn: ConnId(conn), channel: ChannelSerial(channel) };
        let command = match command {
            // A subscription sent while the sender still thought this node leads: its core no
            // longer streams the tenant, and nothing would ever unsubscribe it here (the
            // sender re-sends its subscriptions to the leader it learns of next).
            PgCommand::Subscribe { .. } if !self.leading.borrow().contains(&tenant) => return,
            PgCommand::Subscribe { role, claims, bindings, .. } => {
                self.remote_keys.borrow_mut().entry(from).or_default().insert((tenant, key));
                Command::Subscribe(Subscription { key, role, claims_json: claims, bindings })
            }
            PgCommand::Unsubscribe { .. } => {
                if let Some(keys) = self.remote_keys.borrow_mut().get_mut(&from) {
                    keys.remove(&(tenant, key));
                }
                Command::Unsubscribe(key)
            }
        };
        self.to_local(tenant, command).await;
    }

    fn virtual_shard(&self, node: u32, shard: u16) -> Option<u16> {
        if let Some(id) = self.virtual_ids.borrow().get(&(node, shard)) {
            return Some(*id);
        }
        let id = self.next_virtual.get();
        let id = if id < u16::MAX {
            self.next_virtual.set(id + 1);
            id
        } else {
            self.free_virtual.borrow_mut().pop_front()?
        };
        self.virtual_ids.borrow_mut().insert((node, shard), id);
        self.virtual_of.borrow_mut().insert(id, (node, shard));
        Some(id)
    }

    /// The cores' messages for other nodes, grouped by node (the link sends one NATS message
    /// per node).
    pub(crate) fn group_remote(&self, batch: Vec<(ShardId, PgOut)>) -> Vec<(u32, Vec<(u16, PgOutItem)>)> {
        let mut by_node: Vec<(u32, Vec<(u16, PgOutItem)>)> = Vec::new();
        let virtual_of = self.virtual_of.borrow();
        for (shard, out) in batch {
            let Some(&(node, remote_shard)) = virtual_of.get(&shard.0) else { continue };
            let item = match out {
                PgOut::System { conn, channel, status, message } => PgOutItem::System { conn: conn.0, channel: channel.0, ok: status == "ok", message },
                PgOut::Change(delivery) => PgOutItem::Change {
                    position: delivery.position,
                    payload_v1: delivery.payload_v1.clone(),
                    payload_v2: delivery.payload_v2.clone(),
                    targets: delivery.targets.iter().map(|(c, s)| (c.0, s.0)).collect(),
                },
                // Policy answers, replays and database broadcasts never go to another node.
                _ => continue,
            };
            match by_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, items)) => items.push((remote_shard, item)),
                None => by_node.push((node, vec![(remote_shard, item)])),
            }
        }
        by_node
    }

    /// The leader's messages for this node's channels: into the shards' Postgres inboxes.
    pub(crate) async fn deliver(&self, items: Vec<(u16, PgOutItem)>) -> u64 {
        let mut dropped = 0;
        for (shard, item) in items {
            let Some(inbox) = self.port.shards.get(usize::from(shard)) else { continue };
            match item {
                PgOutItem::System { conn, channel, ok, message } => {
                    let out = PgOut::System { conn: ConnId(conn), channel: ChannelSerial(channel), status: if ok { "ok" } else { "error" }, message };
                    let _ = inbox.send_async(out).await;
                }
                PgOutItem::Change { position, payload_v1, payload_v2, targets } => {
                    let targets = targets.into_iter().map(|(c, s)| (ConnId(c), ChannelSerial(s))).collect();
                    let out = PgOut::Change(Arc::new(ChangeDelivery { payload_v1, payload_v2, targets, position }));
                    // Best effort, as a local core's changes (PROTOCOL.md §5.9).
                    if inbox.try_send(out).is_err() {
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    /// This node took or lost `tenant`'s lead.
    pub(crate) fn set_leading(&self, tenant: TenantId, leading: bool) {
        if leading {
            self.leading.borrow_mut().insert(tenant);
        } else {
            self.leading.borrow_mut().remove(&tenant);
        }
    }

    /// A node's heartbeat named what it leads; `None`: the node is gone.
    pub(crate) fn set_leads(&self, node: u32, leads: Option<Vec<String>>) {
        match leads {
            Some(leads) => {
                let mut all = self.leads.borrow_mut();
                let entry = all.entry(node).or_default();
                entry.retain(|tenant, _| leads.contains(tenant));
                for tenant in leads {
                    entry.entry(tenant).or_insert_with(std::time::Instant::now);
                }
            }
            None => {
                self.leads.borrow_mut().remove(&node);
            }
        }
    }

    /// A node is gone: its channels leave this node's cores.
    pub(crate) async fn node_gone(&self, node: u32) {
        self.set_leads(node, None);
        let keys = self.remote_keys.borrow_mut().remove(&node).unwrap_or_default();
        for (tenant, key) in keys {
            self.to_local(tenant, Command::Unsubscribe(key)).await;
        }
        // Its virtual shard ids go back to the pool (after the fresh ones).
        let mut ids = self.virtual_ids.borrow_mut();
        let gone: Vec<((u32, u16), u16)> = ids.iter().filter(|((n, _), _)| *n == node).map(|(k, v)| (*k, *v)).collect();
        for (pair, id) in gone {
            ids.remove(&pair);
            self.virtual_of.borrow_mut().remove(&id);
            self.free_virtual.borrow_mut().push_back(id);
        }
    }

    /// Recomputes each routed tenant's leader; for each change, what to do. `external_id`
    /// maps a tenant to its id in heartbeats.
    pub(crate) async fn reconcile(&self, external_id: impl Fn(TenantId) -> Option<Arc<str>>) -> Vec<Outgoing> {
        let mut outgoing = Vec::new();
        let tenants: Vec<TenantId> = self.tenants.borrow().keys().copied().chain(self.leading.borrow().iter().copied()).collect::<HashSet<_>>().into_iter().collect();
        for tenant in tenants {
            let Some(name) = external_id(tenant) else { continue };
            let now = if self.leading.borrow().contains(&tenant) {
                Some(self.me)
            } else {
                let leads = self.leads.borrow();
                leads.iter().filter_map(|(node, tenants)| Some((*tenants.get(&*name)?, *node))).max().map(|(_, node)| node)
            };
            let (before, subscriptions) = {
                let mut tenants = self.tenants.borrow_mut();
                let entry = tenants.entry(tenant).or_default();
                let before = entry.leader;
                entry.leader = now;
                (before, entry.subscriptions.values().cloned().collect::<Vec<_>>())
            };
            if before == now {
                continue;
            }
            tracing::info!(tenant = %name, from = ?before.map(|n| format!("{n:08x}")), to = ?now.map(|n| format!("{n:08x}")), "database stream leader changed");
            if before == Some(self.me) {
                // This node no longer streams: its core lets go of every channel.
                let remote: Vec<(TenantId, ChannelKey)> = self.remote_keys.borrow().values().flatten().filter(|(t, _)| *t == tenant).copied().collect();
                for keys in self.remote_keys.borrow_mut().values_mut() {
                    keys.retain(|(t, _)| *t != tenant);
                }
                for (_, key) in remote {
                    self.to_local(tenant, Command::Unsubscribe(key)).await;
                }
                for subscription in &subscriptions {
                    self.to_local(tenant, Command::Unsubscribe(subscription.key)).await;
                }
            }
            if before.is_some() && before != Some(self.me) {
                // The stream is down for this node's channels until the new leader answers.
                let notice = ChangesNotice::StreamLost { reason: "the node running the database stream went away".into() };
                for subscription in &subscriptions {
                    if let Some(inbox) = self.port.shards.get(subscription.key.shard.index()) {
                        let out = PgOut::System { conn: subscription.key.conn, channel: subscription.key.channel, status: notice.status(), message: notice.text().into_owned() };
                        let _ = inbox.send_async(out).await;
                    }
                }
            }
            match now {
                Some(leader) if leader == self.me => {
                    for subscription in subscriptions {
                        self.to_local(tenant, Command::Subscribe(subscription)).await;
                    }
                }
                Some(leader) => {
                    for subscription in subscriptions {
                        if let Some(command) = wire_command(&Command::Subscribe(subscription)) {
                            outgoing.push(Outgoing::Command { to: leader, tenant: Arc::clone(&name), command });
                        }
                    }
                }
                None => {}
            }
        }
        outgoing
    }
}

/// A subscription change as it travels to the leader (`None` for what never leaves the node).
fn wire_command(command: &Command) -> Option<PgCommand> {
    Some(match command {
        Command::Subscribe(s) => PgCommand::Subscribe {
            shard: s.key.shard.0,
            conn: s.key.conn.0,
            channel: s.key.channel.0,
            role: s.role.clone(),
            claims: s.claims_json.clone(),
            bindings: s.bindings.clone(),
        },
        Command::Unsubscribe(key) => PgCommand::Unsubscribe { shard: key.shard.0, conn: key.conn.0, channel: key.channel.0 },
        Command::Authorize { .. } | Command::Replay { .. } => return None,
    })
}

/// Starts the router task of a tenant's queue on the link thread.
pub(crate) fn spawn_router(shared: Rc<crate::link::Shared>, tenant: TenantId, commands: flume::Receiver<Command>) {
    tokio::task::spawn_local(async move {
        while let Ok(command) = commands.recv_async().await {
            let Some(pg) = &shared.pg else { continue };
            let external_id = shared.external_id(tenant);
            if let Some(outgoing) = pg.from_shard(tenant, external_id, command).await {
                shared.send_pg(outgoing).await;
            }
        }
    });
}
