-- Write checks of private channels (PROTOCOL.md §6.6): may the current role insert a
-- realtime.messages row for this topic and extension? The probe row is always undone (the
-- inner block raises to roll it back), so nothing is ever committed. Runs as the caller: the
-- server sets role and claims first, so the table's INSERT policies decide.
create or replace function realtime.powa_can_insert(probe_topic text, probe_extension text)
returns boolean
language plpgsql
security invoker
as $$
declare
  granted boolean;
begin
  begin
    insert into realtime.messages (topic, extension, private, inserted_at, updated_at)
    values (probe_topic, probe_extension, true, now() at time zone 'utc', now() at time zone 'utc');
    raise exception using errcode = 'PW001', message = 'probe undone';
  exception
    when sqlstate 'PW001' then granted := true;
    when insufficient_privilege then granted := false;
  end;
  return granted;
end
$$;

grant execute on function realtime.powa_can_insert(text, text) to anon, authenticated, service_role;
