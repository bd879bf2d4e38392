//! One connection's protocol state: its joined channels and what each inbound frame does.
//!
//! Sans-IO: the driver feeds decoded WebSocket messages (and join acknowledgements from topic
//! owners) with the current time, and carries out the returned [`Effects`]: frames to write,
//! join errors to write after the join error delay, messages for other shards, and a close.
//! No socket, timer or clock appears here, so the whole protocol is tested without IO.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use auth::{AuthError, Claims, KeyStore};
use engine::broadcast::PayloadEncoding;
use engine::client_error::{CloseReason, JoinError, ReplyError, SystemMessage};
use engine::topic::{sub_topic, PREFIX};
use engine::limits::{PRESENCE_CALLS_PER_WINDOW_MAX, PRESENCE_WINDOW, TOPIC_BYTES_MAX};
use engine::shard::PresenceSnapshot;
use engine::{Broadcast, BroadcastBody, ChannelSerial, ConnId, Format, Limits, LocalSub, Origin, ShardId, ShardMsg, ShardState, Subscriber, TopicKey};

use engine::changes::{ChannelKey, Command as PgCommand, Subscription};

use crate::frame::{self, Event, Ref, TextFrame, UserBroadcastFrame};
use crate::join::{parse_join, ChannelToken, JoinRequest};
use crate::presence::{self, PresenceRequest};

pub use credentials::{Credential, Credentials};
use topic_map::TopicMap;

/// The topic heartbeats go to.
const PHOENIX_TOPIC: &str = "phoenix";

/// Most messages one replay returns (PROTOCOL.md §3.6).
const REPLAY_LIMIT_MAX: i64 = 25;
/// The largest `since` that is a valid timestamp (year 9999), in ms.
const REPLAY_SINCE_MAX_MS: i64 = 253_402_300_799_999;

/// Upstream's allowance over the payload limit (PROTOCOL.md §3.5, MAY keep): the limit is
/// compared with the whole Phoenix payload, envelope keys included.
const PAYLOAD_ALLOWANCE_BYTES: usize = 500;

/// What the driver must do after a call into the session.
#[derive(Debug, Default)]
pub struct Effects {
    /// Frames to write now, in order.
    pub frames: Vec<Bytes>,
    /// Frames to write after the join error delay (join error replies, PROTOCOL.md §2.4).
    pub delayed: Vec<Bytes>,
    /// Messages for topic owners and other shards.
    pub shard: Vec<(ShardId, ShardMsg)>,
    /// Close the connection after writing `frames`.
    pub close: Option<CloseReason>,
    /// Broadcasts accepted from this client (for metrics).
    pub published: u64,
    /// Frames dropped as malformed (for metrics).
    pub malformed: u64,
    /// Commands for the Postgres Changes core.
    pub pg: Vec<PgCommand>,
    /// Presence tracks accepted (tenant presence events, §4.6).
    pub presence_events: u64,
    /// Channels that became joined / left after being joined (for metrics).
    pub joined: u64,
    /// See `joined`.
    pub left: u64,
    /// The code of each refused join (the reason's prefix, e.g. `ChannelRateLimitReached`).
    pub join_errors: Vec<Box<str>>,
    /// Joins that passed the private-only and concurrent-users checks (the tenant's joins per
    /// second count these, even when they fail later: PROTOCOL.md §9.1).
    pub joins_counted: u64,
    /// Unknown client events on joined channels (tenant events, §9.1).
    pub unknown_events: u64,
    /// Close the connection after the delayed frames (`TenantNotFound`,
    /// `ClientJoinRateLimitReached`: the socket closes with 1001 after the join error reply).
    pub close_after_delayed: Option<CloseReason>,
}

/// What the connection's tenant allows right now (PROTOCOL.md §2.4 steps 3–7).
#[derive(Debug, Clone, Copy, Default)]
pub struct TenantGate {
    /// The tenant the connection belongs to.
    pub id: engine::TenantId,
    /// The tenant was removed since the socket connected.
    pub gone: bool,
    /// The tenant is suspended.
    pub suspended: bool,
    /// Only private channels may be joined.
    pub private_only: bool,
    /// Every channel gets presence.
    pub presence_enabled: bool,
    /// The tenant is at its concurrent-users limit (a socket without channels may not join).
    pub users_full: bool,
    /// The tenant's joins per second are above the limit (as of the last tick).
    pub joins_exceeded: bool,
}

/// Shared, read-only context of a call.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Limits.
    pub limits: &'a Limits,
    /// Key material.
    pub keys: &'a KeyStore,
    /// Whether a project database is configured (and connected).
    pub database: bool,
    /// Current Unix time, seconds.
    pub now_secs: i64,
    /// Current Unix time, milliseconds (presence rate windows, generated presence keys).
    pub now_ms: i64,
    /// The tenant's presence events per second are above their limit (§4.6).
    pub presence_rate_exceeded: bool,
    /// The tenant's state.
    pub tenant: TenantGate,
    /// This shard's verified tokens of the tenant (shared by its connections and channels).
    pub credentials: &'a Credentials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelState {
    /// A private channel waiting for its read check (PROTOCOL.md §6.5).
    Authorizing,
    /// Waiting for the topic owner's acknowledgement; the ok reply goes out when it comes.
    Joining,
    Joined,
}

