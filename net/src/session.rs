//! One connection's protocol state: its joined channels and what each inbound frame does.
//!
//! Sans-IO: the driver feeds decoded WebSocket messages (and join acknowledgements from topic
//! owners) with the current time, and carries out the returned [`Effects`]: frames to write,
//! join errors to write after the join error delay, messages for other shards, and a close.
//! No socket, timer or clock appears here, so the whole protocol is tested without IO.

use std::sync::Arc;
use std::time::Duration;

use ahash::AHashMap;
use bytes::Bytes;

use auth::{AuthError, Claims, KeyStore};
use engine::broadcast::PayloadEncoding;
use engine::client_error::{CloseReason, JoinError, ReplyError, SystemMessage};
use engine::topic::{sub_topic, PREFIX};
use engine::{Broadcast, BroadcastBody, ChannelSerial, ConnId, Format, Limits, LocalSub, Origin, ShardId, ShardMsg, ShardState, TopicKey};

use crate::frame::{self, Event, Ref, TextFrame, UserBroadcastFrame};
use crate::join::{parse_join, ChannelToken, JoinRequest};

/// The topic heartbeats go to.
const PHOENIX_TOPIC: &str = "phoenix";

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelState {
    /// Waiting for the topic owner's acknowledgement; the ok reply goes out when it comes.
    Joining,
    Joined,
}

#[derive(Debug)]
struct Channel {
    serial: ChannelSerial,
    /// The join frame's `join_ref` (raw JSON), echoed in pushes and `phx_close`.
    join_ref: Bytes,
    /// The join frame's `ref` (raw JSON), for the delayed ok reply.
    join_reply_ref: Bytes,
    key: TopicKey,
    state: ChannelState,
    broadcast_ack: bool,
    /// The channel token and its claims (drive private-channel and RLS checks later).
    token: String,
    #[allow(dead_code)]
    claims: Claims,
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    format: Format,
    shard: ShardId,
    conn: ConnId,
    /// The connection token (cleaned), the fallback channel token.
    conn_token: String,
    /// Joined channels by topic as the client spelled it.
    channels: AHashMap<Box<str>, Channel>,
    next_serial: u32,
}

fn raw(r: Ref<'_>) -> Bytes {
    r.to_json()
}

fn as_ref(bytes: &Bytes) -> Ref<'_> {
    Ref::Json(std::str::from_utf8(bytes).expect("stored refs are JSON text"))
}

