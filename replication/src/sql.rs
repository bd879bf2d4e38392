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

use tokio_postgres::types::Type;
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
    /// The type as SQL names it with its modifier (`format_type(atttypid, atttypmod)`:
    /// `character(5)`, not `character`, which would cut values to one character), for casts.
    pub type_sql: String,
    /// The column's collation as SQL names it (`pg_catalog."en-x-icu"`), when the type is
    /// collatable: the RLS check gives the committed values the column's own collation.
    pub collation_sql: Option<String>,
    /// How its text orders: by bytes, or under a collation PostgreSQL must apply (filters).
    pub order: crate::filter::TextOrder,
}

/// `datcollate`/`collcollate` values whose libc collation is byte order on UTF-8 text (`C`,
/// `POSIX`; glibc's `C.UTF-8` orders by code point, which is UTF-8 byte order — checked by
/// `sql::tests::text_order_differential_against_postgres`).
const BYTE_ORDER_LOCALES: &str = "'C', 'POSIX', 'C.UTF-8', 'C.utf8'";

impl ColumnInfo {
    /// A column that orders by bytes, without a collation (tests).
    pub fn plain(name: &str, type_name: &str) -> ColumnInfo {
        ColumnInfo { name: name.into(), type_name: type_name.into(), type_sql: type_name.into(), collation_sql: None, order: crate::filter::TextOrder::Bytes }
    }
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
///
/// The metadata queries here are sent with `query_typed` (parameter types given: one round trip,
/// no separate prepare) and, where independent, concurrently on the one connection, which
/// tokio-postgres pipelines (issue 17: a subscription's metadata costs 3 round trips, was 12).
pub async fn published_tables(client: &Client) -> Result<(bool, Vec<(String, String)>), SqlError> {
    let (exists, rows) = futures_util::future::try_join(
        client.query_typed("SELECT 1 FROM pg_publication WHERE pubname = $1", &[(&PUBLICATION, Type::TEXT)]),
        client.query_typed("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[(&PUBLICATION, Type::TEXT)]),
    )
    .await?;
    Ok((!exists.is_empty(), rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, SqlError>>()?))
}

/// Metadata of `schema.table`, or `None` when it does not exist.
pub async fn table_info(client: &Client, schema: &str, table: &str) -> Result<Option<Arc<TableInfo>>, SqlError> {
    Ok(table_info_for(client, schema, table, None, &Collations::default()).await?.map(|(info, _)| info))
}

/// A collation as the column metadata needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CollationRow {
    /// Quoted, schema-qualified name.
    sql: String,
    /// Orders UTF-8 text by bytes.
    byte_order: bool,
    /// `collisdeterministic`.
    deterministic: bool,
}

/// Collations by oid, resolved from the catalog on first need ([`table_info_for`]): the
/// effective collation of the default one is the database's (`datcollate` under
/// `datlocprovider`). Kept by the changes driver between subscriptions (joining the catalogs
/// into every columns query made it ≈ 3× dearer to plan, which showed in W5's subscription
/// time) and cleared with every publication poll (2 s), so a renamed collation is seen soon.
#[derive(Debug, Default)]
pub struct Collations(std::cell::RefCell<ahash::AHashMap<i64, Option<CollationRow>>>);

impl Collations {
    /// Forgets everything (the next lookup reads the catalog again).
    pub fn clear(&self) {
        self.0.borrow_mut().clear();
    }

    fn get(&self, oid: i64) -> Option<CollationRow> {
        self.0.borrow().get(&oid).cloned().flatten()
    }

    /// Reads the collations among `oids` (0 = not collatable) it does not know yet: one query,
    /// none when all are known.
    async fn resolve(&self, client: &Client, oids: &[i64]) -> Result<(), SqlError> {
        let mut missing: Vec<i64> = oids.iter().copied().filter(|oid| *oid != 0 && !self.0.borrow().contains_key(oid)).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "SELECT co.oid::int8, quote_ident(n.nspname) || '.' || quote_ident(co.collname), \
                    CASE co.collprovider \
                      WHEN 'd' THEN (SELECT d.datlocprovider = 'c' AND d.datcollate IN ({BYTE_ORDER_LOCALES}) FROM pg_database d WHERE d.datname = current_database()) \
                      WHEN 'c' THEN co.collcollate IN ({BYTE_ORDER_LOCALES}) \
                      ELSE false END, \
                    co.collisdeterministic \
             FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace WHERE co.oid = ANY($1::int8[]::oid[])"
        );
        let rows = client.query_typed(&sql, &[(&missing, Type::INT8_ARRAY)]).await?;
        let mut known = self.0.borrow_mut();
        for oid in &missing {
            known.insert(*oid, None);
        }
        for row in rows {
            let oid: i64 = row.try_get(0)?;
            known.insert(oid, Some(CollationRow { sql: row.try_get(1)?, byte_order: row.try_get::<_, Option<bool>>(2)?.unwrap_or(false), deterministic: row.try_get(3)? }));
        }
        Ok(())
    }
}