#[derive(Debug)]
struct Channel {
    serial: ChannelSerial,
    /// The join frame's `join_ref` (raw JSON), echoed in pushes and `phx_close`.
    join_ref: RawRef,
    /// The join frame's `ref` (raw JSON), for the delayed ok reply.
    join_reply_ref: RawRef,
    key: TopicKey,
    state: ChannelState,
    broadcast_ack: bool,
    /// Whether the channel receives `presence_state` (PROTOCOL.md §4.1).
    presence_enabled: bool,
    /// Presence key: `config.presence.key`, or a UUID generated at the first track (`None`
    /// until then: most channels never track, and the key would be kept for nothing).
    presence_key: Option<Arc<str>>,
    /// Presence frames counted in the current window, and when the window opened (ms).
    presence_calls: u32,
    presence_window_start_ms: i64,
    /// The position of the last Postgres change delivered (cluster mode: a new leader resumes
    /// from the shared slot and may send again what the old one had sent).
    last_change: (u64, u32),
    /// `config.private`.
    private: bool,
    /// `config.broadcast.self`.
    broadcast_self: bool,
    /// Read permissions (always true on public channels).
    broadcast_read: bool,
    presence_read: bool,
    /// Write permissions of a private channel, checked at the first send/track.
    write: private::WriteState,
    /// Replay request (since ms, limit 1..=25), and the replayed frames waiting for the ok reply.
    replay: Option<(i64, i64)>,
    replay_frames: Vec<Bytes>,
    /// Ids of the rows replayed to this channel (at most 25): not delivered again live.
    replayed_ids: Vec<Box<str>>,
    /// Postgres Changes bindings as sent (subscribed after the ok reply), and the ok reply's
    /// `response` JSON echoing them with their ids.
    pg_bindings: Vec<serde_json::Map<String, serde_json::Value>>,
    join_response: Bytes,
    /// While `Authorizing`: when the join gives up waiting for the database (Unix seconds,
    /// [`engine::limits::AUTHORIZE_TIMEOUT_SECS`] after the join); `i64::MAX` otherwise.
    authorize_deadline_secs: i64,
    /// The channel token and its claims (drive private-channel and RLS checks later), shared
    /// with every holder of the same token on this shard (`credentials.rs`).
    cred: Rc<Credential>,
    /// A close decided while the join was still unanswered (a bad token refresh, a presence
    /// limit): sent right after the ok reply, as upstream (whose joins finish before the next
    /// frame is handled) would; dropped if the join fails.
    close_after_join: Option<SystemMessage>,
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    format: Format,
    shard: ShardId,
    conn: ConnId,
    /// The connection token (cleaned, verified at the upgrade), the fallback channel token.
    conn_cred: Rc<Credential>,
    /// Joined channels by topic as the client spelled it (`topic_map.rs`: one inline entry, no
    /// table). Boxed: a `Channel` is a few hundred bytes and the map moves entries.
    channels: TopicMap<Box<Channel>>,
    next_serial: u32,
    /// Generated presence keys made by this session (uniqueness within one millisecond).
    presence_keys_made: u32,
}

/// A ref kept by a channel, as raw JSON text: inline up to 16 bytes (refs are short counters;
/// an idle channel keeps no allocation for them).
type RawRef = smallvec::SmallVec<[u8; 16]>;

fn raw(r: Ref<'_>) -> RawRef {
    match r {
        Ref::Json(text) => RawRef::from_slice(text.as_bytes()),
        text => RawRef::from_vec(text.to_json().to_vec()),
    }
}

fn as_ref(bytes: &[u8]) -> Ref<'_> {
    Ref::Json(std::str::from_utf8(bytes).expect("stored refs are JSON text"))
}

impl Session {
    /// A new session for a connection that passed the upgrade with `conn_cred`.
    pub fn new(format: Format, shard: ShardId, conn: ConnId, conn_cred: Rc<Credential>) -> Session {
        Session { format, shard, conn, conn_cred, channels: TopicMap::default(), next_serial: 1, presence_keys_made: 0 }
    }

    /// The connection's wire format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Number of channels (joined or joining).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Handles a text message. Malformed frames are dropped (PROTOCOL.md §1.10).
    pub fn on_text(&mut self, state: &mut ShardState, ctx: Context<'_>, bytes: &[u8], fx: &mut Effects) {
        let Ok(frame) = frame::decode_text(self.format, bytes) else {
            fx.malformed += 1;
            tracing::debug!(conn = self.conn.0, "MalformedWebSocketMessage");
            return;
        };
        self.on_frame(state, ctx, frame, fx);
    }

    /// Handles a binary message (V2 only; V1 connections drop binary messages).
    pub fn on_binary(&mut self, state: &mut ShardState, ctx: Context<'_>, bytes: &[u8], fx: &mut Effects) {
        if self.format != Format::V2 {
            return;
        }
        match frame::decode_binary(bytes) {
            Ok(push) => self.on_user_broadcast(state, ctx, push, fx),
            Err(error) => {
                fx.malformed += 1;
                tracing::debug!(conn = self.conn.0, %error, "MalformedWebSocketMessage");
            }
        }
    }

