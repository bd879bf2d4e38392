//! Every string a client can see, in one place (PROTOCOL.md §1.4, §1.7, §2.5, §3.2, §6.3, §9.4).
//!
//! No other code writes a reason, an error body or a `system` message literal: it names a
//! variant here. The golden test at the bottom pins every string byte for byte.

use std::borrow::Cow;

/// Why a WebSocket upgrade was refused (PROTOCOL.md §1.4): HTTP status and `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeError {
    /// Row 1: not a GET. Empty body.
    NotGet,
    /// Row 2: `vsn` not negotiable. Empty body.
    VsnUnsupported,
    /// Row 3: the Host names no tenant.
    TenantNotFound,
    /// Row 4: the tenant is suspended.
    TenantSuspended,
    /// Row 5.
    ApiKeyMissing,
    /// Row 6 (also other claim failures, §0.4).
    NotJwt,
    /// Row 7.
    NoSigner {
        /// The `kid` looked up, if any.
        kid: Option<String>,
    },
    /// Row 8.
    BadSignature,
    /// Row 9.
    Expired,
    /// Row 10.
    MissingClaims,
    /// Row 11.
    TooManyUsers,
    /// Row 12.
    TooManyJoins,
    /// Row 13.
    Internal,
}

impl UpgradeError {
    /// HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            UpgradeError::NotGet => 400,
            UpgradeError::VsnUnsupported | UpgradeError::TenantSuspended => 403,
            UpgradeError::TenantNotFound => 404,
            UpgradeError::ApiKeyMissing
            | UpgradeError::NotJwt
            | UpgradeError::NoSigner { .. }
            | UpgradeError::BadSignature
            | UpgradeError::Expired
            | UpgradeError::MissingClaims => 401,
            UpgradeError::TooManyUsers | UpgradeError::TooManyJoins => 429,
            UpgradeError::Internal => 500,
        }
    }

    /// The `error` text of the JSON body; `None` for the empty-body rows.
    pub fn message(&self) -> Option<Cow<'static, str>> {
        Some(match self {
            UpgradeError::NotGet | UpgradeError::VsnUnsupported => return None,
            UpgradeError::TenantNotFound => "Tenant not found".into(),
            UpgradeError::TenantSuspended => "Realtime was disabled for this tenant".into(),
            UpgradeError::ApiKeyMissing => "API key is missing".into(),
            UpgradeError::NotJwt => NOT_JWT.into(),
            UpgradeError::NoSigner { kid } => no_signer(kid.as_deref()),
            UpgradeError::BadSignature => BAD_SIGNATURE.into(),
            UpgradeError::Expired => "Token has expired".into(),
            UpgradeError::MissingClaims => MISSING_CLAIMS.into(),
            UpgradeError::TooManyUsers => "Too many connected users".into(),
            UpgradeError::TooManyJoins => "Too many joins per second".into(),
            UpgradeError::Internal => "Error connecting to Realtime".into(),
        })
    }

    /// Whether the response is delayed by the connect error delay (rows 3 and later).
    pub fn delayed(&self) -> bool {
        !matches!(self, UpgradeError::NotGet | UpgradeError::VsnUnsupported)
    }
}

/// The `reason` of a join error reply (PROTOCOL.md §2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// `realtime:` with an empty sub-topic.
    TopicNameRequired,
    /// A topic longer than [`crate::limits::TOPIC_BYTES_MAX`] (powa-realtime only; upstream
    /// has no limit).
    TopicNameTooLong,
    /// The server is shutting down.
    RealtimeRestarting,
    /// The tenant was removed since the socket connected (the socket is closed afterwards).
    TenantNotFound,
    /// The tenant was suspended since the socket connected.
    RealtimeDisabledForTenant,
    /// A public join on a `private_only` tenant.
    PrivateOnly,
    /// Concurrent users limit.
    ConnectionRateLimitReached,
    /// Joins per second limit (the socket is closed afterwards).
    ClientJoinRateLimitReached,
    /// Channels per socket limit.
    ChannelRateLimitReached,
    /// Channel token expired.
    TokenExpired {
        /// `now - exp`, seconds.
        seconds_ago: i64,
    },
    /// Channel token lacks `role` or `exp`.
    MissingClaims,
    /// Channel token is not a JWT.
    MalformedJwt,
    /// Channel token signature invalid.
    JwtSignatureError,
    /// No key for the channel token.
    JwtSignerError {
        /// The `kid` looked up, if any.
        kid: Option<String>,
    },
    /// The feature needs the project database and none is configured or reachable.
    UnableToConnectToProject,
    /// Replay on a public channel.
    ReplayPublic,
    /// Private join without broadcast or presence read permission.
    Unauthorized {
        /// The sub-topic.
        sub_topic: String,
    },
    /// Replay could not run.
    ReplayFailed,
    /// Replay parameters are malformed.
    ReplayInvalid,
    /// The join payload is not an object, or anything unexpected.
    Unknown,
    /// More Postgres Changes bindings than one join may carry (beyond upstream, which has no
    /// bound).
    TooManyBindings {
        /// The limit.
        max: usize,
    },
}

