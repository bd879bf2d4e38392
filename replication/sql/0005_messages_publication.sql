-- The server's own publication for reading realtime.messages back (broadcasts from SQL,
-- PROTOCOL.md §3.4). Inserts only, published under the partitioned parent's name so every
-- daily partition arrives as realtime.messages. Never touches the user's supabase_realtime.
do $$
begin
  if not exists (select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime_messages_publication') then
    create publication supabase_realtime_messages_publication
      for table realtime.messages
      with (publish = 'insert', publish_via_partition_root = true);
  end if;
end
$$;
