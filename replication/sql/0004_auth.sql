-- powa-realtime migration 4: the auth helpers policies use (PROTOCOL.md §7.5).
--
-- Supabase databases already have them: the schema and each function are created only when
-- missing, and an existing one is never replaced.

do $powa$
begin
  if not exists (select 1 from pg_catalog.pg_namespace where nspname = 'auth') then
    create schema auth;
  end if;

  if pg_catalog.to_regprocedure('auth.uid()') is null then
    create function auth.uid()
    returns uuid
    language sql
    stable
    as $fn$
      select coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
      )::uuid
    $fn$;
  end if;

  if pg_catalog.to_regprocedure('auth.role()') is null then
    create function auth.role()
    returns text
    language sql
    stable
    as $fn$
      select coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
      )::text
    $fn$;
  end if;

  if pg_catalog.to_regprocedure('auth.jwt()') is null then
    create function auth.jwt()
    returns jsonb
    language sql
    stable
    as $fn$
      select coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
      )::jsonb
    $fn$;
  end if;

  begin
    grant usage on schema auth to anon, authenticated, service_role;
  exception when insufficient_privilege then
    raise warning 'powa-realtime could not grant USAGE on schema auth to anon, authenticated, service_role (%); policies calling auth.uid() may fail; as the schema owner run: GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role', sqlerrm;
  end;
end
$powa$;
