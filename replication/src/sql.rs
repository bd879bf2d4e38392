//! Ordinary SQL on the project database (tokio-postgres, on the changes core's own thread):
//! the schema install, table metadata, publication membership, and batched RLS checks.
//!
//! Identifiers are quoted; values from clients never appear in SQL text (filters are evaluated in
//! Rust, `crate::filter`). The RLS check sends primary-key values read from the WAL and the
//! subscriber's verified claims as escaped literals inside one multi-statement simple query —
//! `BEGIN; set role and claims; SELECT …; ROLLBACK` — so a check is one round trip and two checks
//! can never interleave on the connection.

use std::sync::Arc;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::binding::quote_ident;
use crate::reader::PUBLICATION;

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// `attname`.
    pub name: String,
    /// `pg_type.typname` (what change messages print).
    pub type_name: String,
    /// The type as SQL can name it (`atttypid::regtype`), for casts.
    pub type_sql: String,
}

/// What the core needs to know about a published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Table oid.
    pub oid: i64,
    /// Schema.
    pub schema: String,
    /// Name.
    pub table: String,
    /// Columns in `attnum` order (what pgoutput sends).
    pub columns: Vec<ColumnInfo>,
    /// Primary-key column names, in key order.
    pub primary_key: Vec<String>,
    /// `relrowsecurity`.
    pub rls_enabled: bool,
}

/// A role as far as RLS is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleInfo {
    /// `rolbypassrls` or `rolsuper`: no RLS check needed.
    pub bypasses_rls: bool,
}

/// Errors from the database.
pub type SqlError = tokio_postgres::Error;

/// The message of a database error, as clients should see it.
pub fn error_text(error: &SqlError) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_string(),
        None => error.to_string(),
    }
}

/// Connects (the connection task is spawned on the current `LocalSet`/runtime) and fixes the
/// session settings that text renderings depend on.
pub async fn connect(url: &str) -> Result<Client, SqlError> {
    // TLS as the URL's sslmode asks (prefer by default), see `crate::tls`.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*crate::tls::client_config()).clone());
    let (client, connection) = tokio_postgres::connect(url, tls).await?;
    tokio::task::spawn_local(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "database connection closed");
        }
    });
    client
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET standard_conforming_strings = on; SET application_name = 'powa-realtime'")
        .await?;
    Ok(client)
}