/// [`table_info`] and, with `role`, the columns that role may SELECT ([`selectable_columns`]),
/// in two pipelined steps: the table's oid, then its columns, key and privileges at once; plus
/// one more for the columns' collations the first time `collations` meets them.
pub async fn table_info_for(client: &Client, schema: &str, table: &str, role: Option<&str>, collations: &Collations) -> Result<Option<(Arc<TableInfo>, Vec<bool>)>, SqlError> {
    let rows = client
        .query_typed(
            "SELECT c.oid::int8, c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[(&schema, Type::TEXT), (&table, Type::TEXT)],
        )
        .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let oid: i64 = row.try_get(0)?;
    let rls_enabled: bool = row.try_get(1)?;
    let oid_param: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] = [(&oid, Type::INT8)];
    let columns_sql = "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod), a.attcollation::int8 \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";
    let columns = client.query_typed(columns_sql, &oid_param);
    let primary_key = client.query_typed(
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
        &oid_param,
    );
    let privileges = async {
        match role {
            Some(role) => selectable_columns(client, role, oid).await,
            None => Ok(Vec::new()),
        }
    };
    let (columns, primary_key, privileges) = futures_util::future::try_join3(columns, primary_key, privileges).await?;
    let oids: Vec<i64> = columns.iter().map(|r| r.try_get::<_, i64>(3)).collect::<Result<_, SqlError>>()?;
    collations.resolve(client, &oids).await?;
    let columns = columns
        .iter()
        .zip(oids)
        .map(|(r, oid)| {
            let type_sql: String = r.try_get(2)?;
            let (collation_sql, order) = match collations.get(oid) {
                Some(found) => {
                    let order = if found.byte_order {
                        crate::filter::TextOrder::Bytes
                    } else {
                        crate::filter::TextOrder::Database(Arc::new(crate::filter::Collation {
                            type_sql: type_sql.clone(),
                            collation_sql: found.sql.clone(),
                            deterministic: found.deterministic,
                        }))
                    };
                    (Some(found.sql), order)
                }
                None => (None, crate::filter::TextOrder::Bytes),
            };
            Ok(ColumnInfo { name: r.try_get(0)?, type_name: r.try_get(1)?, type_sql, collation_sql, order })
        })
        .collect::<Result<_, SqlError>>()?;
    let primary_key = primary_key.iter().map(|r| r.try_get(0)).collect::<Result<_, SqlError>>()?;
    Ok(Some((Arc::new(TableInfo { oid, schema: schema.into(), table: table.into(), columns, primary_key, rls_enabled }), privileges)))
}

/// The role, or `None` when no such role exists.
pub async fn role_info(client: &Client, role: &str) -> Result<Option<RoleInfo>, SqlError> {
    let rows = client.query_typed("SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = $1", &[(&role, Type::TEXT)]).await?;
    rows.first().map(|r| Ok(RoleInfo { bypasses_rls: r.try_get(0)? })).transpose()
}

/// Which columns of table `oid` the role may SELECT, in `attnum` order.
pub async fn selectable_columns(client: &Client, role: &str, oid: i64) -> Result<Vec<bool>, SqlError> {
    let rows = client
        .query_typed(
            "SELECT has_column_privilege($1, a.attrelid, a.attnum, 'SELECT') FROM pg_attribute a \
             WHERE a.attrelid = $2::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[(&role, Type::TEXT), (&oid, Type::INT8)],
        )
        .await?;
    // NULL (a column dropped while the statement ran) reads as not selectable.
    rows.iter().map(|r| Ok(r.try_get::<_, Option<bool>>(0)?.unwrap_or(false))).collect()
}

/// Most (value, operand) pairs one text-order statement carries; more go into further
/// statements of the same pipeline.
pub const TEXT_ORDER_PAIRS_MAX: usize = 8_192;

/// The order of each (value, operand) pair of text under `collation`, as PostgreSQL's own
/// `<`/`>` decide it: for filters on text columns whose collation is not byte order
/// (`crate::filter::TextOrder::Database`). The values and operands are bound parameters
/// (arrays); only the catalog's type and collation names are in the SQL text. All statements
/// are sent before any answer is read: one round trip, whatever the number of pairs.
pub async fn text_orders(client: &Client, collation: &crate::filter::Collation, pairs: &[(&[u8], &[u8])]) -> Result<Vec<std::cmp::Ordering>, SqlError> {
    let (ty, co) = (&collation.type_sql, &collation.collation_sql);
    let text = format!(
        "SELECT (u.v::{ty} COLLATE {co} < u.o::{ty})::int - (u.v::{ty} COLLATE {co} > u.o::{ty})::int \
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(v, o, n) ORDER BY u.n"
    );
    let chunks: Vec<(Vec<String>, Vec<String>)> = pairs
        .chunks(TEXT_ORDER_PAIRS_MAX)
        .map(|chunk| {
            let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (chunk.iter().map(|(v, _)| lossy(v)).collect(), chunk.iter().map(|(_, o)| lossy(o)).collect())
        })
        .collect();
    let answers = futures_util::future::try_join_all(
        chunks.iter().map(|(values, operands)| async { client.query_typed(&text, &[(values, Type::TEXT_ARRAY), (operands, Type::TEXT_ARRAY)]).await }),
    )
    .await?;
    Ok(answers
        .iter()
        .flatten()
        .map(|row| match row.get::<_, Option<i32>>(0) {
            Some(1) => std::cmp::Ordering::Less,
            Some(-1) => std::cmp::Ordering::Greater,
            _ => std::cmp::Ordering::Equal,
        })
        .collect())
}

/// A row as committed (the WAL new tuple), for the RLS check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowImage {
    /// Primary-key values (text, key order).
    pub key: Vec<String>,
    /// Every column of the table (text, `None` = NULL) in [`TableInfo::columns`] order, or
    /// `None` when the stream did not carry them all (unchanged TOAST without a full old row):
    /// then the row is read from the table by its key, as it is now.
    pub cells: Option<Vec<Option<String>>>,
}

/// One claims group's share of an RLS check: who, which compiled policy applies to its role,
/// and which committed rows to test.
#[derive(Debug, Clone)]
pub struct RlsGroup<'a> {
    /// Role claim.
    pub role: &'a str,
    /// Claims JSON.
    pub claims_json: &'a str,
    /// The role's SELECT policies on the table, compiled by [`compile_rls`].
    pub policy: &'a str,
    /// The rows to test.
    pub rows: &'a [&'a RowImage],
}

