//! Private channels (PROTOCOL.md §6.5): the join waits for a read check; the first broadcast
//! and the first track wait for a write check, whose answer is then kept for the channel's life
//! (until rejoin or token refresh). Checks run in the Postgres core; answers come back through
//! [`Session::on_authorized`].

use std::collections::VecDeque;

use bytes::Bytes;

use engine::client_error::{JoinError, SystemMessage};
use engine::topic::sub_topic;
use engine::{BroadcastBody, ChannelSerial, ShardMsg, ShardState, Subscriber};
use engine::changes::{AuthzReply, AuthzRequest, AuthzResult, ChannelKey, CheckKind, Command as PgCommand, ReplayedMessage};

use super::{as_ref, Channel, ChannelState, Context, Effects, Session};
use crate::frame::{self, Ref};

/// Sends and tracks a channel may queue while its write check runs; beyond, they are dropped
/// (a client does not send that much in the few milliseconds a check takes).
pub(super) const PENDING_WRITES_MAX: usize = 16;

/// Write permission of a private channel.
#[derive(Debug, Clone)]
pub(super) enum WriteState {
    /// Not checked since join or the last token refresh.
    Unknown,
    /// A check is running; these wait for it.
    Pending(VecDeque<PendingWrite>),
    /// The answer.
    Known {
        broadcast: bool,
        presence: bool,
    },
}

/// A send or track waiting for the write check.
#[derive(Debug, Clone)]
pub(super) enum PendingWrite {
    Broadcast { ref_: super::RawRef, body: BroadcastBody },
    Track { ref_: super::RawRef, meta: Bytes },
}

impl PendingWrite {
    fn is_broadcast(&self) -> bool {
        matches!(self, PendingWrite::Broadcast { .. })
    }
}

impl Session {
    /// A policy check for `channel`, answered to this channel.
    pub(super) fn authorize(&self, channel: &Channel, kind: CheckKind) -> PgCommand {
        let request = AuthzRequest {
            role: channel.cred.claims.role.clone(),
            claims_json: channel.cred.claims.json.to_string(),
            sub: channel.cred.claims.sub.clone(),
            topic: channel.key.sub.to_string(),
            kind,
        };
        let key = ChannelKey { shard: self.shard, conn: self.conn, channel: channel.serial };
        PgCommand::Authorize { request, reply: AuthzReply::Channel(key) }
    }

    /// Whether the channel may write `pending`'s kind: `Some` when known, `None` when the
    /// write waits (queued; a check is requested if none runs).
    pub(super) fn write_permission(&mut self, topic: &str, pending: PendingWrite, fx: &mut Effects) -> Option<bool> {
        let is_broadcast = pending.is_broadcast();
        let channel = self.channels.get_mut(topic).expect("caller checked the channel exists");
        match &mut channel.write {
            WriteState::Known { broadcast, presence } => Some(if is_broadcast { *broadcast } else { *presence }),
            WriteState::Pending(queue) => {
                if queue.len() < PENDING_WRITES_MAX {
                    queue.push_back(pending);
                }
                None
            }
            WriteState::Unknown => {
                channel.write = WriteState::Pending(VecDeque::from([pending]));
                let channel = &self.channels[topic];
                fx.pg.push(self.authorize(channel, CheckKind::Write));
                None
            }
        }
    }

    /// Private joins still waiting for the database past their deadline fail with the §2.5
    /// database error; a late answer finds no channel and is ignored.
    pub(super) fn abandon_authorizing(&mut self, now_secs: i64, fx: &mut Effects) {
        let overdue: Vec<Box<str>> = self
            .channels
            .iter()
            .filter(|(_, c)| c.state == ChannelState::Authorizing && c.authorize_deadline_secs <= now_secs)
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in overdue {
            let channel = self.channels.remove(&topic).expect("listed");
            tracing::warn!(conn = self.conn.0, topic = %topic, "private join got no policy answer in time");
            let reason = JoinError::UnableToConnectToProject.reason();
            fx.delayed.push(frame::encode_error_reason(self.format, as_ref(&channel.join_ref), as_ref(&channel.join_reply_ref), &topic, &reason));
        }
    }

    /// The answer to a policy check of channel `serial`.
    pub fn on_authorized(&mut self, state: &mut ShardState, ctx: Context<'_>, serial: ChannelSerial, kind: CheckKind, result: AuthzResult, fx: &mut Effects) {
        let Some(topic) = self.topic_of(serial) else { return };
        match kind {
            CheckKind::Read => self.on_read_check(state, &topic, result, fx),
            CheckKind::Write => self.on_write_check(state, ctx, &topic, result, fx),
        }
    }

