//! The idempotent, versioned install of the database objects of PROTOCOL.md §7 (CONTRACT.md
//! "Database").
//!
//! The SQL lives in `replication/sql/NNNN_name.sql`, one file per [`Migration`], applied in
//! order. Bookkeeping is `realtime.powa_schema_migrations(version, applied_at)`: each migration
//! runs once, in the same transaction as its bookkeeping row, and re-running the install is a
//! no-op. Nothing is ever dropped except the housekeeping of `realtime.messages`' own daily
//! partitions (`realtime.powa_maintain_partitions()`, see `0002_messages.sql`).
//!
//! How to run it (what [`install`] does, over tokio-postgres):
//!
//! 1. run [`preflight_sql`] and pass its columns to [`check_preflight`]: a wrong `wal_level` or
//!    missing privileges stop the start with a message that says how to fix them;
//! 2. `BEGIN`; [`BOOTSTRAP_SQL`] (takes a transaction-scoped advisory lock, so concurrent
//!    installers queue, and creates the `realtime` schema and the bookkeeping table when
//!    missing); [`APPLIED_SQL`] → the versions already applied;
//! 3. [`pending_script`]`(&applied)` → one script with every pending migration, each followed by
//!    its bookkeeping insert: `batch_execute` it; `COMMIT`.
//!
//! The server should also run [`MAINTAIN_SQL`] at start and periodically (hourly is plenty):
//! it creates the partitions of `realtime.messages` for yesterday through today+3 and drops
//! those older than 72 hours. Inserts never fail for lack of a partition meanwhile: a DEFAULT
//! partition takes them.
//!
//! Objects installed: roles `anon`, `authenticated` (NOLOGIN) and `service_role` (NOLOGIN,
//! BYPASSRLS when installed by a superuser) when missing, with membership for a non-superuser
//! installer so it can `SET ROLE`; schema `realtime` with `realtime.messages` (RLS enabled, no
//! policies, grants to the API roles), `realtime.topic()`, `realtime.send()`,
//! `realtime.send_binary()`, `realtime.broadcast_changes()`; schema `auth` and `auth.uid()`,
//! `auth.role()`, `auth.jwt()` when missing.

use std::fmt;

/// One step of the install, applied once.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in increasing order; recorded in `realtime.powa_schema_migrations`.
    pub version: i32,
    /// A short name (the SQL file's).
    pub name: &'static str,
    /// The SQL, possibly several statements (run with a simple-query batch).
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "roles", sql: include_str!("../sql/0001_roles.sql") },
    Migration { version: 2, name: "messages", sql: include_str!("../sql/0002_messages.sql") },
    Migration { version: 3, name: "functions", sql: include_str!("../sql/0003_functions.sql") },
    Migration { version: 4, name: "auth", sql: include_str!("../sql/0004_auth.sql") },
    Migration { version: 5, name: "messages_publication", sql: include_str!("../sql/0005_messages_publication.sql") },
    Migration { version: 6, name: "policy_checks", sql: include_str!("../sql/0006_policy_checks.sql") },
];

/// Run first, inside the install transaction: serializes concurrent installers and creates the
/// `realtime` schema and the bookkeeping table when missing.
pub const BOOTSTRAP_SQL: &str = "\
select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('powa_realtime.install'));
do $powa$
begin
  if not exists (select 1 from pg_catalog.pg_namespace where nspname = 'realtime') then
    create schema realtime;
  end if;
  if pg_catalog.to_regclass('realtime.powa_schema_migrations') is null then
    create table realtime.powa_schema_migrations (
      version integer primary key,
      applied_at timestamptz not null default now()
    );
  end if;
end
$powa$;
";

/// The versions already applied (one `int4` column), after [`BOOTSTRAP_SQL`].
pub const APPLIED_SQL: &str = "select version from realtime.powa_schema_migrations order by version";