impl JoinError {
    /// The reason text, `"<Code>: <message>"` as upstream sends it.
    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            JoinError::TopicNameRequired => "TopicNameRequired: You must provide a topic name".into(),
            JoinError::TopicNameTooLong => {
                format!("TopicNameTooLong: Topic name must be at most {} bytes", crate::limits::TOPIC_BYTES_MAX).into()
            }
            JoinError::RealtimeRestarting => {
                "RealtimeRestarting: Realtime is restarting, please standby".into()
            }
            JoinError::TenantNotFound => "TenantNotFound: Tenant with the given ID does not exist".into(),
            JoinError::RealtimeDisabledForTenant => "RealtimeDisabledForTenant: Realtime disabled for this tenant".into(),
            JoinError::PrivateOnly => "PrivateOnly: This project only allows private channels".into(),
            JoinError::ConnectionRateLimitReached => {
                "ConnectionRateLimitReached: Too many connected users".into()
            }
            JoinError::ClientJoinRateLimitReached => {
                "ClientJoinRateLimitReached: Too many joins per second".into()
            }
            JoinError::ChannelRateLimitReached => "ChannelRateLimitReached: Too many channels".into(),
            JoinError::TokenExpired { seconds_ago } => {
                format!("InvalidJWTToken: {}", token_expired(*seconds_ago)).into()
            }
            JoinError::MissingClaims => format!("InvalidJWTToken: {MISSING_CLAIMS}").into(),
            JoinError::MalformedJwt => format!("MalformedJWT: {NOT_JWT}").into(),
            JoinError::JwtSignatureError => format!("JwtSignatureError: {BAD_SIGNATURE}").into(),
            JoinError::JwtSignerError { kid } => {
                format!("JwtSignerError: {}", no_signer(kid.as_deref())).into()
            }
            JoinError::UnableToConnectToProject => format!(
                "UnableToConnectToProject: {DB_UNREACHABLE}"
            )
            .into(),
            JoinError::ReplayPublic => {
                "UnableToReplayMessages: Replay is not allowed for public channels".into()
            }
            JoinError::Unauthorized { sub_topic } => format!("Unauthorized: {}", no_read_permission(sub_topic)).into(),
            JoinError::ReplayFailed => "UnableToReplayMessages: Realtime was unable to replay messages".into(),
            JoinError::ReplayInvalid => "UnableToReplayMessages: Replay params are not valid".into(),
            JoinError::Unknown => "Unknown Error on Channel".into(),
            JoinError::TooManyBindings { max } => {
                format!("PostgresChangesBindingsLimit: Too many postgres_changes bindings, at most {max} per channel").into()
            }
        }
    }
}

/// Reasons of non-join error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// An event for a topic this socket has not joined (PROTOCOL.md §1.7).
    UnmatchedTopic,
    /// A broadcast over the payload limit, with `ack` (§3.2). Upstream sends a bare string as
    /// `response`, not an object.
    PayloadSizeExceeded,
    /// A presence track whose payload is not an object (§4.3).
    PresencePayloadNotMap,
}

impl ReplyError {
    /// The text.
    pub fn text(self) -> &'static str {
        match self {
            ReplyError::UnmatchedTopic => "unmatched topic",
            ReplyError::PayloadSizeExceeded => "payload_size_exceeded",
            ReplyError::PresencePayloadNotMap => "Presence track payload must be a map",
        }
    }
}

/// Messages of `system` pushes that close a channel (PROTOCOL.md §9.4) and notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemMessage {
    /// Token refresh or re-check found the token expired.
    TokenExpired {
        /// `now - exp`, seconds.
        seconds_ago: i64,
    },
    /// Refreshed token lacks claims.
    MissingClaims,
    /// Refreshed token is not a JWT.
    NotJwt,
    /// Refreshed token has a bad signature.
    BadSignature,
    /// No signer for a refreshed token.
    NoSigner {
        /// The `kid`, if any.
        kid: Option<String>,
    },
    /// Tenant events per second exceeded.
    TooManyMessages,
    /// Tenant presence events per second exceeded.
    TooManyPresenceMessages,
    /// Per-channel presence rate exceeded.
    ClientPresenceRateLimit,
    /// Presence payload too large.
    TrackMessageSizeExceeded,
    /// Shutdown notice (ok status), followed by close 1012.
    ServerRequestedDisconnect,
    /// A refreshed token grants no read on a private channel.
    NoReadPermission {
        /// The sub-topic.
        sub_topic: String,
    },
    /// A refreshed token lost a read permission it had.
    ReadPermissionRevoked {
        /// The sub-topic.
        sub_topic: String,
    },
    /// A policy re-check could not run.
    DatabaseUnreachable,
    /// A database query got no answer within its deadline and was abandoned (PROTOCOL.md §6.3
    /// lists the text); used in the `errors` of a Postgres change whose RLS check timed out.
    QueryCancelled,
}