/// The SELECT policies that apply to `role` on `table`, compiled into one SQL boolean
/// expression over the table's columns (named by the table's own name, as `pg_get_expr`
/// prints them): permissive ones OR'ed (none → `false`), restrictive ones AND'ed. `true` when
/// RLS does not apply to the role (BYPASSRLS, superuser, the owner without FORCE, RLS off);
/// `false` when the role may not SELECT the table at all or does not exist. Runs as the server.
pub async fn compile_rls(client: &Client, table: &TableInfo, role: &str) -> Result<String, SqlError> {
    let rows = client
        .query(
            "SELECT c.relrowsecurity, c.relforcerowsecurity, pg_has_role(r.oid, c.relowner, 'USAGE'), r.rolsuper OR r.rolbypassrls, \
                    has_any_column_privilege(r.oid, c.oid, 'SELECT') \
             FROM pg_class c, pg_roles r WHERE c.oid = $1::int8::oid AND r.rolname = $2",
            &[&table.oid, &role],
        )
        .await?;
    let Some(row) = rows.first() else { return Ok("false".into()) };
    // NULL (the table or role dropped while the statement ran) reads as false: no access.
    let flag = |i: usize| -> Result<bool, SqlError> { Ok(row.try_get::<_, Option<bool>>(i)?.unwrap_or(false)) };
    let (rls, force, owner, bypass, may_select) = (flag(0)?, flag(1)?, flag(2)?, flag(3)?, flag(4)?);
    if bypass {
        return Ok("true".into());
    }
    if !may_select {
        return Ok("false".into());
    }
    if !rls || (owner && !force) {
        return Ok("true".into());
    }
    let policies = client
        .query(
            "SELECT p.polpermissive, pg_get_expr(p.polqual, p.polrelid) FROM pg_policy p, pg_roles r \
             WHERE p.polrelid = $1::int8::oid AND r.rolname = $2 AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL \
               AND EXISTS (SELECT 1 FROM unnest(p.polroles) AS pr(oid) WHERE pr.oid = 0 OR pg_has_role(r.oid, pr.oid, 'USAGE')) \
             ORDER BY p.polname",
            &[&table.oid, &role],
        )
        .await?;
    let mut permissive = Vec::new();
    let mut restrictive = Vec::new();
    for policy in &policies {
        let expr: String = policy.try_get(1)?;
        if policy.try_get::<_, bool>(0)? {
            permissive.push(format!("({expr})"));
        } else {
            restrictive.push(format!("({expr})"));
        }
    }
    if permissive.is_empty() {
        return Ok("false".into());
    }
    let mut compiled = format!("({})", permissive.join(" OR "));
    for r in restrictive {
        compiled.push_str(" AND ");
        compiled.push_str(&r);
    }
    Ok(compiled)
}

/// What the compiled policies depend on — policies, role memberships and attributes, tables'
/// RLS switches and owners — as one digest. The driver polls it and recompiles when it changes.
pub async fn rls_fingerprint(client: &Client) -> Result<String, SqlError> {
    let row = client
        .query_one(
            "SELECT md5(concat_ws('|', \
               (SELECT string_agg(p.oid::text || p.polrelid::text || p.polcmd::text || p.polpermissive::text || p.polroles::text || coalesce(pg_get_expr(p.polqual, p.polrelid), ''), ',' ORDER BY p.oid) FROM pg_policy p), \
               (SELECT string_agg(m.roleid::text || '>' || m.member::text, ',' ORDER BY m.roleid, m.member) FROM pg_auth_members m), \
               (SELECT string_agg(r.oid::text || r.rolname || r.rolbypassrls::text || r.rolsuper::text || r.rolinherit::text, ',' ORDER BY r.oid) FROM pg_roles r), \
               (SELECT string_agg(c.oid::text || c.relrowsecurity::text || c.relforcerowsecurity::text || c.relowner::text || coalesce(c.relacl::text, ''), ',' ORDER BY c.oid) \
                  FROM pg_class c WHERE c.relkind IN ('r', 'p') AND c.relnamespace <> 'pg_catalog'::regnamespace)))",
            &[],
        )
        .await?;
    row.try_get(0)
}

/// RLS checks for several claims groups on one table, **pipelined**: the statements are
/// prepared (one round trip), then `BEGIN READ ONLY`, per group `set_config(role, claims)` and
/// the check, and `ROLLBACK` are all sent before any answer is read (one more round trip).
///
/// The check evaluates the group's compiled policy ([`compile_rls`]) over the rows **as
/// committed**, supplied as typed values (`FROM (SELECT $k[i]::<type> AS <column>, …) AS
/// <table>`), so a row updated or deleted since is judged by the version the change carries.
/// Subqueries in policies (other tables, the table itself) run as the role, as PostgreSQL's own
/// check would. Rows whose image is incomplete are read back from the table by key.
///
/// Every value — role, claims, row values from the WAL — is a bound parameter; only quoted
/// identifiers, type names and policy expressions from the catalog are in the SQL text. If any
/// group's check fails (a policy raising an error, an unknown role), the transaction is aborted
/// for the rest, so the groups are re-run one by one and only the failing group gets the error.
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

/// Per group: column-major parameters of its complete images (one text array per column, then
/// the row positions) and the key arrays of its incomplete ones (one per key column, then
/// positions).
struct GroupParams<'a> {
    image_arrays: Vec<Vec<Option<&'a str>>>,
    image_positions: Vec<i32>,
    key_arrays: Vec<Vec<&'a str>>,
    key_positions: Vec<i32>,
}