    fn on_frame(&mut self, state: &mut ShardState, ctx: Context<'_>, frame: TextFrame<'_>, fx: &mut Effects) {
        let topic: &str = &frame.topic;
        if topic == PHOENIX_TOPIC {
            if frame.event == Event::Heartbeat {
                fx.frames.push(frame::encode_reply(self.format, frame.join_ref, frame.ref_, topic, "ok", b"{}"));
            }
            return;
        }
        if frame.event == Event::Join {
            self.join(state, ctx, &frame, fx);
            return;
        }
        let Some(channel) = self.channels.get(topic) else {
            let reply = match frame.event {
                Event::Leave => frame::encode_reply(self.format, frame.join_ref, frame.ref_, topic, "ok", b"{}"),
                _ => frame::encode_error_reason(self.format, Ref::NULL, frame.ref_, topic, ReplyError::UnmatchedTopic.text()),
            };
            fx.frames.push(reply);
            return;
        };
        let join_ref = channel.join_ref.clone();
        match frame.event {
            Event::Leave => {
                self.leave(state, topic, fx);
                fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), frame.ref_, topic, "ok", b"{}"));
                fx.frames.push(frame::encode_close(self.format, as_ref(&join_ref), topic, "phx_close"));
            }
            Event::Broadcast => {
                let payload = Bytes::copy_from_slice(frame.payload.get().as_bytes());
                self.publish(state, ctx, topic, frame.ref_, BroadcastBody::Json { payload }, fx);
            }
            Event::Presence => {
                let request = presence::parse_presence(frame.payload.get());
                self.presence(state, ctx, topic, frame.ref_, request, fx);
            }
            Event::PresenceDiff => {
                if let Some(request) = presence::parse_docs_presence(frame.payload.get()) {
                    self.presence(state, ctx, topic, frame.ref_, request, fx);
                }
            }
            Event::AccessToken => self.access_token(state, ctx, topic, frame.payload.get(), fx),
            // Unknown events are ignored without a reply (PROTOCOL.md §1.10).
            // Each counts as one of the tenant's events (PROTOCOL.md §9.1).
            Event::Other(_) => fx.unknown_events += 1,
            Event::Heartbeat | Event::Join => {}
        }
    }

    fn on_user_broadcast(&mut self, state: &mut ShardState, ctx: Context<'_>, push: UserBroadcastFrame<'_>, fx: &mut Effects) {
        if !self.channels.contains_key(push.topic) {
            let reply = frame::encode_error_reason(self.format, Ref::NULL, Ref::Text(push.ref_), push.topic, ReplyError::UnmatchedTopic.text());
            fx.frames.push(reply);
            return;
        }
        let body = BroadcastBody::User {
            event: Bytes::copy_from_slice(push.event.as_bytes()),
            encoding: push.encoding,
            payload: Bytes::copy_from_slice(push.payload),
            metadata: Bytes::new(),
        };
        if push.encoding == PayloadEncoding::Json && serde_json::from_slice::<serde::de::IgnoredAny>(push.payload).is_err() {
            tracing::debug!(conn = self.conn.0, "binary broadcast with invalid JSON payload dropped");
            return;
        }
        self.publish(state, ctx, push.topic, Ref::Text(push.ref_), body, fx);
    }

    fn publish(&mut self, state: &mut ShardState, ctx: Context<'_>, topic: &str, ref_: Ref<'_>, body: BroadcastBody, fx: &mut Effects) {
        if self.channels[topic].private {
            match self.write_permission(topic, private::PendingWrite::Broadcast { ref_: raw(ref_), body: body.clone() }, fx) {
                Some(true) => {}
                // Denied: dropped silently, no reply even with `ack` (PROTOCOL.md §3.2).
                Some(false) => return,
                // Queued until the write check answers.
                None => return,
            }
        }
        self.publish_checked(state, ctx, topic, ref_, body, fx);
    }

    /// Publishes a broadcast whose write permission is settled.
    fn publish_checked(&mut self, state: &mut ShardState, ctx: Context<'_>, topic: &str, ref_: Ref<'_>, body: BroadcastBody, fx: &mut Effects) {
        let channel = &self.channels[topic];
        let message = Broadcast {
            origin: Some(Origin { shard: self.shard, conn: self.conn, channel: channel.serial, read_at_micros: 0 }),
            body,
        };
        let too_big = message.payload_len() > ctx.limits.payload_bytes_max + PAYLOAD_ALLOWANCE_BYTES;
        if channel.broadcast_ack {
            let join_ref = as_ref(&channel.join_ref);
            let reply = if too_big {
                let response = serde_json::to_vec(ReplyError::PayloadSizeExceeded.text()).expect("string");
                frame::encode_reply(self.format, join_ref, ref_, topic, "error", &response)
            } else {
                frame::encode_reply(self.format, join_ref, ref_, topic, "ok", b"{}")
            };
            fx.frames.push(reply);
        }
        if too_big {
            return;
        }
        let key = channel.key.clone();
        fx.published += 1;
        fx.shard.push((state.owner(&key), ShardMsg::Publish { topic: key, message: Arc::new(message) }));
    }

    fn join(&mut self, state: &mut ShardState, ctx: Context<'_>, frame: &TextFrame<'_>, fx: &mut Effects) {
        let topic: &str = &frame.topic;
        // Duplicate join: close the existing channel first (PROTOCOL.md §1.9).
        if let Some(old) = self.channels.get(topic) {
            let old_ref = old.join_ref.clone();
            self.leave(state, topic, fx);
            fx.frames.push(frame::encode_close(self.format, as_ref(&old_ref), topic, "phx_close"));
        }
        match self.check_join(ctx, frame, fx) {
            Ok((request, cred)) => {
                let serial = self.fresh_serial();
                let key = TopicKey::new(ctx.tenant.id, topic, request.private);
                let join_response = join_response(&request.postgres_changes);
                let presence_key: Option<Arc<str>> = request.presence_key.as_deref().map(Arc::from);
                self.channels.insert(
                    topic.into(),
                    Box::new(Channel {
                        serial,
                        join_ref: raw(frame.join_ref),
                        join_reply_ref: raw(frame.ref_),
                        key,
                        state: if request.private { ChannelState::Authorizing } else { ChannelState::Joining },
                        private: request.private,
                        broadcast_self: request.broadcast_self,
                        broadcast_read: !request.private,
                        presence_read: !request.private,
                        write: private::WriteState::Unknown,
                        replay: request.replay.as_ref().and_then(|r| Some((r.since?, r.limit.unwrap_or(REPLAY_LIMIT_MAX).clamp(1, REPLAY_LIMIT_MAX)))),
                        replay_frames: Vec::new(),
                        replayed_ids: Vec::new(),
                        broadcast_ack: request.broadcast_ack,
                        presence_enabled: request.presence_enabled || ctx.tenant.presence_enabled,
                        presence_key,
                        presence_calls: 0,
                        presence_window_start_ms: 0,
                        last_change: (0, 0),
                        pg_bindings: request.postgres_changes,
                        join_response,
                        authorize_deadline_secs: if request.private { ctx.now_secs.saturating_add(engine::limits::AUTHORIZE_TIMEOUT_SECS) } else { i64::MAX },
                        cred,
                        close_after_join: None,
                    }),
                );
                let channel = &self.channels[topic];
                if channel.private {
                    fx.pg.push(self.authorize(channel, engine::changes::CheckKind::Read));
                } else {
                    fx.shard.push(self.subscribe_local(state, topic));
                }
            }
            Err(error) => {
                let reason = error.reason();
                tracing::debug!(conn = self.conn.0, topic, %reason, "join refused");
                if matches!(error, JoinError::TenantNotFound | JoinError::ClientJoinRateLimitReached) {
                    fx.close_after_delayed = Some(CloseReason::GoingAway);
                }
                fx.join_errors.push(join_error_code(&reason));
                fx.delayed.push(frame::encode_error_reason(self.format, frame.join_ref, frame.ref_, topic, &reason));
            }
        }
    }

    /// Registers a channel with its topic's owner (the join reply follows the owner's ack).
    fn subscribe_local(&self, state: &mut ShardState, topic: &str) -> (ShardId, ShardMsg) {
        let channel = &self.channels[topic];
        let local = LocalSub {
            conn: self.conn,
            channel: channel.serial,
            format: self.format,
            prefixed: topic.starts_with(PREFIX),
            receive_own: channel.broadcast_self,
            receive_broadcasts: channel.broadcast_read,
            receive_presence: channel.presence_read,
        };
        state.local_join(channel.key.clone(), local, channel.presence_enabled && channel.presence_read)
    }

    /// PROTOCOL.md §2.4, the steps that apply without a database.
    fn check_join(&self, ctx: Context<'_>, frame: &TextFrame<'_>, fx: &mut Effects) -> Result<(JoinRequest, Rc<Credential>), JoinError> {
        let topic: &str = &frame.topic;
        if topic.is_empty() {
            return Err(JoinError::Unknown);
        }
        if sub_topic(topic).is_empty() {
            return Err(JoinError::TopicNameRequired);
        }
        if topic.len() > TOPIC_BYTES_MAX {
            return Err(JoinError::TopicNameTooLong);
        }
        let request = parse_join(frame.payload).map_err(|_| JoinError::Unknown)?;
        // The tenant's gates, in upstream's order (§2.4 steps 3, 5, 6, 7; a suspension since
        // the socket connected answers as step 10 would).
        if ctx.tenant.gone {
            return Err(JoinError::TenantNotFound);
        }
        if ctx.tenant.suspended {
            return Err(JoinError::RealtimeDisabledForTenant);
        }
        if ctx.tenant.private_only && !request.private {
            return Err(JoinError::PrivateOnly);
        }
        if ctx.tenant.users_full && self.channels.is_empty() {
            return Err(JoinError::ConnectionRateLimitReached);
        }
        fx.joins_counted += 1;
        if ctx.tenant.joins_exceeded {
            return Err(JoinError::ClientJoinRateLimitReached);
        }
        if self.channels.len() >= ctx.limits.channels_per_client_max as usize {
            return Err(JoinError::ChannelRateLimitReached);
        }
        if request.postgres_changes.len() > engine::limits::BINDINGS_PER_JOIN_MAX {
            return Err(JoinError::TooManyBindings { max: engine::limits::BINDINGS_PER_JOIN_MAX });
        }
        let cred = match &request.token {
            // Verified at the upgrade; only its expiry can have changed since.
            ChannelToken::Connection if self.conn_cred.unexpired(ctx.now_secs) => Ok(Rc::clone(&self.conn_cred)),
            ChannelToken::Connection => ctx.credentials.verify(ctx.keys, &self.conn_cred.token, ctx.now_secs),
            ChannelToken::Given(token) => ctx.credentials.verify(ctx.keys, &auth::clean_token(token), ctx.now_secs),
        }
        .map_err(join_error)?;
        if request.replay.is_some() && !request.private {
            return Err(JoinError::ReplayPublic);
        }
        let needs_database = request.private || !request.postgres_changes.is_empty() || request.replay.is_some();
        if needs_database && !ctx.database {
            return Err(JoinError::UnableToConnectToProject);
        }
        if let Some(replay) = &request.replay {
            let since_ok = replay.since.is_some_and(|since| (0..=REPLAY_SINCE_MAX_MS).contains(&since));
            if !replay.valid || !since_ok {
                return Err(JoinError::ReplayInvalid);
            }
        }
        Ok((request, cred))
    }

    /// The topic owner registered a join: send the ok reply. Stale acks (the channel left or
    /// re-joined meanwhile) are ignored.
    pub fn on_join_ack(&mut self, state: &mut ShardState, key: &TopicKey, serial: ChannelSerial, presence: Option<PresenceSnapshot>, presence_rate_exceeded: bool, fx: &mut Effects) {
        let Some((topic, channel)) = self.channels.iter_mut().find(|(_, c)| c.serial == serial && &c.key == key) else {
            return;
        };
        if channel.state != ChannelState::Joining {
            return;
        }
        channel.state = ChannelState::Joined;
        fx.joined += 1;
        tracing::debug!(conn = self.conn.0, topic = &**topic, "joined");
        let reply = frame::encode_reply(self.format, as_ref(&channel.join_ref), as_ref(&channel.join_reply_ref), topic, "ok", &channel.join_response);
        fx.frames.push(reply);
        if !channel.pg_bindings.is_empty() {
            // Subscribed after the reply, so the `system` status never precedes it.
            let key = ChannelKey { shard: self.shard, conn: self.conn, channel: channel.serial };
            fx.pg.push(PgCommand::Subscribe(subscription(key, &channel.cred.claims, &channel.pg_bindings)));
        }
        if let (true, Some(snapshot)) = (channel.presence_enabled, presence) {
            if presence_rate_exceeded {
                // §4.2: the join-sync is refused while the tenant's presence rate is exceeded.
                let topic = topic.clone();
                self.close_channel(state, &topic, SystemMessage::TooManyPresenceMessages, fx);
                return;
            }
            let payload = presence::render_state(&snapshot);
            fx.frames.push(frame::encode_push(self.format, as_ref(&channel.join_ref), topic, "presence_state", &payload));
        }
        // Replayed messages follow the reply (PROTOCOL.md §2.7).
        fx.frames.append(&mut channel.replay_frames);
        if let Some(message) = channel.close_after_join.take() {
            let topic = topic.clone();
            self.close_channel(state, &topic, message, fx);
        }
    }

    /// A UUID v1 string for a channel that joined without a presence key (PROTOCOL.md §2.2).
    /// The presence key of channel `topic` (present), generated on first use.
    fn presence_key(&mut self, topic: &str, now_ms: i64) -> Arc<str> {
        if let Some(key) = &self.channels[topic].presence_key {
            return Arc::clone(key);
        }
        let key: Arc<str> = Arc::from(self.generate_presence_key(now_ms).as_str());
        if let Some(channel) = self.channels.get_mut(topic) {
            channel.presence_key = Some(Arc::clone(&key));
        }
        key
    }

    fn generate_presence_key(&mut self, now_ms: i64) -> String {
        self.presence_keys_made = self.presence_keys_made.wrapping_add(1);
        let millis = now_ms.max(0) as u64;
        // Sub-millisecond nanos from the per-session counter keep keys unique per session; the
        // node id (shard, connection) keeps them unique across sessions.
        // UUID v1 time has a 100 ns resolution: 10,000 distinct keys per millisecond.
        let nanos = (millis % 1000) as u32 * 1_000_000 + (self.presence_keys_made % 10_000) * 100;
        let ts = uuid::Timestamp::from_unix(uuid::timestamp::context::NoContext, millis / 1000, nanos);
        let conn = self.conn.0.to_be_bytes();
        let shard = self.shard.0.to_be_bytes();
        let node = [shard[0], shard[1], conn[4], conn[5], conn[6], conn[7]];
        uuid::Uuid::new_v1(ts, &node).to_string()
    }

    /// A `presence` frame (PROTOCOL.md §4.3), or the product docs' `presence_diff` form.
    fn presence(&mut self, state: &mut ShardState, ctx: Context<'_>, topic: &str, ref_: Ref<'_>, request: PresenceRequest, fx: &mut Effects) {
        let channel = self.channels.get_mut(topic).expect("caller checked the channel exists");
        let join_ref = channel.join_ref.clone();
        let format = self.format;
        let ok = |fx: &mut Effects| fx.frames.push(frame::encode_reply(format, as_ref(&join_ref), ref_, topic, "ok", b"{}"));
        if request == PresenceRequest::NoEvent {
            ok(fx);
            return;
        }
        // Every frame with an event counts toward the per-channel window (§4.6).
        if ctx.now_ms - channel.presence_window_start_ms >= PRESENCE_WINDOW.as_millis() as i64 {
            channel.presence_window_start_ms = ctx.now_ms;
            channel.presence_calls = 0;
        }
        channel.presence_calls += 1;
        if channel.presence_calls > PRESENCE_CALLS_PER_WINDOW_MAX {
            self.close_channel(state, topic, SystemMessage::ClientPresenceRateLimit, fx);
            return;
        }
        let subscriber = Subscriber { shard: self.shard, conn: self.conn, channel: channel.serial };
        let key = channel.key.clone();
        match request {
            PresenceRequest::NoEvent => unreachable!("handled above"),
            PresenceRequest::Track(payload) => {
                let object = match payload {
                    None => serde_json::Map::new(),
                    Some(serde_json::Value::Object(object)) => object,
                    Some(_) => {
                        let response = format!(r#"{{"reason":{}}}"#, serde_json::to_string(ReplyError::PresencePayloadNotMap.text()).expect("string"));
                        fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), ref_, topic, "error", response.as_bytes()));
                        return;
                    }
                };
                let meta = presence::normalize_meta(object);
                if meta.len() > ctx.limits.payload_bytes_max {
                    self.close_channel(state, topic, SystemMessage::TrackMessageSizeExceeded, fx);
                    return;
                }
                if ctx.presence_rate_exceeded {
                    self.close_channel(state, topic, SystemMessage::TooManyPresenceMessages, fx);
                    return;
                }
                fx.presence_events += 1;
                if channel.private {
                    let pending = private::PendingWrite::Track { ref_: raw(ref_), meta: meta.clone() };
                    match self.write_permission(topic, pending, fx) {
                        Some(true) => {}
                        Some(false) => {
                            fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), ref_, topic, "error", b"{}"));
                            return;
                        }
                        None => return,
                    }
                }
                let presence_key = self.presence_key(topic, ctx.now_ms);
                fx.shard.push((state.owner(&key), ShardMsg::Track { topic: key, subscriber, key: presence_key, meta }));
                ok(fx);
            }
            PresenceRequest::Untrack => {
                fx.shard.push((state.owner(&key), ShardMsg::Untrack { topic: key, subscriber }));
                ok(fx);
            }
            PresenceRequest::Other => {
                fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), ref_, topic, "error", b"{}"));
            }
        }
    }

    /// Closes one channel from the server side: `system` error, `phx_close`, unsubscribe.
    fn close_channel(&mut self, state: &mut ShardState, topic: &str, message: SystemMessage, fx: &mut Effects) {
        let Some(channel) = self.channels.get_mut(topic) else { return };
        if channel.state != ChannelState::Joined {
            // The join is still unanswered: the client must see its reply before anything else
            // on the channel (issue 16, found by the session fuzz harness), so the close waits
            // for the ok reply (`on_join_ack`); the first reason wins.
            channel.close_after_join.get_or_insert(message);
            return;
        }
        let join_ref = channel.join_ref.clone();
        fx.frames.push(frame::encode_system(self.format, as_ref(&join_ref), topic, "system", message.status(), &message.text()));
        fx.frames.push(frame::encode_close(self.format, as_ref(&join_ref), topic, "phx_close"));
        self.leave(state, topic, fx);
    }

    /// Closes one join's channel with a `system` error then `phx_close` (PROTOCOL.md §9.3, §9.4).
    pub fn shut_channel(&mut self, state: &mut ShardState, serial: ChannelSerial, message: SystemMessage, fx: &mut Effects) {
        if let Some(topic) = self.topic_of(serial) {
            self.close_channel(state, &topic, message, fx);
        }
    }

    /// `access_token` (PROTOCOL.md §6.3): never a reply; a bad token closes the channel.
    fn access_token(&mut self, state: &mut ShardState, ctx: Context<'_>, topic: &str, payload: &str, fx: &mut Effects) {
        #[derive(serde::Deserialize)]
        struct Refresh {
            access_token: Option<auth::plain_json::Plain>,
        }
        let Ok(Refresh { access_token: Some(auth::plain_json::Plain(serde_json::Value::String(token))) }) = serde_json::from_str::<Refresh>(payload) else {
            return;
        };
        let channel = self.channels.get_mut(topic).expect("caller checked the channel exists");
        let token = auth::clean_token(&token);
        if token.starts_with("sb_") || *token == *channel.cred.token {
            return;
        }
        match ctx.credentials.verify(ctx.keys, &token, ctx.now_secs) {
            Ok(cred) => {
                channel.cred = cred;
                if channel.private {
                    // Re-check reads with the new claims; writes are re-checked at next use.
                    channel.write = private::WriteState::Unknown;
                    let channel = &self.channels[topic];
                    fx.pg.push(self.authorize(channel, engine::changes::CheckKind::Read));
                }
                let channel = self.channels.get_mut(topic).expect("present");
                // Only a joined channel is subscribed; one still joining subscribes at its join
                // ack, with the credential just set. (Subscribing here too leaked the
                // subscription of a private join that was then refused: found by review.)
                if channel.state == ChannelState::Joined && !channel.pg_bindings.is_empty() {
                    // Re-subscribe with the new claims (PROTOCOL.md §6.3): a new status follows.
                    let key = ChannelKey { shard: self.shard, conn: self.conn, channel: channel.serial };
                    fx.pg.push(PgCommand::Subscribe(subscription(key, &channel.cred.claims, &channel.pg_bindings)));
                }
            }
            Err(error) => self.close_channel(state, topic, system_message(error), fx),
        }
    }

    /// Removes a channel and unsubscribes it; no frames.
    fn leave(&mut self, state: &mut ShardState, topic: &str, fx: &mut Effects) {
        if let Some(channel) = self.channels.remove(topic) {
            self.unsubscribe(state, &channel, fx);
        }
    }

    fn unsubscribe(&self, state: &mut ShardState, channel: &Channel, fx: &mut Effects) {
        if channel.state == ChannelState::Joined {
            fx.left += 1;
            tracing::debug!(conn = self.conn.0, topic = %channel.key.sub, "left");
        }
        fx.shard.extend(state.local_leave(&channel.key, self.conn, channel.serial));
        if !channel.pg_bindings.is_empty() {
            fx.pg.push(PgCommand::Unsubscribe(ChannelKey { shard: self.shard, conn: self.conn, channel: channel.serial }));
        }
    }

    /// The connection is gone: unsubscribe every channel.
    pub fn on_close(&mut self, state: &mut ShardState, fx: &mut Effects) {
        let channels: Vec<Box<Channel>> = self.channels.drain().map(|(_, c)| c).collect();
        for channel in &channels {
            self.unsubscribe(state, channel, fx);
        }
    }

    /// Closes every channel whose token has expired (PROTOCOL.md §6.4): `system` "Token has
    /// expired N seconds ago", then `phx_close`. The driver calls this about once a second, so a
    /// channel closes at most a second after its `exp`; the socket stays open.
    pub fn expire_channels(&mut self, state: &mut ShardState, now_secs: i64, fx: &mut Effects) {
        self.abandon_authorizing(now_secs, fx);
        let expired: Vec<(Box<str>, i64)> = self
            .channels
            .iter()
            // Only joined channels: one still waiting for its policy check or owner ack is
            // answered first (its deadline bounds the wait) and expires at the next tick, with
            // the number of seconds counted then.
            .filter(|(_, c)| c.state == ChannelState::Joined && c.cred.claims.exp <= now_secs)
            .map(|(topic, c)| (topic.clone(), now_secs - c.cred.claims.exp))
            .collect();
        for (topic, seconds_ago) in expired {
            self.close_channel(state, &topic, SystemMessage::TokenExpired { seconds_ago }, fx);
        }
    }

    /// The server is going away (PROTOCOL.md §1.11): `system` "Server requested disconnect"
    /// (status ok) on every joined channel; the driver
    /// then closes the socket with 1012. Channels stay registered until the socket closes.
    pub fn disconnect_notices(&self) -> Vec<Bytes> {
        let notice = SystemMessage::ServerRequestedDisconnect;
        let text = notice.text();
        self.channels
            .iter()
            .filter(|(_, c)| c.state == ChannelState::Joined)
            .map(|(topic, c)| frame::encode_system(self.format, as_ref(&c.join_ref), topic, "system", notice.status(), &text))
            .collect()
    }

    /// The earliest `exp` or authorization deadline of the session's channels, so the driver
    /// can skip idle sessions.
    pub fn next_expiry(&self) -> Option<i64> {
        self.channels.values().map(|c| c.cred.claims.exp.min(c.authorize_deadline_secs)).min()
    }

    /// Whether channel `serial` already got database row `id` by replay.
    pub fn already_replayed(&self, serial: ChannelSerial, id: &str) -> bool {
        self.channels.values().any(|c| c.serial == serial && c.replayed_ids.iter().any(|r| &**r == id))
    }

    /// The topic of a channel by serial, whatever its state.
    /// The next channel serial: counts from 1 and wraps after 2^32 joins on one socket, skipping
    /// 0 and any serial a live channel still holds (so two live channels never share one).
    fn fresh_serial(&mut self) -> ChannelSerial {
        loop {
            let candidate = self.next_serial;
            self.next_serial = self.next_serial.checked_add(1).unwrap_or(1);
            if !self.channels.iter().any(|(_, c)| c.serial.0 == candidate) {
                return ChannelSerial(candidate);
            }
        }
    }

    /// Whether a channel with this serial is in the session (in any state): the fuzz harness's
    /// check that no Postgres Changes subscription outlives its channel.
    pub(crate) fn holds_serial(&self, serial: ChannelSerial) -> bool {
        self.channels.values().any(|c| c.serial == serial)
    }

    fn topic_of(&self, serial: ChannelSerial) -> Option<Box<str>> {
        self.channels.iter().find(|(_, c)| c.serial == serial).map(|(topic, _)| topic.clone())
    }

    /// The topic, wire format and join_ref of a live channel (for pushes from the Postgres
    /// Changes core, which addresses channels by serial).
    pub fn channel_by_serial(&self, serial: ChannelSerial) -> Option<(&str, &[u8])> {
        self.channels.iter().find(|(_, c)| c.serial == serial && c.state == ChannelState::Joined).map(|(topic, c)| (&**topic, &c.join_ref[..]))
    }

    /// Whether channel `serial` takes the change at `position` (database commit order): false
    /// when it already got it or a later one. `(0, 0)` is always taken.
    pub fn accept_change(&mut self, serial: ChannelSerial, position: (u64, u32)) -> bool {
        if position == (0, 0) {
            return true;
        }
        let Some((_, channel)) = self.channels.iter_mut().find(|(_, c)| c.serial == serial) else { return true };
        if position <= channel.last_change {
            return false;
        }
        channel.last_change = position;
        true
    }

    /// A `system` push from the Postgres Changes core for channel `serial`.
    pub fn postgres_changes_system(&self, serial: ChannelSerial, status: &str, message: &str) -> Option<Bytes> {
        let (topic, join_ref) = self.channel_by_serial(serial)?;
        Some(frame::encode_system(self.format, as_ref(join_ref), topic, "postgres_changes", status, message))
    }
}