impl SystemMessage {
    /// The text.
    pub fn text(&self) -> Cow<'static, str> {
        match self {
            SystemMessage::TokenExpired { seconds_ago } => token_expired(*seconds_ago).into(),
            SystemMessage::MissingClaims => MISSING_CLAIMS.into(),
            SystemMessage::NotJwt => NOT_JWT.into(),
            SystemMessage::BadSignature => BAD_SIGNATURE.into(),
            SystemMessage::NoSigner { kid } => no_signer(kid.as_deref()),
            SystemMessage::TooManyMessages => "Too many messages per second".into(),
            SystemMessage::TooManyPresenceMessages => "Too many presence messages per second".into(),
            SystemMessage::ClientPresenceRateLimit => "Client presence rate limit exceeded".into(),
            SystemMessage::TrackMessageSizeExceeded => "Track message size exceeded".into(),
            SystemMessage::ServerRequestedDisconnect => "Server requested disconnect".into(),
            SystemMessage::NoReadPermission { sub_topic } => no_read_permission(sub_topic).into(),
            SystemMessage::ReadPermissionRevoked { sub_topic } => format!("You no longer have permission to read from this Channel topic: {sub_topic}").into(),
            SystemMessage::DatabaseUnreachable => DB_UNREACHABLE.into(),
            SystemMessage::QueryCancelled => "Query was cancelled, please try again".into(),
        }
    }

    /// `"ok"` for notices, `"error"` for the closing messages.
    pub fn status(&self) -> &'static str {
        match self {
            SystemMessage::ServerRequestedDisconnect => "ok",
            _ => "error",
        }
    }
}

/// WebSocket close reasons the server sends (code, reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed: echo a normal close.
    Normal,
    /// No frame received for the idle timeout.
    IdleTimeout,
    /// A message over the frame limit.
    MessageTooBig,
    /// A WebSocket protocol violation (unmasked client frame, bad opcode, ...).
    ProtocolError,
    /// A text message that is not valid UTF-8 (RFC 6455 §8.1).
    InvalidPayload,
    /// The outbound queue overflowed.
    SlowConsumer,
    /// The joins-per-second limit closed the socket.
    GoingAway,
    /// Shutdown.
    ServiceRestart,
}

impl CloseReason {
    /// WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Normal | CloseReason::IdleTimeout => 1000,
            CloseReason::MessageTooBig => 1009,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidPayload => 1007,
            CloseReason::SlowConsumer => 1008,
            CloseReason::GoingAway => 1001,
            CloseReason::ServiceRestart => 1012,
        }
    }

    /// Close reason text (at most 123 bytes).
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Normal => "",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::MessageTooBig => "message too big",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::InvalidPayload => "invalid UTF-8 in a text message",
            CloseReason::SlowConsumer => "slow consumer: outbound queue full",
            CloseReason::GoingAway => "going away",
            CloseReason::ServiceRestart => "server restarting",
        }
    }
}

/// The reason phrase of an HTTP status line (RFC 9110 §15); statuses the server never sends
/// read as 500's phrase.
pub fn http_reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Bodies of plain HTTP answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMessage {
    /// 404 for unknown paths.
    NotFound,
    /// 400 for a GET on a WebSocket path without upgrade headers.
    UpgradeRequired,
    /// 401 for `GET /api/status` without a valid service-role key.
    ServiceRoleRequired,
    /// 503 from `/healthz` while the database connection is down.
    DatabaseUnavailable,
}

impl HttpMessage {
    /// The text.
    pub fn text(self) -> &'static str {
        match self {
            HttpMessage::NotFound => "Not found",
            HttpMessage::UpgradeRequired => "WebSocket upgrade required",
            HttpMessage::ServiceRoleRequired => "A valid service_role key is required",
            HttpMessage::DatabaseUnavailable => "database unavailable",
        }
    }
}

/// `system` error texts about one Postgres Changes binding (PROTOCOL.md §5.1–5.4): upstream's
/// texts, byte for byte, plus what to run where we go beyond upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingError {
    /// Neither `schema` nor `table` (or a non-string one); `shown` is the binding as Elixir
    /// prints it (or `<redacted>`).
    NoSubscriptionParams {
        /// The binding, rendered.
        shown: String,
    },
    /// `select` is not a list of strings.
    SelectInvalid,
    /// `select` on a wildcard binding.
    SelectOnWildcard,
    /// The filter does not parse; `detail` is upstream's rendering of the bad part.
    FilterParse {
        /// Upstream's detail (an Elixir list of the offending pieces).
        detail: String,
    },
    /// `a=eq.1,,b=eq.2`.
    FilterEmptySegment,
    /// `in` without parentheses.
    FilterInNeedsParentheses,
    /// No published table matches. `params` is upstream's rendering of the binding; `fix`
    /// says what to run (beyond upstream: the subscription then starts by itself).
    NotPublished {
        /// The binding, rendered.
        params: String,
        /// What is missing.
        fix: NotPublishedFix,
    },
    /// The database check refused the binding (§5.4), with the exception's text.
    Exception {
        /// The binding, rendered.
        params: String,
        /// The exception (one of [`BindingException`]'s texts, or the database's own).
        exception: String,
    },
}

