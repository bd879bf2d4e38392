-- powa-realtime migration 1: the API roles.
--
-- anon, authenticated and service_role are created only when missing (Supabase databases
-- already have them). A non-superuser installer is made a member of all three so that the
-- server can SET ROLE to them when it evaluates policies.

do $powa$
declare
  installer_is_superuser boolean;
  api_role text;
  can_set boolean;
begin
  select r.rolsuper into installer_is_superuser from pg_catalog.pg_roles r where r.rolname = current_user;

  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
    if installer_is_superuser then
      create role service_role nologin noinherit bypassrls;
    else
      -- Before PostgreSQL 16 only a superuser may hand out BYPASSRLS.
      create role service_role nologin noinherit;
      raise warning 'powa-realtime created role service_role without BYPASSRLS (only a superuser can grant it), so row-level security applies to it; as a superuser run: ALTER ROLE service_role BYPASSRLS';
    end if;
  end if;

  if not installer_is_superuser then
    foreach api_role in array array['anon', 'authenticated', 'service_role'] loop
      if current_setting('server_version_num')::int >= 160000 then
        can_set := pg_catalog.pg_has_role(current_user, api_role, 'SET');
      else
        can_set := pg_catalog.pg_has_role(current_user, api_role, 'MEMBER');
      end if;
      if not can_set then
        begin
          execute format('grant %I to %I', api_role, current_user);
        exception when insufficient_privilege or invalid_grant_operation then
          raise warning 'powa-realtime could not make % a member of role % (%); as a superuser run: GRANT % TO %',
            current_user, api_role, sqlerrm, quote_ident(api_role), quote_ident(current_user);
        end;
      end if;
    end loop;
  end if;
end
$powa$;