/// Published tables of `supabase_realtime` and whether the publication exists.
pub async fn published_tables(client: &Client) -> Result<(bool, Vec<(String, String)>), SqlError> {
    let exists = !client.query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&PUBLICATION]).await?.is_empty();
    let rows = client
        .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&PUBLICATION])
        .await?;
    Ok((exists, rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// Metadata of `schema.table`, or `None` when it does not exist.
pub async fn table_info(client: &Client, schema: &str, table: &str) -> Result<Option<Arc<TableInfo>>, SqlError> {
    let rows = client
        .query(
            "SELECT c.oid::int8, c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let oid: i64 = row.get(0);
    let rls_enabled: bool = row.get(1);
    let columns = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.atttypid::regtype::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| ColumnInfo { name: r.get(0), type_name: r.get(1), type_sql: r.get(2) })
        .collect();
    let primary_key = client
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(Arc::new(TableInfo { oid, schema: schema.into(), table: table.into(), columns, primary_key, rls_enabled })))
}

/// The role, or `None` when no such role exists.
pub async fn role_info(client: &Client, role: &str) -> Result<Option<RoleInfo>, SqlError> {
    let rows = client.query("SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).await?;
    Ok(rows.first().map(|r| RoleInfo { bypasses_rls: r.get(0) }))
}

/// Which columns of table `oid` the role may SELECT, in `attnum` order.
pub async fn selectable_columns(client: &Client, role: &str, oid: i64) -> Result<Vec<bool>, SqlError> {
    let rows = client
        .query(
            "SELECT has_column_privilege($1, a.attrelid, a.attnum, 'SELECT') FROM pg_attribute a \
             WHERE a.attrelid = $2::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&role, &oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A PostgreSQL text-array literal body element, quoted.
fn array_element(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One claims group's share of an RLS check: who, and which primary keys to test.
#[derive(Debug, Clone)]
pub struct RlsGroup<'a> {
    /// Role claim.
    pub role: &'a str,
    /// Claims JSON.
    pub claims_json: &'a str,
    /// Primary-key values (text, key order) of the changes to test.
    pub rows: &'a [Vec<String>],
}

/// RLS checks for several claims groups on one table in **one** round trip: a single
/// read-only transaction that, for each group, sets the role and claims and selects which of
/// its keys are visible. If any group's query fails (a policy raising an error, an unknown
/// role), the groups are re-run one by one so that only the failing group gets the error.
pub async fn rls_visible_groups(client: &Client, table: &TableInfo, groups: &[RlsGroup<'_>]) -> Vec<Result<Vec<bool>, SqlError>> {
    let mut sql = String::from("BEGIN READ ONLY; ");
    for (index, group) in groups.iter().enumerate() {
        sql.push_str(&format!(
            "SELECT 'cfg', set_config('role', {}, true), set_config('request.jwt.claims', {}, true); ",
            literal(group.role),
            literal(group.claims_json)
        ));
        sql.push_str(&visible_select(table, group.rows, &format!("'row', '{index}'")));
    }
    sql.push_str("ROLLBACK;");
    match client.simple_query(&sql).await {
        Ok(messages) => {
            let mut visible: Vec<ahash::AHashSet<Vec<String>>> = vec![ahash::AHashSet::new(); groups.len()];
            for message in messages {
                if let SimpleQueryMessage::Row(row) = message {
                    if row.get(0) != Some("row") {
                        continue;
                    }
                    let Some(index) = row.get(1).and_then(|i| i.parse::<usize>().ok()) else { continue };
                    let key = (2..row.len()).map(|i| row.get(i).unwrap_or("").to_string()).collect();
                    if let Some(set) = visible.get_mut(index) {
                        set.insert(key);
                    }
                }
            }
            groups.iter().zip(visible).map(|(group, set)| Ok(group.rows.iter().map(|r| set.contains(r)).collect())).collect()
        }
        Err(_) => {
            let _ = client.batch_execute("ROLLBACK").await;
            let mut results = Vec::with_capacity(groups.len());
            for group in groups {
                results.push(rls_visible(client, group.role, group.claims_json, table, group.rows).await);
            }
            results
        }
    }
}

/// `SELECT <tag>, <pk>::text… FROM <table> WHERE (<pk>) IN (<the given keys>);`
fn visible_select(table: &TableInfo, rows: &[Vec<String>], tag: &str) -> String {
    let key: Vec<&ColumnInfo> = table
        .primary_key
        .iter()
        .filter_map(|name| table.columns.iter().find(|c| &c.name == name))
        .collect();
    assert_eq!(key.len(), table.primary_key.len(), "primary key columns exist in the column list");
    let qualified = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.table));
    let key_list = key.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let key_text = key.iter().map(|c| format!("{}::text", quote_ident(&c.name))).collect::<Vec<_>>().join(", ");
    let arrays = (0..key.len())
        .map(|i| {
            let items = rows.iter().map(|row| array_element(&row[i])).collect::<Vec<_>>().join(",");
            format!("{}::text[]", literal(&format!("{{{items}}}")))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let names = (0..key.len()).map(|i| format!("v{i}")).collect::<Vec<_>>().join(", ");
    let casts = key.iter().enumerate().map(|(i, c)| format!("v{i}::{}", c.type_sql)).collect::<Vec<_>>().join(", ");
    format!("SELECT {tag}, {key_text} FROM {qualified} WHERE ({key_list}) IN (SELECT {casts} FROM unnest({arrays}) AS u({names})); ")
}

/// Which of `rows` (primary-key values as text, in key order) the role + claims may SELECT:
/// one transaction-scoped round trip.
pub async fn rls_visible(client: &Client, role: &str, claims_json: &str, table: &TableInfo, rows: &[Vec<String>]) -> Result<Vec<bool>, SqlError> {
    let sql = format!(
        "BEGIN READ ONLY; SELECT 'cfg', set_config('role', {}, true), set_config('request.jwt.claims', {}, true); {}ROLLBACK;",
        literal(role),
        literal(claims_json),
        visible_select(table, rows, "'row', '0'")
    );
    let messages = match client.simple_query(&sql).await {
        Ok(messages) => messages,
        Err(error) => {
            // Leave the connection usable for the next check.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(error);
        }
    };
    let mut visible_keys: ahash::AHashSet<Vec<String>> = ahash::AHashSet::new();
    for message in messages {
        if let SimpleQueryMessage::Row(row) = message {
            if row.get(0) == Some("row") {
                visible_keys.insert((2..row.len()).map(|i| row.get(i).unwrap_or("").to_string()).collect());
            }
        }
    }
    Ok(rows.iter().map(|row| visible_keys.contains(row)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(array_element(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
