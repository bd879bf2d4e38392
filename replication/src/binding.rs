//! Postgres Changes bindings (PROTOCOL.md §5.1, §5.3): the accepted shapes, `select`, the ids
//! of the join reply (§2.6), and the texts of `system` error messages (§5.4).

use engine::client_error::{BindingError, NotPublishedFix};
use serde_json::{Map, Value};

use crate::filter::{self, RawFilter};

/// Which changes a binding wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    /// `*`
    All,
    /// `INSERT`
    Insert,
    /// `UPDATE`
    Update,
    /// `DELETE`
    Delete,
}

impl EventFilter {
    fn parse(value: Option<&Value>) -> EventFilter {
        match value.and_then(Value::as_str).map(str::to_ascii_uppercase).as_deref() {
            Some("INSERT") => EventFilter::Insert,
            Some("UPDATE") => EventFilter::Update,
            Some("DELETE") => EventFilter::Delete,
            _ => EventFilter::All,
        }
    }

    /// As printed in messages.
    pub fn name(self) -> &'static str {
        match self {
            EventFilter::All => "*",
            EventFilter::Insert => "INSERT",
            EventFilter::Update => "UPDATE",
            EventFilter::Delete => "DELETE",
        }
    }
}

/// A binding that passed the shape checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The id echoed in the join reply and in change messages.
    pub id: u32,
    /// Event.
    pub event: EventFilter,
    /// Schema name or `*`.
    pub schema: String,
    /// Table name or `*`.
    pub table: String,
    /// Parsed filters (AND).
    pub filters: Vec<RawFilter>,
    /// Selected columns (primary-key columns are always added); `None` = all.
    pub select: Option<Vec<String>>,
}

