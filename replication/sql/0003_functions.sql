-- powa-realtime migration 3: realtime.topic(), realtime.send(), realtime.send_binary(),
-- realtime.broadcast_changes() (PROTOCOL.md §7.2-7.4).
--
-- None is SECURITY DEFINER: an insert made by a caller subject to row-level security must
-- pass the INSERT policies of realtime.messages, as upstream.

create or replace function realtime.topic()
returns text
language sql
stable
as $powa$
  select nullif(current_setting('realtime.topic', true), '')
$powa$;

create or replace function realtime.send(payload jsonb, event text, topic text, private boolean default true)
returns void
language plpgsql
as $powa$
declare
  message_id uuid;
  body jsonb;
begin
  begin
    message_id := gen_random_uuid();
    if payload is null or payload ? 'id' then
      body := payload;
    elsif jsonb_typeof(payload) = 'object' then
      body := payload || jsonb_build_object('id', message_id);
    else
      raise exception 'payload must be a JSON object, not %', jsonb_typeof(payload);
    end if;
    -- Visible to INSERT policies as realtime.topic(), until the end of the transaction.
    perform set_config('realtime.topic', topic, true);
    insert into realtime.messages (id, payload, event, topic, private, extension)
    values (message_id, body, event, topic, private, 'broadcast');
  exception when others then
    raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
  end;
end
$powa$;

create or replace function realtime.send_binary(payload bytea, event text, topic text, private boolean default true)
returns void
language plpgsql
as $powa$
declare
  message_id uuid;
begin
  begin
    message_id := gen_random_uuid();
    perform set_config('realtime.topic', topic, true);
    insert into realtime.messages (id, binary_payload, event, topic, private, extension)
    values (message_id, payload, event, topic, private, 'broadcast');
  exception when others then
    raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
  end;
end
$powa$;

create or replace function realtime.broadcast_changes(
  topic_name text,
  event_name text,
  operation text,
  table_name text,
  table_schema text,
  new record,
  old record,
  level text default 'ROW'
)
returns void
language plpgsql
as $powa$
declare
  change jsonb;
begin
  if level = 'STATEMENT' then
    raise exception 'function can only be triggered for each row, not for each statement';
  end if;
  if operation is null or operation not in ('INSERT', 'UPDATE', 'DELETE') then
    raise exception 'Unexpected operation type: %', operation;
  end if;
  change := jsonb_build_object(
    'old_record', old,
    'record', new,
    'operation', operation,
    'table', table_name,
    'schema', table_schema
  );
  perform realtime.send(change, event_name, topic_name);
exception when others then
  raise exception 'Failed to process the row: %', sqlerrm;
end
$powa$;