/// Partition housekeeping of `realtime.messages`: run at start and periodically.
pub const MAINTAIN_SQL: &str = "select realtime.powa_maintain_partitions()";

/// A query returning one row: `wal_level` (text), `is_superuser`, `can_replicate`,
/// `can_create_role`, `can_create_schema` (bools) and `server_version_num` (int4) for the
/// current user. `can_replicate` counts the REPLICATION attribute or membership of
/// `rds_replication`; `can_create_role` is true too when the three API roles already exist
/// and the user is a member of each; `can_create_schema` is true too when both `realtime` and
/// `auth` exist.
pub fn preflight_sql() -> &'static str {
    "\
select pg_catalog.current_setting('wal_level') as wal_level,
       r.rolsuper as is_superuser,
       (r.rolsuper or r.rolreplication
        or exists (select 1 from pg_catalog.pg_roles g
                   where g.rolname = 'rds_replication' and pg_catalog.pg_has_role(r.oid, g.oid, 'MEMBER'))) as can_replicate,
       (r.rolsuper or r.rolcreaterole
        or (select count(*) from pg_catalog.pg_roles a
            where a.rolname in ('anon', 'authenticated', 'service_role')
              and pg_catalog.pg_has_role(r.oid, a.oid, 'MEMBER')) = 3) as can_create_role,
       (r.rolsuper or pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')
        or (select count(*) from pg_catalog.pg_namespace s where s.nspname in ('realtime', 'auth')) = 2) as can_create_schema,
       pg_catalog.current_setting('server_version_num')::int4 as server_version_num
from pg_catalog.pg_roles r
where r.rolname = current_user"
}

/// Why the install cannot or did not happen. Messages say how to fix the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallError {
    /// `wal_level` is not `logical`.
    WalLevel {
        /// The current value.
        current: String,
    },
    /// The user may not use logical replication.
    NoReplication,
    /// The user may not create the API roles (and they are not all there already).
    NoCreateRole,
    /// The user may not create the `realtime`/`auth` schemas.
    NoCreateSchema,
    /// A statement failed.
    Database {
        /// The migration that failed, if it was one.
        migration: Option<(i32, &'static str)>,
        /// PostgreSQL's message.
        message: String,
    },
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallError::WalLevel { current } => write!(f, "wal_level is {current}; set wal_level = logical in postgresql.conf and restart PostgreSQL"),
            InstallError::NoReplication => write!(
                f,
                "the database user may not use logical replication; as a superuser run ALTER ROLE <user> WITH REPLICATION (on a managed service, grant its replication role, e.g. rds_replication)"
            ),
            InstallError::NoCreateRole => write!(
                f,
                "the database user cannot create the roles anon, authenticated and service_role (it is neither a superuser nor CREATEROLE); as a superuser run ALTER ROLE <user> WITH CREATEROLE, or create the three roles and GRANT them to the user"
            ),
            InstallError::NoCreateSchema => write!(
                f,
                "the database user cannot create the schemas realtime and auth; as a superuser run GRANT CREATE ON DATABASE <database> TO <user>"
            ),
            InstallError::Database { migration: Some((version, name)), message } => write!(f, "installing the realtime schema (migration {version} {name}) failed: {message}"),
            InstallError::Database { migration: None, message } => write!(f, "installing the realtime schema failed: {message}"),
        }
    }
}

impl std::error::Error for InstallError {}

/// Checks the [`preflight_sql`] answer: `wal_level` first, then the privileges (a superuser
/// has them all).
pub fn check_preflight(wal_level: &str, is_superuser: bool, can_replicate: bool, can_create_role: bool) -> Result<(), InstallError> {
    if wal_level != "logical" {
        return Err(InstallError::WalLevel { current: wal_level.to_string() });
    }
    if is_superuser {
        return Ok(());
    }
    if !can_replicate {
        return Err(InstallError::NoReplication);
    }
    if !can_create_role {
        return Err(InstallError::NoCreateRole);
    }
    Ok(())
}

