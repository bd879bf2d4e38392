//! Ordinary SQL on the project database (tokio-postgres, on the changes core's own thread):
//! the schema install, table metadata, publication membership, and batched RLS checks.
//!
//! Identifiers are quoted; values from clients never appear in SQL text (filters are evaluated in
//! Rust, `crate::filter`). The RLS check binds primary-key values read from the WAL and the
//! subscriber's verified claims as parameters of prepared statements, pipelined on the RLS
//! connection — `BEGIN; per group: set role and claims, SELECT …; ROLLBACK` sent before any answer
//! is read — and the driver runs one batch at a time on that connection, so two checks can never
//! interleave.

use std::sync::Arc;

use tokio_postgres::Client;

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

/// RLS checks for several claims groups on one table, **pipelined**: the two statements are
/// prepared (one round trip), then `BEGIN READ ONLY`, per group `set_config(role, claims)` and
/// the key lookup, and `ROLLBACK` are all sent before any answer is read (one more round trip).
/// Every value — role, claims, primary keys from the WAL — is a bound parameter; only quoted
/// identifiers and type names from the catalog are in the SQL text. If any group's lookup fails
/// (a policy raising an error, an unknown role), the transaction is aborted for the rest, so
/// the groups are re-run one by one and only the failing group gets the error.
pub async fn rls_visible_groups(client: &Client, table: &TableInfo, groups: &[RlsGroup<'_>]) -> Vec<Result<Vec<bool>, SqlError>> {
    match rls_pipeline(client, table, groups).await {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(_) if groups.len() > 1 => {
            let mut results = Vec::with_capacity(groups.len());
            for group in groups {
                results.push(rls_pipeline(client, table, std::slice::from_ref(group)).await.map(|mut r| r.remove(0)));
            }
            results
        }
        Err(error) => vec![Err(error)],
    }
}

/// One pipelined transaction for `groups`; the first error fails all of them.
async fn rls_pipeline(client: &Client, table: &TableInfo, groups: &[RlsGroup<'_>]) -> Result<Vec<Vec<bool>>, SqlError> {
    use std::future::Future;
    use std::pin::Pin;
    use tokio_postgres::types::ToSql;

    let (configure, lookup) = futures_util::future::try_join(
        client.prepare("SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)"),
        client.prepare(&visible_select(table)),
    )
    .await?;
    let key_columns = table.primary_key.len();
    // Column-major key arrays per group: arrays[g][k] = the k-th key column of every row.
    let arrays: Vec<Vec<Vec<&str>>> = groups
        .iter()
        .map(|group| (0..key_columns).map(|k| group.rows.iter().map(|row| row[k].as_str()).collect()).collect())
        .collect();
    type Step<'a> = Pin<Box<dyn Future<Output = Result<Option<Vec<tokio_postgres::Row>>, SqlError>> + 'a>>;
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(2 + 2 * groups.len());
    steps.push(Box::pin(async { client.simple_query("BEGIN READ ONLY").await.map(|_| None) }));
    for (group, arrays) in groups.iter().zip(&arrays) {
        let (configure, lookup) = (&configure, &lookup);
        steps.push(Box::pin(async move { client.query(configure, &[&group.role, &group.claims_json]).await.map(|_| None) }));
        steps.push(Box::pin(async move {
            let params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            client.query(lookup, &params).await.map(Some)
        }));
    }
    steps.push(Box::pin(async { client.simple_query("ROLLBACK").await.map(|_| None) }));
    let outcomes = futures_util::future::join_all(steps).await;
    let mut lookups = Vec::with_capacity(groups.len());
    let mut failure = None;
    for outcome in outcomes {
        match outcome {
            Ok(Some(rows)) => lookups.push(rows),
            Ok(None) => {}
            Err(error) => {
                failure.get_or_insert(error);
            }
        }
    }
    if let Some(error) = failure {
        // Leave the connection usable for the next check.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(error);
    }
    Ok(groups
        .iter()
        .zip(lookups)
        .map(|(group, rows)| {
            let visible: ahash::AHashSet<Vec<String>> = rows.iter().map(|row| (0..key_columns).map(|i| row.get::<_, Option<String>>(i).unwrap_or_default()).collect()).collect();
            group.rows.iter().map(|row| visible.contains(row)).collect()
        })
        .collect())
}

/// `SELECT <pk>::text… FROM <table> WHERE (<pk>) IN (SELECT … FROM unnest($1::text[], …))`:
/// which of the given keys (one text array per key column) the current role may read.
fn visible_select(table: &TableInfo) -> String {
    let key: Vec<&ColumnInfo> = table
        .primary_key
        .iter()
        .filter_map(|name| table.columns.iter().find(|c| &c.name == name))
        .collect();
    assert_eq!(key.len(), table.primary_key.len(), "primary key columns exist in the column list");
    let qualified = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.table));
    let key_list = key.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let key_text = key.iter().map(|c| format!("{}::text", quote_ident(&c.name))).collect::<Vec<_>>().join(", ");
    let arrays = (1..=key.len()).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", ");
    let names = (0..key.len()).map(|i| format!("v{i}")).collect::<Vec<_>>().join(", ");
    let casts = key.iter().enumerate().map(|(i, c)| format!("v{i}::{}", c.type_sql)).collect::<Vec<_>>().join(", ");
    format!("SELECT {key_text} FROM {qualified} WHERE ({key_list}) IN (SELECT {casts} FROM unnest({arrays}) AS u({names}))")
}