    fn on_read_check(&mut self, state: &mut ShardState, topic: &str, result: AuthzResult, fx: &mut Effects) {
        let channel = self.channels.get_mut(topic).expect("found by serial");
        let sub = sub_topic(topic).to_string();
        let granted = result.error.is_none() && (result.broadcast || (channel.presence_enabled && result.presence));
        if channel.state == ChannelState::Authorizing {
            if !granted {
                let reason = JoinError::Unauthorized { sub_topic: sub }.reason();
                let reply = frame::encode_error_reason(self.format, as_ref(&channel.join_ref), as_ref(&channel.join_reply_ref), topic, &reason);
                fx.join_errors.push(super::join_error_code(&reason));
                fx.delayed.push(reply);
                self.channels.remove(topic);
                return;
            }
            channel.broadcast_read = result.broadcast;
            channel.presence_read = result.presence;
            if let Some((since_ms, limit)) = channel.replay {
                if !result.broadcast {
                    let reason = JoinError::Unauthorized { sub_topic: sub }.reason();
                    let reply = frame::encode_error_reason(self.format, as_ref(&channel.join_ref), as_ref(&channel.join_reply_ref), topic, &reason);
                    fx.join_errors.push(super::join_error_code(&reason));
                    fx.delayed.push(reply);
                    self.channels.remove(topic);
                    return;
                }
                // Read the stored messages first; the join continues in `on_replayed`.
                let key = ChannelKey { shard: self.shard, conn: self.conn, channel: channel.serial };
                fx.pg.push(PgCommand::Replay { key, topic: sub, since_ms, limit });
                return;
            }
            channel.state = ChannelState::Joining;
            fx.shard.push(self.subscribe_local(state, topic));
            return;
        }
        // A token refresh re-checked the reads (PROTOCOL.md §6.3).
        let message = if result.error.is_some() {
            Some(SystemMessage::DatabaseUnreachable)
        } else if !granted {
            Some(SystemMessage::NoReadPermission { sub_topic: sub })
        } else if (channel.broadcast_read && !result.broadcast) || (channel.presence_read && !result.presence) {
            Some(SystemMessage::ReadPermissionRevoked { sub_topic: sub })
        } else {
            None
        };
        if let Some(message) = message {
            self.close_channel(state, topic, message, fx);
        }
    }

    /// The stored messages of a replay: kept until the join reply, then pushed oldest first.
    pub fn on_replayed(&mut self, state: &mut ShardState, serial: ChannelSerial, result: Result<Vec<ReplayedMessage>, String>, fx: &mut Effects) {
        let Some(topic) = self.topic_of(serial) else { return };
        let format = self.format;
        let channel = self.channels.get_mut(&topic).expect("found by serial");
        if channel.state != ChannelState::Authorizing {
            return;
        }
        let messages = match result {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "replay query failed");
                let reason = JoinError::ReplayFailed.reason();
                let reply = frame::encode_error_reason(format, as_ref(&channel.join_ref), as_ref(&channel.join_reply_ref), &topic, &reason);
                fx.join_errors.push(super::join_error_code(&reason));
                fx.delayed.push(reply);
                self.channels.remove(&topic);
                return;
            }
        };
        for message in messages {
            channel.replayed_ids.push(message.id.clone().into_boxed_str());
            let mut meta = b"{\"replayed\":true,\"id\":".to_vec();
            frame::write_json_str(&mut meta, &message.id);
            meta.push(b'}');
            match (message.payload, message.binary) {
                (_, Some(binary)) => {
                    // Binary rows go to V2 sockets as kind-4 frames; V1 cannot carry them.
                    let body = BroadcastBody::User {
                        event: Bytes::from(message.event.into_bytes()),
                        encoding: engine::broadcast::PayloadEncoding::Binary,
                        payload: Bytes::from(binary),
                        metadata: Bytes::from(meta),
                    };
                    let broadcast = engine::Broadcast { origin: None, body };
                    if let Some(frame) = frame::encode_broadcast(format, &topic, &broadcast) {
                        channel.replay_frames.push(frame);
                    }
                }
                (Some(payload), None) => {
                    let mut push = b"{\"type\":\"broadcast\",\"event\":".to_vec();
                    frame::write_json_str(&mut push, &message.event);
                    push.extend_from_slice(b",\"payload\":");
                    push.extend_from_slice(payload.as_bytes());
                    push.extend_from_slice(b",\"meta\":");
                    push.extend_from_slice(&meta);
                    push.push(b'}');
                    channel.replay_frames.push(frame::encode_push(format, as_ref(&channel.join_ref), &topic, "broadcast", &push));
                }
                (None, None) => {}
            }
        }
        channel.state = ChannelState::Joining;
        fx.shard.push(self.subscribe_local(state, &topic));
    }

    fn on_write_check(&mut self, state: &mut ShardState, ctx: Context<'_>, topic: &str, result: AuthzResult, fx: &mut Effects) {
        let channel = self.channels.get_mut(topic).expect("found by serial");
        let (broadcast, presence) = (result.error.is_none() && result.broadcast, result.error.is_none() && result.presence);
        let pending = match std::mem::replace(&mut channel.write, WriteState::Known { broadcast, presence }) {
            WriteState::Pending(queue) => queue,
            _ => VecDeque::new(),
        };
        let join_ref = channel.join_ref.clone();
        for write in pending {
            match write {
                // Denied broadcasts are dropped without a reply (§3.2).
                PendingWrite::Broadcast { ref_, body } if broadcast => {
                    let ref_text = String::from_utf8(ref_.to_vec()).expect("stored refs are JSON text");
                    self.publish_checked(state, ctx, topic, Ref::Json(&ref_text), body, fx);
                }
                PendingWrite::Broadcast { .. } => {}
                PendingWrite::Track { ref_, meta } => {
                    let ref_text = String::from_utf8(ref_.to_vec()).expect("stored refs are JSON text");
                    let ref_ = Ref::Json(&ref_text);
                    if presence {
                        let presence_key = self.presence_key(topic, ctx.now_ms);
                        let channel = &self.channels[topic];
                        let subscriber = Subscriber { shard: self.shard, conn: self.conn, channel: channel.serial };
                        let key = channel.key.clone();
                        fx.shard.push((state.owner(&key), ShardMsg::Track { topic: key, subscriber, key: presence_key, meta }));
                        fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), ref_, topic, "ok", b"{}"));
                    } else {
                        fx.frames.push(frame::encode_reply(self.format, as_ref(&join_ref), ref_, topic, "error", b"{}"));
                    }
                }
            }
        }
    }
}