/// What a binding whose table is not published needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotPublishedFix {
    /// A wildcard matched no published table.
    Wildcard,
    /// The table (quoted as needed) is not in the publication.
    AddTable(String),
    /// The publication does not exist; the table to create it for.
    CreatePublication(String),
}

impl BindingError {
    /// The text.
    pub fn text(&self) -> String {
        match self {
            BindingError::NoSubscriptionParams { shown } => {
                format!("No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {shown}")
            }
            BindingError::SelectInvalid => {
                "Error parsing `select` params: expected a list of column name strings, e.g. select: [\"col1\", \"col2\"]".into()
            }
            BindingError::SelectOnWildcard => {
                "Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.".into()
            }
            BindingError::FilterParse { detail } => format!("{FILTER_PARSE}{detail}"),
            BindingError::FilterEmptySegment => format!("{FILTER_PARSE}filter must not contain empty segments (check for extra commas)"),
            BindingError::FilterInNeedsParentheses => format!("{FILTER_PARSE}`in` filter value must be wrapped by parentheses"),
            BindingError::NotPublished { params, fix } => {
                let prefix = format!("Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {params}");
                match fix {
                    NotPublishedFix::Wildcard => format!("{prefix}. No table of the supabase_realtime publication matches; add one with ALTER PUBLICATION supabase_realtime ADD TABLE <schema>.<table>; and this subscription starts by itself"),
                    NotPublishedFix::AddTable(table) => format!("{prefix}. Table {table} is not in the supabase_realtime publication; run ALTER PUBLICATION supabase_realtime ADD TABLE {table}; and this subscription starts by itself"),
                    NotPublishedFix::CreatePublication(table) => format!("{prefix}. The supabase_realtime publication does not exist; run CREATE PUBLICATION supabase_realtime FOR TABLE {table}; and this subscription starts by itself"),
                }
            }
            BindingError::Exception { params, exception } => format!(
                "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {params}. Exception: {exception}"
            ),
        }
    }
}

/// The exception texts our own checks produce for [`BindingError::Exception`] (upstream gets
/// them from the database; ours mirror PostgreSQL's wording).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingException {
    /// A filter value does not parse as the column's type.
    InvalidInput {
        /// PostgreSQL's name of the type (`integer`, `uuid`, ...).
        type_label: String,
        /// The value.
        text: String,
    },
    /// An `in` list that is not a valid array literal body.
    MalformedArrayLiteral {
        /// The list body.
        body: String,
    },
    /// An `in` list over the limit.
    TooManyInValues {
        /// The limit.
        max: usize,
    },
    /// `like`/`match` family on a non-text column.
    OperatorNeedsText {
        /// Operator name.
        op: &'static str,
        /// Column type.
        type_name: String,
    },
    /// A `match`/`imatch` pattern that does not compile.
    InvalidRegex {
        /// Operator name.
        op: &'static str,
        /// The regex library's explanation.
        error: String,
    },
    /// `is.<something else>`.
    InvalidIsValue,
    /// `is.true` (etc.) on a non-boolean column.
    IsNeedsBoolean {
        /// `true`, `false` or `unknown`.
        keyword: String,
        /// Column type.
        type_name: String,
    },
    /// A filter on a column the role cannot read (or that does not exist).
    InvalidFilterColumn {
        /// Column.
        column: String,
    },
    /// A `select` column the role cannot read (or that does not exist).
    InvalidSelectColumn {
        /// Column.
        column: String,
    },
    /// The channel token's role does not exist.
    RoleMissing {
        /// Role.
        role: String,
    },
}

impl BindingException {
    /// The text.
    pub fn text(&self) -> String {
        match self {
            BindingException::InvalidInput { type_label, text } => format!("invalid input syntax for type {type_label}: \"{text}\""),
            BindingException::MalformedArrayLiteral { body } => format!("malformed array literal: \"{{{body}}}\""),
            BindingException::TooManyInValues { max } => format!("too many values for `in` filter. Maximum {max}"),
            BindingException::OperatorNeedsText { op, type_name } => format!("operator {op} requires a text-compatible column type, got {type_name}"),
            BindingException::InvalidRegex { op, error } => format!("invalid regular expression for {op} filter: {error}"),
            BindingException::InvalidIsValue => "invalid value for is filter: must be null, true, false, or unknown".into(),
            BindingException::IsNeedsBoolean { keyword, type_name } => format!("is {keyword} filter requires a boolean column, got {type_name}"),
            BindingException::InvalidFilterColumn { column } => format!("invalid column for filter {column}"),
            BindingException::InvalidSelectColumn { column } => format!("invalid column for select {column}"),
            BindingException::RoleMissing { role } => format!("role \"{role}\" does not exist"),
        }
    }
}

