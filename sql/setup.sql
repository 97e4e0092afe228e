-- walcast setup, by hand: the same changes `walcast setup` makes, for a DBA to
-- review and run with psql. Keep in step with src/setup.rs (a test checks that
-- this file and the CLI leave the catalog in the same state).
--
--   psql "$DATABASE_URL" -v tables='public.orders, public.items' -f sql/setup.sql
--
-- Variables (psql -v name=value):
--   tables       required: the tables to publish, as SQL names separated by commas
--   publication  default walcast
--   slot         default walcast
--
-- Equivalent to:
--   walcast setup --publication walcast --tables public.orders,public.items \
--                 --replica-identity full --slot walcast --create-slot
--
-- Needs: the CREATE privilege on the database and ownership of the tables (or
-- superuser); the REPLICATION attribute (or superuser) for the slot; and
-- wal_level = logical (changing it needs a restart of PostgreSQL).

\set ON_ERROR_STOP on
\if :{?publication}
\else
  \set publication walcast
\endif
\if :{?slot}
\else
  \set slot walcast
\endif
\if :{?tables}
\else
  \echo 'sql/setup.sql: set the tables to publish, e.g. psql -v tables=public.orders,public.items -f sql/setup.sql'
  \quit
\endif

BEGIN;

-- The publication: which tables walcast streams. INSERT, UPDATE, DELETE and
-- TRUNCATE are all published (PostgreSQL's default).
CREATE PUBLICATION :"publication" FOR TABLE :tables;

-- Complete old rows in UPDATE and DELETE events (and DELETE filtering on any
-- column): REPLICA IDENTITY FULL on every table of the publication.
SELECT format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', schemaname, tablename)
  FROM pg_catalog.pg_publication_tables
 WHERE pubname = :'publication'
 ORDER BY schemaname, tablename
\gexec

COMMIT;

-- The replication slot walcast consumes, with the built-in pgoutput plugin. It
-- keeps WAL from this point on until walcast confirms it: drop it (see
-- sql/teardown.sql) if walcast is retired, or the disk fills up.
SELECT slot_name, lsn
  FROM pg_catalog.pg_create_logical_replication_slot(:'slot', 'pgoutput');