impl Session {
    /// A new session for a connection that passed the upgrade with `conn_token`.
    pub fn new(format: Format, shard: ShardId, conn: ConnId, conn_token: String) -> Session {
        Session { format, shard, conn, conn_token, channels: AHashMap::new(), next_serial: 1 }
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
                // Presence arrives with its own issue; until then a track is refused, never
                // silently accepted (README "What does not work yet").
                fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), frame.ref_, topic, "error", b"{}"));
            }
            Event::AccessToken => self.access_token(state, ctx, topic, frame.payload.get(), fx),
            // Unknown events (and the product docs' `presence_diff` until presence lands) are
            // ignored without a reply (PROTOCOL.md §1.10).
            Event::PresenceDiff | Event::Heartbeat | Event::Other(_) | Event::Join => {}
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
        let channel = &self.channels[topic];
        let message = Broadcast {
            origin: Some(Origin { shard: self.shard, conn: self.conn, channel: channel.serial }),
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
        match self.check_join(ctx, frame) {
            Ok((request, token, claims)) => {
                let serial = ChannelSerial(self.next_serial);
                self.next_serial += 1;
                let key = TopicKey::new(topic, request.private);
                let local = LocalSub {
                    conn: self.conn,
                    channel: serial,
                    format: self.format,
                    prefixed: topic.starts_with(PREFIX),
                    receive_own: request.broadcast_self,
                };
                fx.shard.push(state.local_join(key.clone(), local));
                self.channels.insert(
                    topic.into(),
                    Channel {
                        serial,
                        join_ref: raw(frame.join_ref),
                        join_reply_ref: raw(frame.ref_),
                        key,
                        state: ChannelState::Joining,
                        broadcast_ack: request.broadcast_ack,
                        token,
                        claims,
                    },
                );
            }
            Err(error) => {
                let reason = error.reason();
                tracing::debug!(conn = self.conn.0, topic, %reason, "join refused");
                fx.delayed.push(frame::encode_error_reason(self.format, frame.join_ref, frame.ref_, topic, &reason));
            }
        }
    }

    /// PROTOCOL.md §2.4, the steps that apply without a database.
    fn check_join(&self, ctx: Context<'_>, frame: &TextFrame<'_>) -> Result<(JoinRequest, String, Claims), JoinError> {
        let topic: &str = &frame.topic;
        if topic.is_empty() {
            return Err(JoinError::Unknown);
        }
        if sub_topic(topic).is_empty() {
            return Err(JoinError::TopicNameRequired);
        }
        let request = parse_join(frame.payload).map_err(|_| JoinError::Unknown)?;
        if self.channels.len() >= ctx.limits.channels_per_client_max as usize {
            return Err(JoinError::ChannelRateLimitReached);
        }
        let token = match &request.token {
            ChannelToken::Connection => self.conn_token.clone(),
            ChannelToken::Given(token) => auth::clean_token(token),
        };
        let claims = ctx.keys.verify(&token, ctx.now_secs).map_err(join_error)?;
        if let Some(replay) = &request.replay {
            if !request.private {
                return Err(JoinError::ReplayPublic);
            }
            let _ = replay;
        }
        let needs_database = request.private || !request.postgres_changes.is_empty() || request.replay.is_some();
        if needs_database && !ctx.database {
            return Err(JoinError::UnableToConnectToProject);
        }
        Ok((request, token, claims))
    }

    /// The topic owner registered a join: send the ok reply. Stale acks (the channel left or
    /// re-joined meanwhile) are ignored.
    pub fn on_join_ack(&mut self, key: &TopicKey, serial: ChannelSerial, fx: &mut Effects) {
        let Some((topic, channel)) = self.channels.iter_mut().find(|(_, c)| c.serial == serial && &c.key == key) else {
            return;
        };
        if channel.state != ChannelState::Joining {
            return;
        }
        channel.state = ChannelState::Joined;
        let reply = frame::encode_reply(
            self.format,
            as_ref(&channel.join_ref),
            as_ref(&channel.join_reply_ref),
            topic,
            "ok",
            br#"{"postgres_changes":[]}"#,
        );
        fx.frames.push(reply);
    }

    /// `access_token` (PROTOCOL.md §6.3): never a reply; a bad token closes the channel.
    fn access_token(&mut self, state: &mut ShardState, ctx: Context<'_>, topic: &str, payload: &str, fx: &mut Effects) {
        #[derive(serde::Deserialize)]
        struct Refresh {
            access_token: Option<serde_json::Value>,
        }
        let Ok(Refresh { access_token: Some(serde_json::Value::String(token)) }) = serde_json::from_str::<Refresh>(payload) else {
            return;
        };
        let channel = self.channels.get_mut(topic).expect("caller checked the channel exists");
        let token = auth::clean_token(&token);
        if token.starts_with("sb_") || token == channel.token {
            return;
        }
        match ctx.keys.verify(&token, ctx.now_secs) {
            Ok(claims) => {
                channel.token = token;
                channel.claims = claims;
            }
            Err(error) => {
                let join_ref = channel.join_ref.clone();
                let message = system_message(error);
                fx.frames.push(frame::encode_system(self.format, as_ref(&join_ref), topic, "system", "error", &message.text()));
                fx.frames.push(frame::encode_close(self.format, as_ref(&join_ref), topic, "phx_close"));
                self.leave(state, topic, fx);
            }
        }
    }

    /// Removes a channel and unsubscribes it; no frames.
    fn leave(&mut self, state: &mut ShardState, topic: &str, fx: &mut Effects) {
        if let Some(channel) = self.channels.remove(topic) {
            fx.shard.extend(state.local_leave(&channel.key, self.conn, channel.serial));
        }
    }

    /// The connection is gone: unsubscribe every channel.
    pub fn on_close(&mut self, state: &mut ShardState, fx: &mut Effects) {
        for (_, channel) in self.channels.drain() {
            fx.shard.extend(state.local_leave(&channel.key, self.conn, channel.serial));
        }
    }
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

/// How long join error replies wait (upstream `CHANNEL_ERROR_BACKOFF_MS`).
pub fn join_error_delay(limits: &Limits) -> Duration {
    limits.join_error_delay
}

#[cfg(test)]
mod tests;