impl<'a> GroupParams<'a> {
    fn of(table: &TableInfo, rows: &[&'a RowImage]) -> GroupParams<'a> {
        let mut params = GroupParams {
            image_arrays: vec![Vec::new(); table.columns.len()],
            image_positions: Vec::new(),
            key_arrays: vec![Vec::new(); table.primary_key.len()],
            key_positions: Vec::new(),
        };
        for (position, row) in rows.iter().enumerate() {
            match &row.cells {
                Some(cells) if cells.len() == table.columns.len() => {
                    for (array, cell) in params.image_arrays.iter_mut().zip(cells) {
                        array.push(cell.as_deref());
                    }
                    params.image_positions.push(position as i32);
                }
                _ => {
                    for (array, value) in params.key_arrays.iter_mut().zip(&row.key) {
                        array.push(value.as_str());
                    }
                    params.key_positions.push(position as i32);
                }
            }
        }
        params
    }
}

/// One pipelined transaction for `groups`; the first error fails all of them.
async fn rls_pipeline(client: &Client, table: &TableInfo, groups: &[RlsGroup<'_>]) -> Result<Vec<Vec<bool>>, SqlError> {
    use std::future::Future;
    use std::pin::Pin;
    use tokio_postgres::types::ToSql;

    let params: Vec<GroupParams> = groups.iter().map(|g| GroupParams::of(table, g.rows)).collect();
    // One statement per distinct policy expression (roles often share one).
    let mut policies: Vec<&str> = groups.iter().map(|g| g.policy).collect();
    policies.sort_unstable();
    policies.dedup();
    let needs_lookup = params.iter().any(|p| !p.key_positions.is_empty());
    let check_texts: Vec<String> = policies.iter().map(|policy| committed_select(table, policy)).collect();
    let (configure, checks, lookup) = futures_util::future::try_join3(
        client.prepare("SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)"),
        futures_util::future::try_join_all(check_texts.iter().map(|text| client.prepare(text))),
        async {
            if needs_lookup {
                client.prepare(&visible_select(table)).await.map(Some)
            } else {
                Ok(None)
            }
        },
    )
    .await?;
    type Step<'a> = Pin<Box<dyn Future<Output = Result<Option<(usize, Vec<tokio_postgres::Row>)>, SqlError>> + 'a>>;
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(2 + 3 * groups.len());
    steps.push(Box::pin(async { client.simple_query("BEGIN READ ONLY").await.map(|_| None) }));
    for (g, (group, params)) in groups.iter().zip(&params).enumerate() {
        let configure = &configure;
        steps.push(Box::pin(async move { client.query(configure, &[&group.role, &group.claims_json]).await.map(|_| None) }));
        if !params.image_positions.is_empty() {
            let index = policies.binary_search(&group.policy).unwrap_or(0);
            let check = &checks[index];
            steps.push(Box::pin(async move {
                let mut values: Vec<&(dyn ToSql + Sync)> = params.image_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                values.push(&params.image_positions);
                client.query(check, &values).await.map(|rows| Some((g, rows)))
            }));
        }
        if let (Some(lookup), false) = (&lookup, params.key_positions.is_empty()) {
            steps.push(Box::pin(async move {
                let mut values: Vec<&(dyn ToSql + Sync)> = params.key_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                values.push(&params.key_positions);
                client.query(lookup, &values).await.map(|rows| Some((g, rows)))
            }));
        }
    }
    steps.push(Box::pin(async { client.simple_query("ROLLBACK").await.map(|_| None) }));
    let outcomes = futures_util::future::join_all(steps).await;
    let mut visible: Vec<Vec<bool>> = groups.iter().map(|g| vec![false; g.rows.len()]).collect();
    let mut failure = None;
    for outcome in outcomes {
        match outcome {
            Ok(Some((g, rows))) => {
                for row in rows {
                    let position: Option<i32> = row.try_get(0).ok().flatten();
                    if let Some(slot) = position.and_then(|p| visible[g].get_mut(p as usize)) {
                        *slot = true;
                    }
                }
            }
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
    Ok(visible)
}

/// The alias of the row position in the check statements (not a name a table column takes in
/// practice; a table that has it gets its check's own column shadowed, which only fails that
/// table's check).
const POSITION: &str = "__powa_row";

/// The check for committed rows: over a plain subquery of typed columns when the policy only
/// names columns (the fast form), over values of the table's row type when it uses the whole
/// row (`check_row(todos)`, `to_jsonb(todos)`, `todos.*`), which costs ≈ 20 % of W5's RLS
/// throughput (benches/RESULTS.md).
fn committed_select(table: &TableInfo, policy: &str) -> String {
    if uses_whole_row(policy, &table.table) {
        committed_select_rows(table, policy)
    } else {
        committed_select_columns(table, policy)
    }
}

/// Whether `policy` (as `pg_get_expr` prints it, columns unqualified) refers to the table's whole
/// row: its name as an identifier that is neither qualified (`x.todos`) nor qualifying a column
/// (`todos.col`; `todos.*` counts as the whole row). A name inside a string literal or a
/// subquery's `FROM todos` also counts: that only costs the slower form, never a wrong answer.
pub(crate) fn uses_whole_row(policy: &str, table: &str) -> bool {
    let name = quote_ident(table);
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$' || c == '"';
    let mut from = 0;
    while let Some(found) = policy[from..].find(name.as_str()) {
        let at = from + found;
        let end = at + name.len();
        from = end;
        let before = policy[..at].chars().next_back();
        if before.is_some_and(|c| ident(c) || c == '.') || policy[end..].chars().next().is_some_and(ident) {
            continue;
        }
        let rest = policy[end..].trim_start();
        if !rest.starts_with('.') || rest.starts_with(".*") {
            return true;
        }
    }
    false
}

/// `SELECT pos FROM unnest($1::text[], …, $n+1::int4[]) AS u(…), LATERAL
/// unnest(ARRAY[ROW(u.v1::<type1>, …)::<schema>.<table>]) AS <table> WHERE <policy>`: which
/// committed rows the current role may read. Each row is a value of the table's own composite
/// type under the table's name, so a policy may use its columns and the whole row alike
/// (`check_row(todos)`, `to_jsonb(todos)`), as it would on the table itself.
fn committed_select_rows(table: &TableInfo, policy: &str) -> String {
    let n = table.columns.len();
    let arrays = (1..=n).map(|i| format!("${i}::text[]")).chain(std::iter::once(format!("${}::int4[]", n + 1))).collect::<Vec<_>>().join(", ");
    let names = (0..n).map(|i| format!("{POSITION}_v{i}")).chain(std::iter::once(POSITION.to_string())).collect::<Vec<_>>().join(", ");
    let fields = table.columns.iter().enumerate().map(|(i, c)| format!("u.{POSITION}_v{i}::{}", c.type_sql)).collect::<Vec<_>>().join(", ");
    let qualified = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.table));
    format!(
        "SELECT u.{POSITION} FROM unnest({arrays}) AS u({names}), LATERAL unnest(ARRAY[ROW({fields})::{qualified}]) AS {} WHERE {policy}",
        quote_ident(&table.table)
    )
}

fn committed_select_columns(table: &TableInfo, policy: &str) -> String {
    let n = table.columns.len();
    let arrays = (1..=n).map(|i| format!("${i}::text[]")).chain(std::iter::once(format!("${}::int4[]", n + 1))).collect::<Vec<_>>().join(", ");
    let names = (0..n).map(|i| format!("v{i}")).chain(std::iter::once(POSITION.to_string())).collect::<Vec<_>>().join(", ");
    let casts = table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| match &c.collation_sql {
            // The column's own collation, so a policy compares the value as it would on the table.
            Some(collation) => format!("u.v{i}::{} COLLATE {collation} AS {}", c.type_sql, quote_ident(&c.name)),
            None => format!("u.v{i}::{} AS {}", c.type_sql, quote_ident(&c.name)),
        })
        .chain(std::iter::once(format!("u.{POSITION}")))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {} FROM (SELECT {casts} FROM unnest({arrays}) AS u({names})) AS {} WHERE {policy}", quote_ident(&table.table) + "." + POSITION, quote_ident(&table.table))
}

/// `SELECT pos FROM <table> JOIN unnest($1::text[], …, $k+1::int4[]) ON key = …`: which of the
/// given keys the current role may read in the table as it is now (rows whose committed image
/// is incomplete).
fn visible_select(table: &TableInfo) -> String {
    let key: Vec<&ColumnInfo> = table
        .primary_key
        .iter()
        .filter_map(|name| table.columns.iter().find(|c| &c.name == name))
        .collect();
    let qualified = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.table));
    let arrays = (1..=key.len()).map(|i| format!("${i}::text[]")).chain(std::iter::once(format!("${}::int4[]", key.len() + 1))).collect::<Vec<_>>().join(", ");
    let names = (0..key.len()).map(|i| format!("v{i}")).chain(std::iter::once(POSITION.to_string())).collect::<Vec<_>>().join(", ");
    let on = if key.is_empty() {
        "false".to_string()
    } else {
        key.iter().enumerate().map(|(i, c)| format!("t.{} = u.v{i}::{}", quote_ident(&c.name), c.type_sql)).collect::<Vec<_>>().join(" AND ")
    };
    format!("SELECT u.{POSITION} FROM {qualified} AS t JOIN unnest({arrays}) AS u({names}) ON {on}")
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
            // Three complete committed images and one incomplete one (read back by key; not in
            // the table).
            let image = |a: &str, b: &str, owner: &str| RowImage { key: vec![a.into(), b.into()], cells: Some(vec![Some(a.into()), Some(b.into()), Some(owner.into())]) };
            let owned = [image("1", "it's", "alice"), image("2", "x\"y", "bob"), image("3", "z", "alice"), RowImage { key: vec!["4".into(), "missing".into()], cells: None }];
            let rows: Vec<&RowImage> = owned.iter().collect();
            let reader = compile_rls(&client, &table, "reader").await.unwrap();
            let breaker = compile_rls(&client, &table, "breaker").await.unwrap();
            let group = |role: &'static str, claims: &'static str| RlsGroup { role, claims_json: claims, policy: if role == "reader" { &reader } else { &breaker }, rows: &rows };
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