/// The migrations not in `applied`, in order.
pub fn pending(applied: &[i32]) -> impl Iterator<Item = &'static Migration> + '_ {
    MIGRATIONS.iter().filter(move |m| !applied.contains(&m.version))
}

/// The bookkeeping insert for `migration`.
pub fn record_sql(migration: &Migration) -> String {
    format!("insert into realtime.powa_schema_migrations (version) values ({});\n", migration.version)
}

/// One script with every pending migration, each followed by its bookkeeping insert, for
/// `batch_execute` inside the install transaction (after [`BOOTSTRAP_SQL`]); `None` when
/// everything is applied.
pub fn pending_script(applied: &[i32]) -> Option<String> {
    let mut script = String::new();
    for migration in pending(applied) {
        script.push_str(&format!("-- migration {} {}\n", migration.version, migration.name));
        script.push_str(migration.sql);
        script.push_str("\n;\n");
        script.push_str(&record_sql(migration));
    }
    (!script.is_empty()).then_some(script)
}

fn database_error(migration: Option<&Migration>, error: &tokio_postgres::Error) -> InstallError {
    let message = match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => error.to_string(),
    };
    InstallError::Database { migration: migration.map(|m| (m.version, m.name)), message }
}

/// Checks the prerequisites and applies the pending migrations in one transaction. Returns the
/// versions applied now (empty when the database was already up to date). Warnings the
/// migrations raise (e.g. `service_role` created without BYPASSRLS) arrive as notices on the
/// connection.
pub async fn install(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, InstallError> {
    let row = client.query_one(preflight_sql(), &[]).await.map_err(|e| database_error(None, &e))?;
    let flag = |name: &str| row.try_get::<_, bool>(name).map_err(|e| database_error(None, &e));
    let wal_level: String = row.try_get("wal_level").map_err(|e| database_error(None, &e))?;
    check_preflight(&wal_level, flag("is_superuser")?, flag("can_replicate")?, flag("can_create_role")?)?;
    if !flag("can_create_schema")? {
        return Err(InstallError::NoCreateSchema);
    }
    let transaction = client.transaction().await.map_err(|e| database_error(None, &e))?;
    transaction.batch_execute(BOOTSTRAP_SQL).await.map_err(|e| database_error(None, &e))?;
    let applied: Vec<i32> = transaction
        .query(APPLIED_SQL, &[])
        .await
        .map_err(|e| database_error(None, &e))?
        .iter()
        .map(|row| row.try_get(0).map_err(|e| database_error(None, &e)))
        .collect::<Result<_, _>>()?;
    let mut done = Vec::new();
    for migration in pending(&applied) {
        let script = format!("{}\n;\n{}", migration.sql, record_sql(migration));
        transaction.batch_execute(&script).await.map_err(|e| database_error(Some(migration), &e))?;
        done.push(migration.version);
    }
    transaction.commit().await.map_err(|e| database_error(None, &e))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    fn cluster() -> (Cluster, crate::cluster::TempDirGuard) {
        Cluster::throwaway().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Applies the install the way the server does (bootstrap, applied versions, pending
    /// script, all in one transaction), with psql as `user`. Returns the versions applied.
    fn install_with_psql(cluster: &Cluster, user: &str) -> Vec<i32> {
        let applied_before = applied(cluster, user);
        let script = pending_script(&applied_before);
        let sql = format!("begin;\n{BOOTSTRAP_SQL}\n{}\ncommit;", script.unwrap_or_default());
        cluster.psql_as(user, &sql).unwrap_or_else(|e| panic!("install as {user}: {e}"));
        let applied_after = applied(cluster, user);
        applied_after.into_iter().filter(|v| !applied_before.contains(v)).collect()
    }

    fn applied(cluster: &Cluster, user: &str) -> Vec<i32> {
        let out = cluster
            .psql_as(user, &format!("begin;\n{BOOTSTRAP_SQL}\ncommit;\n{APPLIED_SQL}"))
            .unwrap_or_else(|e| panic!("{e}"));
        out.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    fn all_versions() -> Vec<i32> {
        MIGRATIONS.iter().map(|m| m.version).collect()
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        assert_eq!(pending_script(&all_versions()), None);
        let script = pending_script(&[1, 2]).unwrap();
        assert!(script.contains("values (3)") && script.contains("values (4)") && !script.contains("values (1)"));
    }

    #[test]
    fn preflight_messages_say_how_to_fix() {
        let error = check_preflight("replica", true, true, true).unwrap_err();
        assert_eq!(error.to_string(), "wal_level is replica; set wal_level = logical in postgresql.conf and restart PostgreSQL");
        assert_eq!(check_preflight("logical", true, false, false), Ok(()));
        assert!(check_preflight("logical", false, false, true).unwrap_err().to_string().contains("REPLICATION"));
        assert!(check_preflight("logical", false, true, false).unwrap_err().to_string().contains("CREATEROLE"));
        assert_eq!(check_preflight("logical", false, true, true), Ok(()));
    }

    #[test]
    fn install_twice_creates_everything_once() {
        let (cluster, _guard) = cluster();
        assert_eq!(install_with_psql(&cluster, "postgres"), all_versions());
        assert_eq!(install_with_psql(&cluster, "postgres"), Vec::<i32>::new(), "second install is a no-op");
        assert_eq!(applied(&cluster, "postgres"), all_versions());
        // Running every migration's SQL again directly also works (they are idempotent).
        for migration in MIGRATIONS {
            cluster.psql(&format!("begin;\n{}\n;\ncommit;", migration.sql)).unwrap_or_else(|e| panic!("re-running {}: {e}", migration.name));
        }

        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        // Roles.
        assert_eq!(q("select rolname, rolcanlogin, rolbypassrls from pg_roles where rolname in ('anon','authenticated','service_role') order by 1"),
                   "anon|f|f\nauthenticated|f|f\nservice_role|f|t");
        // Table shape.
        assert_eq!(
            q("select string_agg(attname || ':' || format_type(atttypid, atttypmod) || ':' || attnotnull || ':' || coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ',' order by attnum)
               from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
               where attrelid = 'realtime.messages'::regclass and attnum > 0 and not attisdropped"),
            "topic:text:true:,extension:text:true:,payload:jsonb:false:,event:text:false:,private:boolean:false:false,\
updated_at:timestamp without time zone:true:now(),inserted_at:timestamp without time zone:true:now(),\
id:uuid:true:gen_random_uuid(),binary_payload:bytea:false:"
        );
        assert_eq!(q("select pg_get_constraintdef(oid) from pg_constraint where conrelid = 'realtime.messages'::regclass and contype = 'p'"), "PRIMARY KEY (id, inserted_at)");
        assert_eq!(
            q("select pg_get_constraintdef(oid) from pg_constraint where conrelid = 'realtime.messages'::regclass and contype = 'c'"),
            "CHECK (((payload IS NULL) OR (binary_payload IS NULL)))"
        );
        assert_eq!(q("select relkind, relrowsecurity, relforcerowsecurity from pg_class where oid = 'realtime.messages'::regclass"), "p|t|f");
        assert_eq!(q("select count(*) from pg_policy where polrelid = 'realtime.messages'::regclass"), "0");
        assert_eq!(q("select pg_get_expr(relpartbound, oid) from pg_class where oid = 'realtime.messages_default'::regclass"), "DEFAULT");
        // Daily partitions, yesterday .. today+3 (UTC).
        let days = q("select string_agg(to_char(d, 'YYYY_MM_DD'), ',' order by d) from generate_series((now() at time zone 'utc')::date - 1, (now() at time zone 'utc')::date + 3, interval '1 day') d");
        for day in days.split(',') {
            assert_eq!(q(&format!("select to_regclass('realtime.messages_{day}') is not null")), "t", "partition {day}");
        }
        assert!(q("select indexdef from pg_indexes where schemaname = 'realtime' and indexname = 'messages_inserted_at_topic_index'").contains("(inserted_at DESC, topic) WHERE ((extension = 'broadcast'::text) AND (private IS TRUE))"));
        // Grants.
        for role in ["anon", "authenticated", "service_role"] {
            assert_eq!(
                q(&format!("select has_table_privilege('{role}', 'realtime.messages', 'SELECT'), has_table_privilege('{role}', 'realtime.messages', 'INSERT'), has_table_privilege('{role}', 'realtime.messages', 'UPDATE'), has_table_privilege('{role}', 'realtime.messages', 'DELETE'), has_schema_privilege('{role}', 'realtime', 'USAGE'), has_schema_privilege('{role}', 'auth', 'USAGE')")),
                "t|t|t|f|t|t",
                "{role}"
            );
            assert_eq!(q(&format!("select has_table_privilege('{role}', 'realtime.powa_schema_migrations', 'SELECT')")), "f");
        }
        // Functions.
        for signature in [
            "realtime.topic()",
            "realtime.send(jsonb,text,text,boolean)",
            "realtime.send_binary(bytea,text,text,boolean)",
            "realtime.broadcast_changes(text,text,text,text,text,record,record,text)",
            "realtime.powa_maintain_partitions()",
            "auth.uid()",
            "auth.role()",
            "auth.jwt()",
        ] {
            assert_eq!(q(&format!("select to_regprocedure('{signature}') is not null")), "t", "{signature}");
        }
        assert_eq!(q("select prosecdef, provolatile from pg_proc where oid = 'realtime.send(jsonb,text,text,boolean)'::regprocedure"), "f|v");
        assert_eq!(q("select provolatile from pg_proc where oid = 'realtime.topic()'::regprocedure"), "s");
        // Maintenance runs again without error.
        q(MAINTAIN_SQL);
    }

    #[test]
    fn send_and_topic() {
        let (cluster, _guard) = cluster();
        install_with_psql(&cluster, "postgres");
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));

        assert_eq!(q("select realtime.topic() is null"), "t");
        assert_eq!(q("select set_config('realtime.topic', 'room-1', false) is not null, realtime.topic()"), "t|room-1");

        q(r#"select realtime.send('{"a":1}', 'e', 't', false)"#);
        let row = q("select id, payload->>'id', payload->>'a', event, topic, private, extension, binary_payload is null from realtime.messages where topic = 't'");
        let fields: Vec<&str> = row.split('|').collect();
        assert_eq!(fields.len(), 8, "{row}");
        assert_eq!(fields[0], fields[1], "payload id is the row id: {row}");
        assert_eq!(&fields[2..], ["1", "e", "t", "f", "broadcast", "t"]);
        // A payload with its own id keeps it; the default is private.
        q(r#"select realtime.send('{"id":"mine","b":2}', 'e2', 't2')"#);
        assert_eq!(q("select payload::text, private from realtime.messages where topic = 't2'"), r#"{"b": 2, "id": "mine"}|t"#);
        // The topic is visible to the rest of the transaction (SET LOCAL), not beyond.
        let out = q(r#"begin; select realtime.send('{}', 'e', 'in-tx'); select realtime.topic(); commit;"#);
        assert_eq!(out.lines().last(), Some("in-tx"), "{out}");
        // A rolled-back send leaves no row.
        q(r#"begin; select realtime.send('{"c":3}', 'e', 'rolled-back', false); rollback;"#);
        assert_eq!(q("select count(*) from realtime.messages where topic = 'rolled-back'"), "0");
        // Binary.
        q(r"select realtime.send_binary('\x0102'::bytea, 'bin', 't3', false)");
        assert_eq!(q("select payload is null, encode(binary_payload, 'hex'), private from realtime.messages where topic = 't3'"), "t|0102|f");
        // Failures become a warning; the caller's transaction goes on.
        let (out, stderr) = cluster
            .psql_output("postgres", r#"select realtime.send('[1,2]', 'e', 'bad', false); select 'still here';"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.ends_with("still here"), "{out}");
        assert!(stderr.contains("WARNING:  WarnSendingBroadcastMessage:"), "{stderr}");
        assert_eq!(q("select count(*) from realtime.messages where topic = 'bad'"), "0");
    }

    #[test]
    fn send_as_a_role_subject_to_rls_needs_an_insert_policy() {
        let (cluster, _guard) = cluster();
        install_with_psql(&cluster, "postgres");
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        // No policies: authenticated's insert is refused, which is only a warning.
        let (_, stderr) = cluster
            .psql_output("postgres", r#"begin; set local role authenticated; select realtime.send('{}', 'e', 'room:1'); commit;"#)
            .unwrap();
        assert!(stderr.contains("WarnSendingBroadcastMessage: new row violates row-level security policy"), "{stderr}");
        assert_eq!(q("select count(*) from realtime.messages where topic = 'room:1'"), "0");
        // A policy on realtime.topic() lets it through.
        q("create policy room_write on realtime.messages for insert to authenticated with check (realtime.topic() like 'room:%')");
        q(r#"begin; set local role authenticated; select realtime.send('{}', 'e', 'room:1'); commit;"#);
        assert_eq!(q("select count(*) from realtime.messages where topic = 'room:1'"), "1");
        // service_role bypasses RLS.
        q(r#"begin; set local role service_role; select realtime.send('{}', 'e', 'other'); commit;"#);
        assert_eq!(q("select count(*) from realtime.messages where topic = 'other'"), "1");
    }

    #[test]
    fn broadcast_changes_errors_and_trigger() {
        let (cluster, _guard) = cluster();
        install_with_psql(&cluster, "postgres");
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));

        let error = cluster.psql("select realtime.broadcast_changes('t', 'e', 'INSERT', 'todos', 'public', null, null, 'STATEMENT')").unwrap_err().to_string();
        assert!(error.contains("function can only be triggered for each row, not for each statement"), "{error}");
        let error = cluster.psql("select realtime.broadcast_changes('t', 'e', 'TRUNCATE', 'todos', 'public', null, null)").unwrap_err().to_string();
        assert!(error.contains("Failed to process the row: Unexpected operation type: TRUNCATE"), "{error}");

        q("create table public.todos (id int primary key, owner text, title text)");
        q("create function public.todos_notify() returns trigger language plpgsql as $$
           begin
             perform realtime.broadcast_changes('todos:' || coalesce(new.owner, old.owner), tg_op, tg_op, tg_table_name, tg_table_schema, new, old);
             return null;
           end $$");
        q("create trigger todos_notify after insert or update or delete on public.todos for each row execute function public.todos_notify()");
        q("insert into public.todos values (1, 'u1', 'a')");
        q("update public.todos set title = 'b' where id = 1");
        q("delete from public.todos where id = 1");
        let rows = q("select event, private, payload - 'id', (payload->>'id')::uuid = id from realtime.messages where topic = 'todos:u1' order by inserted_at, event");
        let rows: Vec<&str> = rows.lines().collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows.contains(&r#"INSERT|t|{"table": "todos", "record": {"id": 1, "owner": "u1", "title": "a"}, "schema": "public", "operation": "INSERT", "old_record": null}|t"#), "{rows:?}");
        assert!(rows.contains(&r#"UPDATE|t|{"table": "todos", "record": {"id": 1, "owner": "u1", "title": "b"}, "schema": "public", "operation": "UPDATE", "old_record": {"id": 1, "owner": "u1", "title": "a"}}|t"#), "{rows:?}");
        assert!(rows.contains(&r#"DELETE|t|{"table": "todos", "record": null, "schema": "public", "operation": "DELETE", "old_record": {"id": 1, "owner": "u1", "title": "b"}}|t"#), "{rows:?}");
        // A statement-level trigger passing TG_LEVEL aborts the statement.
        q("create function public.todos_stmt() returns trigger language plpgsql as $$
           begin
             perform realtime.broadcast_changes('x', tg_op, tg_op, tg_table_name, tg_table_schema, null, null, tg_level);
             return null;
           end $$");
        q("create trigger todos_stmt after insert on public.todos for each statement execute function public.todos_stmt()");
        let error = cluster.psql("insert into public.todos values (2, 'u2', 'c')").unwrap_err().to_string();
        assert!(error.contains("function can only be triggered for each row, not for each statement"), "{error}");
        assert_eq!(q("select count(*) from public.todos"), "0");
    }

    #[test]
    fn auth_helpers_read_the_claims() {
        let (cluster, _guard) = cluster();
        install_with_psql(&cluster, "postgres");
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let uid = "5f0c6d52-9b8e-4c43-8f55-2f4b9d8a1c11";
        assert_eq!(q("select auth.uid() is null, auth.role() is null, auth.jwt() is null"), "t|t|t");
        assert_eq!(
            q(&format!(r#"begin; select set_config('request.jwt.claims', '{{"sub":"{uid}","role":"authenticated","x":1}}', true) is not null; select auth.uid(), auth.role(), auth.jwt()->>'x'; commit;"#)),
            format!("t\n{uid}|authenticated|1")
        );
        // The single-claim settings win over the JSON; empty settings count as unset.
        let other = "00000000-0000-0000-0000-000000000001";
        assert_eq!(
            q(&format!(r#"begin; select set_config('request.jwt.claims', '{{"sub":"{uid}","role":"anon"}}', true) is not null, set_config('request.jwt.claim.sub', '{other}', true) is not null, set_config('request.jwt.claim.role', '', true) is not null; select auth.uid(), auth.role(); commit;"#)),
            format!("t|t|t\n{other}|anon")
        );
        // A sub that is not a UUID raises.
        assert!(cluster.psql(r#"begin; select set_config('request.jwt.claims', '{"sub":"nope"}', true); select auth.uid(); commit;"#).is_err());
        // Works inside a policy evaluated as authenticated.
        q(&format!("create table public.notes (id int primary key, owner uuid); alter table public.notes enable row level security;
                    grant select on public.notes to authenticated;
                    create policy own on public.notes for select to authenticated using (owner = auth.uid());
                    insert into public.notes values (1, '{uid}'), (2, '{other}');"));
        assert_eq!(
            q(&format!(r#"begin; set local role authenticated; select set_config('request.jwt.claims', '{{"sub":"{uid}","role":"authenticated"}}', true) is not null; select id from public.notes; commit;"#)),
            "t\n1"
        );
    }

    #[test]
    fn existing_auth_functions_are_kept() {
        let (cluster, _guard) = cluster();
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        q("create schema auth; create function auth.uid() returns uuid language sql stable as $$ select '00000000-0000-0000-0000-00000000abcd'::uuid $$");
        q("create role anon nologin");
        install_with_psql(&cluster, "postgres");
        assert_eq!(q("select auth.uid()"), "00000000-0000-0000-0000-00000000abcd");
        assert_eq!(q("select to_regprocedure('auth.role()') is not null"), "t");
        // The existing role keeps its attributes (no NOINHERIT forced on it).
        assert_eq!(q("select rolinherit from pg_roles where rolname = 'anon'"), "t");
    }

    #[test]
    fn non_superuser_with_createrole_installs() {
        let (cluster, _guard) = cluster();
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        q("create role installer login createrole replication; grant create on database postgres to installer");
        let row = cluster.psql_as("installer", preflight_sql()).unwrap();
        let fields: Vec<&str> = row.split('|').collect();
        assert_eq!(&fields[..5], ["logical", "f", "t", "t", "t"], "{row}");
        check_preflight(fields[0], fields[1] == "t", fields[2] == "t", fields[3] == "t").unwrap();

        assert_eq!(install_with_psql(&cluster, "installer"), all_versions());
        assert_eq!(install_with_psql(&cluster, "installer"), Vec::<i32>::new());
        assert_eq!(q("select pg_get_userbyid(relowner) from pg_class where oid = 'realtime.messages'::regclass"), "installer");
        // Only a superuser may create a BYPASSRLS role before PostgreSQL 16: the role exists
        // without it (and the install raised a warning saying how to add it).
        assert_eq!(q("select rolbypassrls from pg_roles where rolname = 'service_role'"), "f");
        // It can become each API role, as the server must.
        for role in ["anon", "authenticated", "service_role"] {
            assert_eq!(cluster.psql_as("installer", &format!("begin; set local role {role}; select current_user; commit;")).unwrap(), role);
        }
        // As the owner it bypasses RLS on realtime.messages; it can send.
        cluster.psql_as("installer", r#"select realtime.send('{"a":1}', 'e', 't', false)"#).unwrap();
        assert_eq!(cluster.psql_as("installer", "select count(*) from realtime.messages").unwrap(), "1");
        // A user without REPLICATION is told how to fix it.
        q("create role weak login");
        let row = cluster.psql_as("weak", preflight_sql()).unwrap();
        let fields: Vec<&str> = row.split('|').collect();
        let error = check_preflight(fields[0], fields[1] == "t", fields[2] == "t", fields[3] == "t").unwrap_err();
        assert_eq!(error, InstallError::NoReplication);
    }

    #[test]
    fn install_over_tokio_postgres() {
        let (cluster, _guard) = cluster();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut client, connection) = tokio_postgres::connect(&cluster.url(), tokio_postgres::NoTls).await.unwrap();
            let driver = tokio::spawn(connection);
            assert_eq!(install(&mut client).await.unwrap(), all_versions());
            assert_eq!(install(&mut client).await.unwrap(), Vec::<i32>::new());
            client.batch_execute(MAINTAIN_SQL).await.unwrap();
            drop(client);
            let _ = driver.await;
        });
        assert_eq!(applied(&cluster, "postgres"), all_versions());
    }

    #[test]
    fn maintenance_drops_old_partitions_and_keeps_stray_days_in_default() {
        let (cluster, _guard) = cluster();
        install_with_psql(&cluster, "postgres");
        let q = |sql: &str| cluster.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        // An old partition (10 days ago) and an old row in the default partition.
        q("create table realtime.messages_2000_01_01 partition of realtime.messages for values from ('2000-01-01') to ('2000-01-02')");
        q("insert into realtime.messages (topic, extension, inserted_at) values ('old', 'broadcast', '1999-06-01')");
        // Rows for a future day with no partition land in the default partition.
        q("insert into realtime.messages (topic, extension, inserted_at) values ('future', 'broadcast', (now() at time zone 'utc')::date + 10)");
        assert_eq!(q("select tableoid::regclass from realtime.messages where topic = 'future'"), "realtime.messages_default");
        q(MAINTAIN_SQL);
        assert_eq!(q("select to_regclass('realtime.messages_2000_01_01') is null"), "t");
        assert_eq!(q("select count(*) from realtime.messages where topic = 'old'"), "0");
        assert_eq!(q("select count(*) from realtime.messages where topic = 'future'"), "1");
        // Inserting "now" works (the probe rows of the authorization checks need it).
        q("insert into realtime.messages (topic, extension, inserted_at, updated_at) values ('now', 'broadcast', now() at time zone 'utc', now() at time zone 'utc')");
        assert_ne!(q("select tableoid::regclass from realtime.messages where topic = 'now'"), "realtime.messages_default");
    }
}