/// Which of `rows` (primary-key values as text, in key order) the role + claims may SELECT.
pub async fn rls_visible(client: &Client, role: &str, claims_json: &str, table: &TableInfo, rows: &[Vec<String>]) -> Result<Vec<bool>, SqlError> {
    let group = RlsGroup { role, claims_json, rows };
    rls_pipeline(client, table, std::slice::from_ref(&group)).await.map(|mut r| r.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipelined, parameterised RLS check against a real PostgreSQL: per-group answers, a
    /// composite key with values that would need escaping, and a group whose policy raises
    /// getting the error alone.
    #[test]
    fn rls_groups_are_checked_with_parameters_and_a_failing_group_is_isolated() {
        let (cluster, _guard) = crate::cluster::Cluster::throwaway().expect("PostgreSQL 15");
        cluster
            .psql(
                "create role reader nologin; create role breaker nologin; \
                 create table public.t (a int, b text, owner text, primary key (a, b)); \
                 grant select on public.t to reader, breaker; \
                 alter table public.t enable row level security; \
                 create function public.boom() returns boolean language plpgsql as $$ begin raise exception 'policy raised'; end $$; \
                 create policy own on public.t for select to reader using (owner = current_setting('request.jwt.claims', true)::json->>'sub'); \
                 create policy boom on public.t for select to breaker using (public.boom()); \
                 insert into public.t values (1, 'it''s', 'alice'), (2, 'x\"y', 'bob'), (3, 'z', 'alice');",
            )
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let client = connect(&cluster.url()).await.unwrap();
            let table = table_info(&client, "public", "t").await.unwrap().unwrap();
            let rows: Vec<Vec<String>> = [("1", "it's"), ("2", "x\"y"), ("3", "z"), ("4", "missing")].iter().map(|(a, b)| vec![a.to_string(), b.to_string()]).collect();
            let group = |role: &'static str, claims: &'static str| RlsGroup { role, claims_json: claims, rows: &rows };
            let groups = [group("reader", r#"{"sub":"alice"}"#), group("breaker", "{}"), group("reader", r#"{"sub":"bob"}"#)];
            let results = rls_visible_groups(&client, &table, &groups).await;
            assert_eq!(results[0].as_ref().unwrap(), &vec![true, false, true, false]);
            let error = results[1].as_ref().unwrap_err();
            assert_eq!(error_text(error), "policy raised");
            assert_eq!(results[2].as_ref().unwrap(), &vec![false, true, false, false]);
            // The connection is usable afterwards, outside any transaction.
            let ok = rls_visible_groups(&client, &table, &groups[..1]).await;
            assert_eq!(ok[0].as_ref().unwrap(), &vec![true, false, true, false]);
            assert_eq!(client.query_one("select current_user::text", &[]).await.unwrap().get::<_, String>(0), "postgres");
        });
    }
}