    /// The committed row is judged, not the table's current version: a row deleted (or
    /// updated away from its owner) after the change still gets the owner's verdict.
    #[test]
    fn the_committed_image_is_judged_not_the_current_row() {
        let (cluster, _guard) = crate::cluster::Cluster::throwaway().expect("PostgreSQL 15");
        cluster
            .psql(
                "create role reader nologin; create table public.t (id int primary key, owner text); grant select on public.t to reader; \
                 alter table public.t enable row level security; \
                 create policy own on public.t for select to reader using (owner = current_setting('request.jwt.claims', true)::json->>'sub'); \
                 insert into public.t values (2, 'bob');",
            )
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let client = connect(&cluster.url()).await.unwrap();
            let table = table_info(&client, "public", "t").await.unwrap().unwrap();
            let policy = compile_rls(&client, &table, "reader").await.unwrap();
            // Row 1 is gone; row 2 now belongs to bob but was committed as alice's.
            let owned = [
                RowImage { key: vec!["1".into()], cells: Some(vec![Some("1".into()), Some("alice".into())]) },
                RowImage { key: vec!["2".into()], cells: Some(vec![Some("2".into()), Some("alice".into())]) },
            ];
            let rows: Vec<&RowImage> = owned.iter().collect();
            let groups = [RlsGroup { role: "reader", claims_json: r#"{"sub":"alice"}"#, policy: &policy, rows: &rows }, RlsGroup { role: "reader", claims_json: r#"{"sub":"bob"}"#, policy: &policy, rows: &rows }];
            let results = rls_visible_groups(&client, &table, &groups).await;
            assert_eq!(results[0].as_ref().unwrap(), &vec![true, true]);
            assert_eq!(results[1].as_ref().unwrap(), &vec![false, false]);
        });
    }

