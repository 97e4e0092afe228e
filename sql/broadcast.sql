-- walcast: broadcast from the database.
--
-- Load once per database:  psql "$DATABASE_URL" -f sql/broadcast.sql
-- (idempotent: safe to run again after upgrading walcast).
--
-- walcast.broadcast(topic, event, payload, private) writes a transactional
-- logical decoding message (pg_logical_emit_message) with the prefix
-- 'walcast.broadcast'. It travels in the WAL inside its transaction, so walcast
-- delivers it only if the transaction commits, in commit order with the
-- transaction's row changes, to every client joined to the channel `topic`
-- (the name given to supabase.channel(), without "realtime:") with the same
-- `private` flag. Clients receive
--   {type: "broadcast", event, payload, meta: {id: "<uuid>"}}.
-- Needs wal_level = logical (as walcast does anyway). Messages are sent to every
-- logical replication slot of the database whose plugin asks for them; pgoutput
-- only when the subscriber asks (walcast does).

create schema if not exists walcast;

create or replace function walcast.broadcast(
    topic text,
    event text,
    payload jsonb,
    private boolean default false
) returns void
language plpgsql
volatile
as $$
begin
    if topic is null or topic = '' then
        raise exception 'walcast.broadcast: topic must be a non-empty channel name';
    end if;
    if event is null or event = '' then
        raise exception 'walcast.broadcast: event must be a non-empty string';
    end if;
    perform pg_catalog.pg_logical_emit_message(
        true,
        'walcast.broadcast',
        pg_catalog.jsonb_build_object(
            'topic', topic,
            'event', event,
            'payload', coalesce(payload, '{}'::jsonb),
            'private', coalesce(private, false),
            'id', pg_catalog.gen_random_uuid()
        )::text
    );
end;
$$;

comment on function walcast.broadcast(text, text, jsonb, boolean) is
    'Broadcast {event, payload} to walcast channel `topic` when this transaction commits.';

-- A trigger function that broadcasts each row change:
--
--   create trigger orders_broadcast
--       after insert or update or delete on orders
--       for each row execute function walcast.broadcast_changes('orders');
--
-- Trigger arguments: the topic (default: the table's name) and whether the
-- topic is private (default false). The event is the operation (INSERT, UPDATE,
-- DELETE) and the payload
--   {schema, table, operation, record, old_record}
-- with record = to_jsonb(NEW) (null for DELETE) and old_record = to_jsonb(OLD)
-- (null for INSERT), as Supabase's realtime.broadcast_changes sends.
create or replace function walcast.broadcast_changes() returns trigger
language plpgsql
as $$
declare
    t text := coalesce(nullif(tg_argv[0], ''), tg_table_name);
    p boolean := coalesce(nullif(tg_argv[1], '')::boolean, false);
begin
    if tg_level <> 'ROW' then
        raise exception 'walcast.broadcast_changes() must be used in a FOR EACH ROW trigger';
    end if;
    perform walcast.broadcast(
        t,
        tg_op,
        pg_catalog.jsonb_build_object(
            'schema', tg_table_schema,
            'table', tg_table_name,
            'operation', tg_op,
            'record', case when tg_op = 'DELETE' then null else to_jsonb(new) end,
            'old_record', case when tg_op = 'INSERT' then null else to_jsonb(old) end
        ),
        p
    );
    if tg_op = 'DELETE' then
        return old;
    end if;
    return new;
end;
$$;

comment on function walcast.broadcast_changes() is
    'Row trigger: broadcast each change to walcast channel TG_ARGV[0] (default: the table name).';
