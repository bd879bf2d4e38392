-- powa-realtime migration 2: realtime.messages and its partitions.
--
-- The table is partitioned by range of inserted_at (a UTC day per partition, named
-- messages_YYYY_MM_DD, as upstream does) plus a DEFAULT partition, realtime.messages_default.
-- The default partition is the safety net: an insert for a day whose partition does not
-- exist yet (the server was down while days passed, or a clock is off) still succeeds instead
-- of losing the message. realtime.powa_maintain_partitions() is the bounded housekeeping: it
-- creates the partitions for yesterday through today+3 and drops the daily partitions (and
-- deletes the default partition's rows) older than 72 hours. The server calls it at start
-- and periodically.

create table if not exists realtime.messages (
  topic text not null,
  extension text not null,
  payload jsonb,
  event text,
  private boolean default false,
  updated_at timestamp without time zone not null default now(),
  inserted_at timestamp without time zone not null default now(),
  id uuid not null default gen_random_uuid(),
  binary_payload bytea,
  constraint messages_payload_exclusive check (payload is null or binary_payload is null),
  constraint messages_pkey primary key (id, inserted_at)
) partition by range (inserted_at);

do $powa$
begin
  -- Only a partitioned realtime.messages (ours, or upstream's) gets partitions.
  if exists (select 1 from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where n.nspname = 'realtime' and c.relname = 'messages' and c.relkind = 'p')
     and not exists (select 1 from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
                     join pg_catalog.pg_partitioned_table p on p.partrelid = i.inhparent
                     where i.inhparent = 'realtime.messages'::regclass and p.partdefid = c.oid) then
    create table if not exists realtime.messages_default partition of realtime.messages default;
  end if;
end
$powa$;

create index if not exists messages_inserted_at_topic_index
  on realtime.messages (inserted_at desc, topic)
  where extension = 'broadcast' and private is true;

alter table realtime.messages enable row level security;

grant usage on schema realtime to anon, authenticated, service_role;
grant select, insert, update on realtime.messages to anon, authenticated, service_role;

create or replace function realtime.powa_maintain_partitions()
returns void
language plpgsql
as $powa$
declare
  utc_now timestamp without time zone := now() at time zone 'utc';
  today date := (now() at time zone 'utc')::date;
  retention constant interval := interval '72 hours';
  day date;
  partition_name text;
  has_default boolean;
  stray_rows boolean;
  old record;
begin
  if not exists (select 1 from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                 where n.nspname = 'realtime' and c.relname = 'messages' and c.relkind = 'p') then
    return;
  end if;
  -- One maintainer at a time (several servers may share a database).
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('powa_realtime.maintain_partitions'));
  has_default := pg_catalog.to_regclass('realtime.messages_default') is not null;

  for day in select d::date from pg_catalog.generate_series(today - 1, today + 3, interval '1 day') as g(d) loop
    partition_name := 'messages_' || pg_catalog.to_char(day, 'YYYY_MM_DD');
    if pg_catalog.to_regclass(format('realtime.%I', partition_name)) is not null then
      continue;
    end if;
    -- Rows of that day already in the default partition would make the new partition's
    -- creation fail; that day then stays in the default partition (pruned below).
    stray_rows := false;
    if has_default then
      execute 'select exists (select 1 from realtime.messages_default where inserted_at >= $1 and inserted_at < $2)'
        into stray_rows using day::timestamp, (day + 1)::timestamp;
    end if;
    if not stray_rows then
      execute format('create table if not exists realtime.%I partition of realtime.messages for values from (%L) to (%L)',
                     partition_name, day::timestamp, (day + 1)::timestamp);
    end if;
  end loop;

  for old in
    select c.relname
    from pg_catalog.pg_inherits i
    join pg_catalog.pg_class c on c.oid = i.inhrelid
    where i.inhparent = 'realtime.messages'::regclass
      and c.relname ~ '^messages_[0-9]{4}_[0-9]{2}_[0-9]{2}$'
  loop
    -- Every row of day D is older than 72 h once D + 1 day <= now - 72 h.
    if pg_catalog.to_date(substr(old.relname, 10), 'YYYY_MM_DD') + 1 <= utc_now - retention then
      execute format('drop table realtime.%I', old.relname);
    end if;
  end loop;

  if has_default then
    execute 'delete from realtime.messages_default where inserted_at < $1' using utc_now - retention;
  end if;
end
$powa$;

select realtime.powa_maintain_partitions();