impl Binding {
    /// `[event: *, schema: public, table: todos, filters: [], select: nil]`, as upstream prints it.
    pub fn params(&self) -> String {
        let select = match &self.select {
            None => "nil".to_string(),
            Some(columns) => format!("[{}]", columns.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ")),
        };
        format!(
            "[event: {}, schema: {}, table: {}, filters: {}, select: {}]",
            self.event.name(),
            self.schema,
            self.table,
            filter::render(&self.filters),
            select
        )
    }

    /// Whether the binding names every schema or table.
    pub fn is_wildcard(&self) -> bool {
        self.schema == "*" || self.table == "*"
    }
}

/// The id of a binding: a stable non-zero 31-bit hash of its canonical JSON (keys sorted), so
/// two identical bindings on one channel get the same id (PROTOCOL.md §2.6).
pub fn binding_id(raw: &Map<String, Value>) -> u32 {
    let canonical = serde_json::to_string(raw).expect("a JSON map serialises");
    engine::changes::binding_id(canonical.as_bytes())
}

/// Renders a JSON value as Elixir's `inspect` would print the decoded term.
fn inspect(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!("[{}]", items.iter().map(inspect).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "%{{{}}}",
            map.iter().map(|(k, v)| format!("{k:?} => {}", inspect(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Validates one binding's shape (§5.1), its filter (§5.2) and its `select` (§5.3). The error
/// is the `system` message text.
pub fn parse_binding(raw: &Map<String, Value>) -> Result<Binding, String> {
    let id = binding_id(raw);
    let string = |key: &str| raw.get(key).and_then(Value::as_str);
    let (has_schema, has_table, has_filter) = (raw.contains_key("schema"), raw.contains_key("table"), raw.contains_key("filter"));
    let (schema, table, filter) = match (string("schema"), string("table"), string("filter")) {
        (Some(schema), Some(table), Some(filter)) => (schema, table, filter),
        (Some(schema), Some(table), None) if !has_filter => (schema, table, ""),
        (Some(schema), None, None) if !has_table && !has_filter => (schema, "*", ""),
        (None, Some(table), None) if !has_schema && !has_filter => ("public", table, ""),
        _ => {
            let shown = if raw.contains_key("user_token") || raw.contains_key("auth_token") {
                "<redacted>".to_string()
            } else {
                inspect(&Value::Object(raw.clone()))
            };
            return Err(BindingError::NoSubscriptionParams { shown }.text());
        }
    };
    let filters = filter::parse(filter).map_err(|e| e.0)?;
    let select = match raw.get("select") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let columns: Vec<String> = items.iter().filter_map(Value::as_str).map(str::to_string).collect();
            (!columns.is_empty()).then_some(columns)
        }
        Some(_) => {
            return Err(BindingError::SelectInvalid.text())
        }
    };
    let binding = Binding { id, event: EventFilter::parse(raw.get("event")), schema: schema.into(), table: table.into(), filters, select };
    if binding.select.is_some() && binding.is_wildcard() {
        return Err(BindingError::SelectOnWildcard.text());
    }
    Ok(binding)
}

/// [`parse_binding`] for a binding carried as JSON object text ([`engine::changes::Subscription`]).
pub fn parse_binding_text(text: &str) -> Result<Binding, String> {
    match auth::plain_json::from_str(text) {
        Ok(Value::Object(raw)) => parse_binding(&raw),
        // The session serialises a JSON object, so this is not reached; still an answer, not a panic.
        _ => Err(BindingError::NoSubscriptionParams { shown: "<invalid JSON>".into() }.text()),
    }
}

/// `system` message for a binding that matches no published table (upstream's text), followed by
/// what to run (beyond upstream: the subscription then starts by itself).
pub fn not_published_message(binding: &Binding, publication_exists: bool) -> String {
    let table = || format!("{}.{}", quote_ident(&binding.schema), quote_ident(&binding.table));
    let fix = if binding.is_wildcard() {
        NotPublishedFix::Wildcard
    } else if publication_exists {
        NotPublishedFix::AddTable(table())
    } else {
        NotPublishedFix::CreatePublication(table())
    };
    BindingError::NotPublished { params: binding.params(), fix }.text()
}

/// `system` message for a binding the database check refused (§5.4).
pub fn exception_message(binding: &Binding, exception: &str) -> String {
    BindingError::Exception { params: binding.params(), exception: exception.to_string() }.text()
}

/// Quotes an identifier for SQL (and for messages), only when needed.
pub fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Binding, String> {
        parse_binding(value.as_object().unwrap())
    }

    #[test]
    fn accepted_shapes() {
        let b = parse(json!({"event":"insert","schema":"public","table":"todos","filter":"id=eq.1"})).unwrap();
        assert_eq!((b.event, b.schema.as_str(), b.table.as_str(), b.filters.len()), (EventFilter::Insert, "public", "todos", 1));
        let b = parse(json!({"schema":"public"})).unwrap();
        assert_eq!(b.table, "*");
        let b = parse(json!({"table":"todos","event":"nope"})).unwrap();
        assert_eq!((b.schema.as_str(), b.event), ("public", EventFilter::All));
        assert_eq!(b.params(), "[event: *, schema: public, table: todos, filters: [], select: nil]");
    }

    #[test]
    fn refused_shapes() {
        let err = parse(json!({"event":"*","schema":"public","table":"t","filter":null})).unwrap_err();
        assert_eq!(err, r#"No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: %{"event" => "*", "filter" => nil, "schema" => "public", "table" => "t"}"#);
        let err = parse(json!({"schema":"public","filter":"id=eq.1"})).unwrap_err();
        assert!(err.starts_with("No subscription params provided."));
        let err = parse(json!({"user_token":"x"})).unwrap_err();
        assert!(err.ends_with(": <redacted>"));
        assert_eq!(parse(json!({"schema":"public","table":"t","select":"id"})).unwrap_err(), "Error parsing `select` params: expected a list of column name strings, e.g. select: [\"col1\", \"col2\"]");
        assert_eq!(parse(json!({"schema":"*","table":"t","select":["id"]})).unwrap_err(), "Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.");
        assert_eq!(parse(json!({"schema":"public","table":"t","filter":"id=eq5"})).unwrap_err(), r#"Error parsing `filter` params: ["eq5"]"#);
    }

    #[test]
    fn ids_are_stable_nonzero_31_bit() {
        let a = json!({"event":"*","schema":"public","table":"todos"});
        let b = json!({"table":"todos","schema":"public","event":"*"});
        assert_eq!(binding_id(a.as_object().unwrap()), binding_id(b.as_object().unwrap()));
        let other = json!({"event":"INSERT","schema":"public","table":"todos"});
        assert_ne!(binding_id(a.as_object().unwrap()), binding_id(other.as_object().unwrap()));
        assert!(binding_id(a.as_object().unwrap()) < 1 << 31);
        let b = parse(json!({"schema":"public","table":"t","select":["id","title"],"filter":"id=in.(1,2)"})).unwrap();
        assert_eq!(b.params(), r#"[event: *, schema: public, table: t, filters: [{"id", "in", "{1,2}", false}], select: ["id", "title"]]"#);
    }

    #[test]
    fn messages_name_the_fix() {
        let b = parse(json!({"schema":"public","table":"notes"})).unwrap();
        let message = not_published_message(&b, true);
        assert!(message.starts_with("Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: *, schema: public, table: notes, filters: [], select: nil]"));
        assert!(message.contains("ALTER PUBLICATION supabase_realtime ADD TABLE public.notes;"));
        assert_eq!(quote_ident("Odd Name"), "\"Odd Name\"");
    }
}