/// The ok reply's `response`: `{"postgres_changes":[<each binding as sent, plus "id">]}`.
fn join_response(bindings: &[serde_json::Map<String, serde_json::Value>]) -> Bytes {
    if bindings.is_empty() {
        // Most channels: no allocation kept per channel.
        return Bytes::from_static(br#"{"postgres_changes":[]}"#);
    }
    let echoed: Vec<serde_json::Value> = bindings
        .iter()
        .map(|binding| {
            let mut echoed = binding.clone();
            echoed.insert("id".into(), serde_json::Value::from(engine::changes::binding_id(canonical_json(binding).as_bytes())));
            serde_json::Value::Object(echoed)
        })
        .collect();
    Bytes::from(serde_json::to_vec(&serde_json::json!({ "postgres_changes": echoed })).expect("JSON serialises"))
}

fn subscription(key: ChannelKey, claims: &Claims, bindings: &[serde_json::Map<String, serde_json::Value>]) -> Subscription {
    Subscription {
        key,
        role: claims.role.clone(),
        claims_json: claims.json.to_string(),
        bindings: bindings.iter().map(canonical_json).collect(),
    }
}

/// A binding's JSON text (keys sorted: `serde_json::Map` is ordered), as the core parses it and
/// [`engine::changes::binding_id`] hashes it.
fn canonical_json(binding: &serde_json::Map<String, serde_json::Value>) -> String {
    serde_json::to_string(binding).expect("a JSON map serialises")
}

fn join_error(error: AuthError) -> JoinError {
    match error {
        AuthError::Missing | AuthError::NotJwt => JoinError::MalformedJwt,
        AuthError::NoSigner { kid } => JoinError::JwtSignerError { kid },
        AuthError::BadSignature => JoinError::JwtSignatureError,
        AuthError::Expired { seconds_ago } => JoinError::TokenExpired { seconds_ago },
        AuthError::MissingClaims => JoinError::MissingClaims,
        _ => JoinError::Unknown,
    }
}

fn system_message(error: AuthError) -> SystemMessage {
    match error {
        AuthError::Expired { seconds_ago } => SystemMessage::TokenExpired { seconds_ago },
        AuthError::MissingClaims => SystemMessage::MissingClaims,
        AuthError::NoSigner { kid } => SystemMessage::NoSigner { kid },
        AuthError::BadSignature => SystemMessage::BadSignature,
        _ => SystemMessage::NotJwt,
    }
}

/// A join error's code for metrics: the reason up to its first `:` (a small fixed set).
pub(crate) fn join_error_code(reason: &str) -> Box<str> {
    reason.split(':').next().unwrap_or(reason).into()
}

/// How long join error replies wait (upstream `CHANNEL_ERROR_BACKOFF_MS`).
pub fn join_error_delay(limits: &Limits) -> Duration {
    limits.join_error_delay
}

mod credentials;
mod private;
mod topic_map;

#[cfg(test)]
mod tests;