/// Entries of a change's `errors` array (PROTOCOL.md §5.5, §5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowError {
    /// The table has no primary key (INSERT/UPDATE).
    NoPrimaryKey,
    /// The role cannot read every primary-key column.
    Unauthorized,
    /// The record was cut down to fields of at most 64 bytes.
    PayloadTooLarge,
}

impl RowError {
    /// The text.
    pub fn text(self) -> &'static str {
        match self {
            RowError::NoPrimaryKey => "Error 400: Bad Request, no primary key",
            RowError::Unauthorized => "Error 401: Unauthorized",
            RowError::PayloadTooLarge => "Error 413: Payload Too Large",
        }
    }
}

/// REST broadcast answers (PROTOCOL.md §8): `{"message": ...}` bodies, `{"error": ...}` for the
/// media type, and the per-field texts of 422 `{"errors": {...}}` bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestError {
    /// 401, or 403 for a denied private message.
    Unauthorized,
    /// 422: the write check of a private message failed.
    RlsPolicyError,
    /// 422: a private message and no database.
    TenantDatabaseUnavailable,
    /// 415 (`error` key).
    UnsupportedMediaType,
    /// 401: the Host names no tenant.
    TenantNotFound,
    /// 403: the tenant is suspended.
    TenantSuspended,
    /// 429: the tenant is above its events-per-second limit.
    TooManyRequests,
    /// Field error: missing or empty.
    Blank,
    /// Field error: wrong type.
    Invalid,
    /// Field error: payload over the limit.
    PayloadTooLarge,
}

impl RestError {
    /// The text.
    pub fn text(self) -> &'static str {
        match self {
            RestError::Unauthorized => "Unauthorized",
            RestError::RlsPolicyError => "RLS policy error",
            RestError::TenantDatabaseUnavailable => "Tenant database unavailable",
            RestError::UnsupportedMediaType => "Unsupported Media Type. Use application/json or application/octet-stream",
            RestError::TenantNotFound => "Tenant not found in database",
            RestError::TenantSuspended => "Tenant is suspended",
            RestError::TooManyRequests => "Too many requests",
            RestError::Blank => "can't be blank",
            RestError::Invalid => "is invalid",
            RestError::PayloadTooLarge => "Payload size exceeds tenant limit",
        }
    }
}

const FILTER_PARSE: &str = "Error parsing `filter` params: ";

/// `system` messages of Postgres Changes (extension `postgres_changes`, PROTOCOL.md §5.4) that
/// are not about one binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesNotice {
    /// The subscription is live (upstream's text).
    Subscribed,
    /// The replication stream dropped; a new `Subscribed` follows when it is back.
    StreamLost {
        /// What the database or the connection said.
        reason: String,
    },
    /// The replication stream stopped for good on a definite error (the server's configuration
    /// must be fixed; the operator's log says how).
    StreamStopped,
    /// The replication slot had to be recreated (the server was away too long, too much WAL
    /// was pending, or the slot was gone): changes committed meanwhile were not delivered.
    ChangesMissed,
}

impl ChangesNotice {
    /// The text.
    pub fn text(&self) -> Cow<'static, str> {
        match self {
            ChangesNotice::Subscribed => SUBSCRIBED.into(),
            ChangesNotice::StreamLost { reason } => format!(
                "The replication connection to the database was lost ({reason}); changes are not delivered until it is back, when a new \"{SUBSCRIBED}\" follows"
            )
            .into(),
            ChangesNotice::StreamStopped => "Postgres Changes stopped: the server cannot use its database connection settings; changes are not delivered until the server is reconfigured and restarted".into(),
            ChangesNotice::ChangesMissed => "Changes committed while the replication stream was down were missed (the server was away too long or too much WAL was pending); refetch the data".into(),
        }
    }

    /// `"ok"` or `"error"`.
    pub fn status(&self) -> &'static str {
        match self {
            ChangesNotice::Subscribed => "ok",
            ChangesNotice::StreamLost { .. } | ChangesNotice::StreamStopped | ChangesNotice::ChangesMissed => "error",
        }
    }
}

const SUBSCRIBED: &str = "Subscribed to PostgreSQL";

/// Bounds on client-driven Postgres Changes work (beyond upstream, which has none of these):
/// each is reported like the parse error of the same binding, as a `system` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesLimit {
    /// A binding's `filter` string is longer than the limit.
    FilterTooLong {
        /// Its length in bytes.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A `like`/`ilike`/`match`/`imatch` pattern compiles to more than the regex size limit.
    PatternTooComplex {
        /// The operator's name.
        op: &'static str,
        /// The limit in bytes of compiled program.
        max: usize,
    },
}

impl ChangesLimit {
    /// The text, in the shape of upstream's filter parse errors.
    pub fn text(&self) -> String {
        match self {
            ChangesLimit::FilterTooLong { bytes, max } => {
                format!("{FILTER_PARSE}the filter is {bytes} bytes long; at most {max} bytes are allowed")
            }
            ChangesLimit::PatternTooComplex { op, max } => {
                format!("the pattern of the {op} filter is too complex (its compiled form exceeds {max} bytes); use a shorter pattern")
            }
        }
    }
}