    #[test]
    fn whole_row_references_are_recognised() {
        assert!(uses_whole_row("public.mine(t)", "t"));
        assert!(uses_whole_row("(to_jsonb(t) = x)", "t"));
        assert!(uses_whole_row("check(t.*)", "t"));
        assert!(uses_whole_row("check(\"Todo List\")", "Todo List"));
        assert!(!uses_whole_row("(owner = (auth.uid())::text)", "t"));
        assert!(!uses_whole_row("(t.owner = 'x') AND (team_id IN (SELECT m.team_id FROM public.members m))", "t"));
        assert!(!uses_whole_row("(todos_count > 1)", "todos"));
        assert!(!uses_whole_row("EXISTS (SELECT 1 FROM public.todos x)", "todos"));
    }

    /// A policy that uses the whole row (a function taking the table's row type, `to_jsonb`)
    /// is judged on the committed row as on the table itself.
    #[test]
    fn whole_row_policies_see_the_tables_row_type() {
        let (cluster, _guard) = crate::cluster::Cluster::throwaway().expect("PostgreSQL 15");
        cluster
            .psql(
                "create role reader nologin; create role jsoner nologin; \
                 create table public.t (id int primary key, owner text, note text); grant select on public.t to reader, jsoner; \
                 alter table public.t enable row level security; \
                 create function public.mine(r public.t) returns boolean language sql stable as $$ select r.owner = current_setting('request.jwt.claims', true)::json->>'sub' $$; \
                 create policy own on public.t for select to reader using (public.mine(t)); \
                 create policy json on public.t for select to jsoner using (to_jsonb(t) = jsonb_build_object('id', id, 'owner', owner, 'note', note) and owner is not null);",
            )
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let client = connect(&cluster.url()).await.unwrap();
            let table = table_info(&client, "public", "t").await.unwrap().unwrap();
            let reader = compile_rls(&client, &table, "reader").await.unwrap();
            let jsoner = compile_rls(&client, &table, "jsoner").await.unwrap();
            let owned = [
                RowImage { key: vec!["1".into()], cells: Some(vec![Some("1".into()), Some("alice".into()), None]) },
                RowImage { key: vec!["2".into()], cells: Some(vec![Some("2".into()), Some("bob".into()), Some("n".into())]) },
                RowImage { key: vec!["3".into()], cells: Some(vec![Some("3".into()), None, Some("n".into())]) },
            ];
            let rows: Vec<&RowImage> = owned.iter().collect();
            let groups = [
                RlsGroup { role: "reader", claims_json: r#"{"sub":"alice"}"#, policy: &reader, rows: &rows },
                RlsGroup { role: "jsoner", claims_json: "{}", policy: &jsoner, rows: &rows },
            ];
            let results = rls_visible_groups(&client, &table, &groups).await;
            assert_eq!(results[0].as_ref().map_err(error_text).unwrap(), &vec![true, false, false]);
            assert_eq!(results[1].as_ref().map_err(error_text).unwrap(), &vec![true, true, false], "to_jsonb(t) is exactly the table's row");
        });
    }

    /// Differential test of text filters under collations (issue 11 item 4): random strings
    /// (mixed case, accents, digits, punctuation, spaces, the empty string) in columns under
    /// the database default (`C.UTF-8` here), `C`, `POSIX`, `C.utf8`, `ucs_basic`, ICU
    /// `und-x-icu` and `en-x-icu` (a `varchar(12)` too) and a nondeterministic ICU collation.
    /// For every (row value, operand) pair and `lt`/`lte`/`gt`/`gte`/`eq`/`neq`, the filter —
    /// compiled with the column's order as `table_info` reads it, byte-order columns in Rust,
    /// the others through [`text_orders`] — must give PostgreSQL's own answer for the column.
    /// Seeded (`POWA_COLLATION_DIFF_SEED`; printed, and in every failure message).
    #[test]
    fn text_order_differential_against_postgres() {
        use crate::filter::{Op, RawFilter, TextOrder};
        let seed: u64 = std::env::var("POWA_COLLATION_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        println!("collation differential: seed {seed} (POWA_COLLATION_DIFF_SEED={seed} to repeat)");
        let mut rng = Rng(seed);
        let (cluster, _guard) = crate::cluster::Cluster::throwaway().expect("PostgreSQL 15");
        let alphabet: Vec<char> = "aAbBcCeEéÉèêzZßæÆøØåÅ0159 -_.,'!@#/~ÿÿœŒ".chars().collect();
        let strings: Vec<String> = (0..36)
            .map(|i| if i == 0 { String::new() } else { (0..1 + rng.below(6)).map(|_| *rng.pick(&alphabet)).collect() })
            .collect();
        let columns = [
            ("c_default", "text", true),
            ("c_c", "text collate \"C\"", true),
            ("c_posix", "text collate \"POSIX\"", true),
            ("c_cutf8", "text collate \"C.utf8\"", true),
            ("c_ucs", "text collate ucs_basic", true),
            ("c_und", "text collate \"und-x-icu\"", false),
            ("c_en", "text collate \"en-x-icu\"", false),
            ("c_vc", "varchar(12) collate \"en-x-icu\"", false),
            ("c_ci", "text collate public.ci", false),
        ];
        let ddl = format!(
            "create collation public.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false); \
             create table public.s (id int primary key, {})",
            columns.iter().map(|(name, ty, _)| format!("{name} {ty}")).collect::<Vec<_>>().join(", ")
        );
        cluster.psql(&ddl).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        let cases = local.block_on(&runtime, async {
            let client = connect(&cluster.url()).await.unwrap();
            for (id, text) in strings.iter().enumerate() {
                let values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = std::iter::repeat_n(text as &(dyn tokio_postgres::types::ToSql + Sync), columns.len()).collect();
                let placeholders = (2..columns.len() + 2).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                let id = id as i32;
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
                params.extend(values);
                client.execute(&format!("insert into public.s values ($1, {placeholders})"), &params).await.unwrap();
            }
            let table = table_info(&client, "public", "s").await.unwrap().unwrap();
            let mut cases = 0usize;
            for (c, (name, _, byte_order)) in columns.iter().enumerate() {
                let column = &table.columns[c + 1];
                assert_eq!(&column.name, name);
                assert_eq!(matches!(column.order, TextOrder::Bytes), *byte_order, "seed {seed}: {name} classified as {:?}", column.order);
                // PostgreSQL's own answers for every pair of rows, on the column itself.
                let theirs = client
                    .query(
                        &format!(
                            "select a.{name}::text, b.{name}::text, a.{name} < b.{name}, a.{name} <= b.{name}, a.{name} > b.{name}, a.{name} >= b.{name}, \
                                    a.{name} = b.{name}, a.{name} <> b.{name} from public.s a, public.s b"
                        ),
                        &[],
                    )
                    .await
                    .unwrap();
                let ops = [Op::Lt, Op::Lte, Op::Gt, Op::Gte, Op::Eq, Op::Neq];
                let filters: Vec<Vec<crate::filter::Filter>> = strings
                    .iter()
                    .map(|operand| {
                        ops.iter()
                            .map(|op| {
                                let raw = RawFilter { column: name.to_string(), op: *op, value: operand.clone(), negate: false };
                                crate::filter::compile_ordered(&raw, 0, &column.type_name, &column.order).unwrap()
                            })
                            .collect()
                    })
                    .collect();
                // The pairs the filters ask for, ordered by the database in one call.
                let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                for row in &theirs {
                    let (a, b): (String, String) = (row.get(0), row.get(1));
                    let index = strings.iter().position(|s| s == &b).unwrap();
                    for filter in &filters[index] {
                        for operand in filter.database_pairs(Some(Some(a.as_bytes()))) {
                            pairs.push((a.as_bytes().to_vec(), operand.to_vec()));
                        }
                    }
                }
                pairs.sort_unstable();
                pairs.dedup();
                let orders: ahash::AHashMap<(Vec<u8>, Vec<u8>), std::cmp::Ordering> = match &column.order {
                    TextOrder::Database(collation) => {
                        let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
                        let answers = text_orders(&client, collation, &refs).await.unwrap();
                        pairs.iter().cloned().zip(answers).collect()
                    }
                    TextOrder::Bytes => {
                        assert!(pairs.is_empty(), "seed {seed}: a byte-order column asks nothing");
                        Default::default()
                    }
                };
                for row in &theirs {
                    let (a, b): (String, String) = (row.get(0), row.get(1));
                    let index = strings.iter().position(|s| s == &b).unwrap();
                    for (o, (op, filter)) in ops.iter().zip(&filters[index]).enumerate() {
                        let expected: bool = row.get(2 + o);
                        let ours = filter.matches_with(|_| Some(Some(a.as_bytes())), |x, y| orders.get(&(x.to_vec(), y.to_vec())).copied());
                        assert_eq!(ours, expected, "seed {seed}: {name}: {a:?} {} {b:?}", op.name());
                        cases += 1;
                    }
                }
            }
            cases
        });
        println!("collation differential: {cases} cases agree (seed {seed})");
        assert!(cases >= 36 * 36 * 6 * 9);
    }

    /// splitmix64: a tiny seeded generator for the differential test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Differential test of the committed-row RLS check: random tables, policies (equality on a
    /// column, `auth.uid()`, `auth.jwt() ->> …`, `exists` on a second table and on the table
    /// itself, `current_setting`, permissive/restrictive mixes, FORCE, roles with and without
    /// BYPASSRLS), random rows and claims. For each (row, role, claims) the server's verdict on
    /// the row image must equal PostgreSQL's own answer for the same row present in the table,
    /// read as that role. `POWA_RLS_DIFF_CASES` (default 600) and `POWA_RLS_DIFF_SEED` (default:
    /// from the clock) set the size and seed; the seed is printed on failure. The long run:
    /// `POWA_RLS_DIFF_CASES=10000 cargo test -p powa-replication --lib rls_differential -- --nocapture`.
    #[test]
    fn rls_differential_committed_image_equals_postgres() {
        let cases_wanted: usize = std::env::var("POWA_RLS_DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
        let seed: u64 = std::env::var("POWA_RLS_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        println!("rls differential: seed {seed} (POWA_RLS_DIFF_SEED={seed} to repeat), {cases_wanted} cases wanted");
        let mut rng = Rng(seed);
        let (cluster, _guard) = crate::cluster::Cluster::throwaway().expect("PostgreSQL 15");
        const ROWS: usize = 25;
        const CLAIMS: usize = 4;
        let roles = ["r_user", "r_other", "r_bypass"];
        let subs = ["11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222", "33333333-3333-3333-3333-333333333333"];
        let tables = cases_wanted.div_ceil(ROWS * CLAIMS * roles.len()).max(1);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        let cases = local.block_on(&runtime, async {
            let mut client = connect(&cluster.url()).await.unwrap();
            crate::install::install(&mut client).await.unwrap();
            client
                .batch_execute(
                    "create role r_user nologin; create role r_other nologin; create role r_bypass nologin bypassrls; \
                     grant usage on schema auth to r_user, r_other, r_bypass; \
                     create table public.members (grp int, uid uuid); grant select on public.members to r_user, r_other, r_bypass;",
                )
                .await
                .unwrap();
            for _ in 0..12 {
                let (grp, uid) = (rng.below(4), rng.pick(&subs).to_string());
                client.execute("insert into public.members values ($1::int8::int, $2::text::uuid)", &[&(grp as i64), &uid]).await.unwrap();
            }
            let mut cases = 0usize;
            for t in 0..tables {
                let name = format!("dt{t}");
                let templates = [
                    "owner = auth.uid()".to_string(),
                    format!("grp = {}", rng.below(4)),
                    "tag = auth.jwt() ->> 'team'".to_string(),
                    format!("exists (select 1 from public.members m where m.grp = {name}.grp and m.uid = auth.uid())"),
                    "score < coalesce((current_setting('request.jwt.claims', true)::jsonb ->> 'level')::numeric, 0)".to_string(),
                    "at > '2026-01-01 00:00:00+00'::timestamptz".to_string(),
                    "tag like 'a%'".to_string(),
                    format!("exists (select 1 from public.{name} o where o.id = {name}.id + 1)"),
                    "owner is null or grp is null".to_string(),
                    "true".to_string(),
                ];
                let mut ddl = format!(
                    "create table public.{name} (id int primary key, owner uuid, grp int, tag text, score numeric, at timestamptz); \
                     grant select on public.{name} to r_user, r_other, r_bypass; alter table public.{name} enable row level security;"
                );
                if rng.below(4) == 0 {
                    ddl.push_str(&format!(" alter table public.{name} force row level security;"));
                }
                for p in 0..1 + rng.below(4) {
                    let kind = if rng.below(3) == 0 { "restrictive" } else { "permissive" };
                    let command = *rng.pick(&["select", "all", "insert"]);
                    let to = *rng.pick(&["r_user", "public", "r_other", "r_user, r_other"]);
                    let mut expression = rng.pick(&templates).clone();
                    if rng.below(3) == 0 {
                        expression = format!("({expression}) {} ({})", rng.pick(&["and", "or"]), rng.pick(&templates));
                    }
                    let using = if command == "insert" { format!("with check ({expression})") } else { format!("using ({expression})") };
                    ddl.push_str(&format!(" create policy p{p} on public.{name} as {kind} for {command} to {to} {using};"));
                }
                client.batch_execute(&ddl).await.unwrap_or_else(|e| panic!("seed {seed}: {ddl}: {e}"));
                for id in 0..ROWS {
                    let owner = (rng.below(4) > 0).then(|| rng.pick(&subs).to_string());
                    let grp = (rng.below(5) > 0).then(|| rng.below(4) as i64);
                    let tag = (rng.below(5) > 0).then(|| rng.pick(&["a1", "b2", "ab", "x"]).to_string());
                    let score = (rng.below(5) > 0).then(|| format!("{}.{}", rng.below(10), rng.below(100)));
                    let at = (rng.below(5) > 0).then(|| format!("2026-01-0{} 0{}:00:00+0{}", 1 + rng.below(3), rng.below(9), rng.below(3)));
                    client
                        .execute(
                            &format!("insert into public.{name} values ($1::int8::int, $2::text::uuid, $3::int8::int, $4, $5::text::numeric, $6::text::timestamptz)"),
                            &[&(id as i64), &owner, &grp, &tag, &score, &at],
                        )
                        .await
                        .unwrap();
                }
                let table = table_info(&client, "public", &name).await.unwrap().unwrap();
                // The images as the WAL carries them: each column's text output.
                let images: Vec<RowImage> = client
                    .query(&format!("select id::text, owner::text, grp::text, tag, score::text, at::text from public.{name} order by id"), &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| {
                        let cells: Vec<Option<String>> = (0..6).map(|i| row.get(i)).collect();
                        RowImage { key: vec![cells[0].clone().unwrap()], cells: Some(cells) }
                    })
                    .collect();
                for role in roles {
                    let policy = compile_rls(&client, &table, role).await.unwrap();
                    let claims: Vec<String> = (0..CLAIMS)
                        .map(|_| {
                            let mut claims = serde_json::Map::new();
                            if rng.below(5) > 0 {
                                claims.insert("sub".into(), (*rng.pick(&subs)).into());
                            }
                            if rng.below(2) == 0 {
                                claims.insert("team".into(), (*rng.pick(&["a1", "b2", "x"])).into());
                            }
                            if rng.below(2) == 0 {
                                claims.insert("level".into(), rng.below(10).into());
                            }
                            claims.insert("role".into(), role.into());
                            serde_json::Value::Object(claims).to_string()
                        })
                        .collect();
                    let image_refs: Vec<&RowImage> = images.iter().collect();
                    let groups: Vec<RlsGroup<'_>> = claims.iter().map(|c| RlsGroup { role, claims_json: c, policy: &policy, rows: &image_refs }).collect();
                    let ours = rls_visible_groups(&client, &table, &groups).await;
                    for (claims, ours) in claims.iter().zip(ours) {
                        client.batch_execute("begin").await.unwrap();
                        client.query("select set_config('role', $1, true), set_config('request.jwt.claims', $2, true)", &[&role, claims]).await.unwrap();
                        let theirs = client.query(&format!("select id from public.{name}"), &[]).await;
                        client.batch_execute("rollback").await.unwrap();
                        let (ours, theirs) = match (ours, theirs) {
                            (Ok(ours), Ok(rows)) => (ours, rows.iter().map(|r| r.get::<_, i32>(0)).collect::<ahash::AHashSet<i32>>()),
                            (Err(ours), Err(theirs)) => {
                                // Both refuse (a policy that recurses into its own table).
                                assert_eq!(error_text(&ours), error_text(&theirs), "seed {seed}: {name} as {role}: {ddl}");
                                cases += images.len();
                                continue;
                            }
                            (ours, theirs) => panic!("seed {seed}: {name} as {role} {claims}: ours {ours:?}, PostgreSQL's {theirs:?}; policy {policy}; ddl {ddl}"),
                        };
                        for (image, ours) in images.iter().zip(ours) {
                            let id: i32 = image.key[0].parse().unwrap();
                            assert_eq!(
                                ours,
                                theirs.contains(&id),
                                "seed {seed}: table {name}, role {role}, claims {claims}, row {:?}, policy {policy}, ddl {ddl}",
                                image.cells
                            );
                            cases += 1;
                        }
                    }
                }
            }
            cases
        });
        println!("rls differential: {cases} cases agree (seed {seed})");
        assert!(cases >= cases_wanted.min(ROWS * CLAIMS * roles.len()));
    }
}