const NOT_JWT: &str = "The token provided is not a valid JWT";
const BAD_SIGNATURE: &str = "Failed to validate JWT signature";
const MISSING_CLAIMS: &str = "Fields `role` and `exp` are required in JWT";
const DB_UNREACHABLE: &str = "Realtime was unable to connect to the project database";

fn no_read_permission(sub_topic: &str) -> String {
    format!("You do not have permissions to read from this Channel topic: {sub_topic}")
}

fn token_expired(seconds_ago: i64) -> String {
    format!("Token has expired {seconds_ago} seconds ago")
}

fn no_signer(kid: Option<&str>) -> Cow<'static, str> {
    match kid {
        Some(kid) => format!(
            "Failed to generate JWT signer for key ID (kid) \"{kid}\", check your JWT secret or JWKS configuration"
        )
        .into(),
        None => "Failed to generate JWT signer, check your JWT secret or JWKS configuration".into(),
    }
}

/// While the server drains (CONTRACT.md "Shutdown"): the `/healthz` body (503, plain text) and
/// the REST `message` (503).
pub const DRAINING: &str = "draining";

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden list: every client-visible string, byte for byte as PROTOCOL.md gives it.
    #[test]
    fn golden_strings() {
        let upgrade = [
            (UpgradeError::TenantNotFound, 404, "Tenant not found"),
            (UpgradeError::TenantSuspended, 403, "Realtime was disabled for this tenant"),
            (UpgradeError::ApiKeyMissing, 401, "API key is missing"),
            (UpgradeError::NotJwt, 401, "The token provided is not a valid JWT"),
            (UpgradeError::NoSigner { kid: None }, 401, "Failed to generate JWT signer, check your JWT secret or JWKS configuration"),
            (UpgradeError::NoSigner { kid: Some("k1".into()) }, 401, "Failed to generate JWT signer for key ID (kid) \"k1\", check your JWT secret or JWKS configuration"),
            (UpgradeError::BadSignature, 401, "Failed to validate JWT signature"),
            (UpgradeError::Expired, 401, "Token has expired"),
            (UpgradeError::MissingClaims, 401, "Fields `role` and `exp` are required in JWT"),
            (UpgradeError::TooManyUsers, 429, "Too many connected users"),
            (UpgradeError::TooManyJoins, 429, "Too many joins per second"),
            (UpgradeError::Internal, 500, "Error connecting to Realtime"),
        ];
        for (error, status, text) in upgrade {
            assert_eq!(error.status(), status);
            assert_eq!(error.message().unwrap(), text);
            assert!(error.delayed());
        }
        assert_eq!(UpgradeError::NotGet.status(), 400);
        assert_eq!(UpgradeError::VsnUnsupported.status(), 403);
        assert_eq!(UpgradeError::VsnUnsupported.message(), None);

        let join = [
            (JoinError::TopicNameRequired, "TopicNameRequired: You must provide a topic name"),
            (JoinError::TopicNameTooLong, "TopicNameTooLong: Topic name must be at most 255 bytes"),
            (JoinError::RealtimeRestarting, "RealtimeRestarting: Realtime is restarting, please standby"),
            (JoinError::TenantNotFound, "TenantNotFound: Tenant with the given ID does not exist"),
            (JoinError::RealtimeDisabledForTenant, "RealtimeDisabledForTenant: Realtime disabled for this tenant"),
            (JoinError::PrivateOnly, "PrivateOnly: This project only allows private channels"),
            (JoinError::ConnectionRateLimitReached, "ConnectionRateLimitReached: Too many connected users"),
            (JoinError::ClientJoinRateLimitReached, "ClientJoinRateLimitReached: Too many joins per second"),
            (JoinError::ChannelRateLimitReached, "ChannelRateLimitReached: Too many channels"),
            (JoinError::TokenExpired { seconds_ago: 30 }, "InvalidJWTToken: Token has expired 30 seconds ago"),
            (JoinError::MissingClaims, "InvalidJWTToken: Fields `role` and `exp` are required in JWT"),
            (JoinError::MalformedJwt, "MalformedJWT: The token provided is not a valid JWT"),
            (JoinError::JwtSignatureError, "JwtSignatureError: Failed to validate JWT signature"),
            (JoinError::JwtSignerError { kid: None }, "JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration"),
            (JoinError::JwtSignerError { kid: Some("abc".into()) }, "JwtSignerError: Failed to generate JWT signer for key ID (kid) \"abc\", check your JWT secret or JWKS configuration"),
            (JoinError::UnableToConnectToProject, "UnableToConnectToProject: Realtime was unable to connect to the project database"),
            (JoinError::ReplayPublic, "UnableToReplayMessages: Replay is not allowed for public channels"),
            (JoinError::Unauthorized { sub_topic: "room-1".into() }, "Unauthorized: You do not have permissions to read from this Channel topic: room-1"),
            (JoinError::ReplayFailed, "UnableToReplayMessages: Realtime was unable to replay messages"),
            (JoinError::ReplayInvalid, "UnableToReplayMessages: Replay params are not valid"),
            (JoinError::Unknown, "Unknown Error on Channel"),
            (JoinError::TooManyBindings { max: 100 }, "PostgresChangesBindingsLimit: Too many postgres_changes bindings, at most 100 per channel"),
        ];
        for (error, text) in join {
            assert_eq!(error.reason(), text);
        }

        let phrases = [
            (200, "OK"), (201, "Created"), (202, "Accepted"), (204, "No Content"), (400, "Bad Request"), (401, "Unauthorized"),
            (403, "Forbidden"), (404, "Not Found"), (405, "Method Not Allowed"), (411, "Length Required"), (413, "Payload Too Large"),
            (415, "Unsupported Media Type"), (422, "Unprocessable Entity"), (429, "Too Many Requests"),
            (431, "Request Header Fields Too Large"), (503, "Service Unavailable"), (500, "Internal Server Error"), (599, "Internal Server Error"),
        ];
        for (status, phrase) in phrases {
            assert_eq!(http_reason_phrase(status), phrase);
        }
        assert_eq!(HttpMessage::NotFound.text(), "Not found");
        assert_eq!(HttpMessage::UpgradeRequired.text(), "WebSocket upgrade required");
        assert_eq!(HttpMessage::ServiceRoleRequired.text(), "A valid service_role key is required");

        assert_eq!(ReplyError::UnmatchedTopic.text(), "unmatched topic");
        assert_eq!(ReplyError::PayloadSizeExceeded.text(), "payload_size_exceeded");
        assert_eq!(ReplyError::PresencePayloadNotMap.text(), "Presence track payload must be a map");

        let system = [
            (SystemMessage::TokenExpired { seconds_ago: 2 }, "error", "Token has expired 2 seconds ago"),
            (SystemMessage::MissingClaims, "error", "Fields `role` and `exp` are required in JWT"),
            (SystemMessage::NotJwt, "error", "The token provided is not a valid JWT"),
            (SystemMessage::BadSignature, "error", "Failed to validate JWT signature"),
            (SystemMessage::TooManyMessages, "error", "Too many messages per second"),
            (SystemMessage::TooManyPresenceMessages, "error", "Too many presence messages per second"),
            (SystemMessage::ClientPresenceRateLimit, "error", "Client presence rate limit exceeded"),
            (SystemMessage::TrackMessageSizeExceeded, "error", "Track message size exceeded"),
            (SystemMessage::ServerRequestedDisconnect, "ok", "Server requested disconnect"),
            (SystemMessage::NoReadPermission { sub_topic: "r".into() }, "error", "You do not have permissions to read from this Channel topic: r"),
            (SystemMessage::ReadPermissionRevoked { sub_topic: "r".into() }, "error", "You no longer have permission to read from this Channel topic: r"),
            (SystemMessage::DatabaseUnreachable, "error", "Realtime was unable to connect to the project database"),
            (SystemMessage::QueryCancelled, "error", "Query was cancelled, please try again"),
        ];
        for (message, status, text) in system {
            assert_eq!(message.status(), status);
            assert_eq!(message.text(), text);
        }
        let close = [
            (CloseReason::Normal, 1000, ""),
            (CloseReason::IdleTimeout, 1000, "idle timeout"),
            (CloseReason::MessageTooBig, 1009, "message too big"),
            (CloseReason::ProtocolError, 1002, "protocol error"),
            (CloseReason::InvalidPayload, 1007, "invalid UTF-8 in a text message"),
            (CloseReason::SlowConsumer, 1008, "slow consumer: outbound queue full"),
            (CloseReason::GoingAway, 1001, "going away"),
            (CloseReason::ServiceRestart, 1012, "server restarting"),
        ];
        for (reason, code, text) in close {
            assert_eq!(reason.code(), code);
            assert_eq!(reason.text(), text);
            assert!(reason.text().len() <= 123);
        }
    }

    #[test]
    fn draining_string() {
        assert_eq!(DRAINING, "draining");
        let bindings = [
            (BindingError::NoSubscriptionParams { shown: "<redacted>".into() }, "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: <redacted>"),
            (BindingError::SelectInvalid, "Error parsing `select` params: expected a list of column name strings, e.g. select: [\"col1\", \"col2\"]"),
            (BindingError::SelectOnWildcard, "Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name."),
            (BindingError::FilterParse { detail: "[\"eq5\"]".into() }, "Error parsing `filter` params: [\"eq5\"]"),
            (BindingError::FilterEmptySegment, "Error parsing `filter` params: filter must not contain empty segments (check for extra commas)"),
            (BindingError::FilterInNeedsParentheses, "Error parsing `filter` params: `in` filter value must be wrapped by parentheses"),
            (
                BindingError::NotPublished { params: "P".into(), fix: NotPublishedFix::Wildcard },
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: P. No table of the supabase_realtime publication matches; add one with ALTER PUBLICATION supabase_realtime ADD TABLE <schema>.<table>; and this subscription starts by itself",
            ),
            (
                BindingError::NotPublished { params: "P".into(), fix: NotPublishedFix::AddTable("public.t".into()) },
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: P. Table public.t is not in the supabase_realtime publication; run ALTER PUBLICATION supabase_realtime ADD TABLE public.t; and this subscription starts by itself",
            ),
            (
                BindingError::NotPublished { params: "P".into(), fix: NotPublishedFix::CreatePublication("public.t".into()) },
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: P. The supabase_realtime publication does not exist; run CREATE PUBLICATION supabase_realtime FOR TABLE public.t; and this subscription starts by itself",
            ),
            (
                BindingError::Exception { params: "P".into(), exception: "E".into() },
                "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: P. Exception: E",
            ),
        ];
        for (error, text) in bindings {
            assert_eq!(error.text(), text);
        }
        let exceptions = [
            (BindingException::InvalidInput { type_label: "integer".into(), text: "abc".into() }, "invalid input syntax for type integer: \"abc\""),
            (BindingException::MalformedArrayLiteral { body: "a,\"b".into() }, "malformed array literal: \"{a,\"b}\""),
            (BindingException::TooManyInValues { max: 100 }, "too many values for `in` filter. Maximum 100"),
            (BindingException::OperatorNeedsText { op: "like", type_name: "int4".into() }, "operator like requires a text-compatible column type, got int4"),
            (BindingException::InvalidRegex { op: "match", error: "X".into() }, "invalid regular expression for match filter: X"),
            (BindingException::InvalidIsValue, "invalid value for is filter: must be null, true, false, or unknown"),
            (BindingException::IsNeedsBoolean { keyword: "true".into(), type_name: "int4".into() }, "is true filter requires a boolean column, got int4"),
            (BindingException::InvalidFilterColumn { column: "nope".into() }, "invalid column for filter nope"),
            (BindingException::InvalidSelectColumn { column: "nope".into() }, "invalid column for select nope"),
            (BindingException::RoleMissing { role: "ghost".into() }, "role \"ghost\" does not exist"),
        ];
        for (exception, text) in exceptions {
            assert_eq!(exception.text(), text);
        }
        assert_eq!(RowError::NoPrimaryKey.text(), "Error 400: Bad Request, no primary key");
        assert_eq!(RowError::Unauthorized.text(), "Error 401: Unauthorized");
        assert_eq!(RowError::PayloadTooLarge.text(), "Error 413: Payload Too Large");
        let rest = [
            (RestError::Unauthorized, "Unauthorized"),
            (RestError::RlsPolicyError, "RLS policy error"),
            (RestError::TenantDatabaseUnavailable, "Tenant database unavailable"),
            (RestError::UnsupportedMediaType, "Unsupported Media Type. Use application/json or application/octet-stream"),
            (RestError::TenantNotFound, "Tenant not found in database"),
            (RestError::TenantSuspended, "Tenant is suspended"),
            (RestError::TooManyRequests, "Too many requests"),
            (RestError::Blank, "can't be blank"),
            (RestError::Invalid, "is invalid"),
            (RestError::PayloadTooLarge, "Payload size exceeds tenant limit"),
        ];
        for (error, text) in rest {
            assert_eq!(error.text(), text);
        }
        assert_eq!(HttpMessage::DatabaseUnavailable.text(), "database unavailable");
        let notices = [
            (ChangesNotice::Subscribed, "ok", "Subscribed to PostgreSQL"),
            (ChangesNotice::StreamLost { reason: "EOF".into() }, "error", "The replication connection to the database was lost (EOF); changes are not delivered until it is back, when a new \"Subscribed to PostgreSQL\" follows"),
            (ChangesNotice::StreamStopped, "error", "Postgres Changes stopped: the server cannot use its database connection settings; changes are not delivered until the server is reconfigured and restarted"),
            (ChangesNotice::ChangesMissed, "error", "Changes committed while the replication stream was down were missed (the server was away too long or too much WAL was pending); refetch the data"),
        ];
        for (notice, status, text) in notices {
            assert_eq!((notice.status(), notice.text().as_ref()), (status, text));
        }
        let changes_limits = [
            (ChangesLimit::FilterTooLong { bytes: 5000, max: 4096 }, "Error parsing `filter` params: the filter is 5000 bytes long; at most 4096 bytes are allowed"),
            (ChangesLimit::PatternTooComplex { op: "like", max: 262_144 }, "the pattern of the like filter is too complex (its compiled form exceeds 262144 bytes); use a shorter pattern"),
        ];
        for (limit, text) in changes_limits {
            assert_eq!(limit.text(), text);
        }
        assert_eq!(CloseReason::IdleTimeout.code(), 1000);
        assert_eq!(CloseReason::MessageTooBig.code(), 1009);
        assert!(CloseReason::SlowConsumer.text().len() <= 123);
    }
}
