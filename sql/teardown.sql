-- walcast teardown, by hand: the same as `walcast teardown --slot walcast
-- --publication walcast`. Review, then run:
--
--   psql "$DATABASE_URL" -f sql/teardown.sql
--
-- Variables (psql -v name=value): publication (default walcast), slot (default
-- walcast). Dropping a slot that a running walcast uses fails ("is active for
-- PID …"): stop walcast first, or terminate it with
--   SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'walcast';

\set ON_ERROR_STOP on
\if :{?publication}
\else
  \set publication walcast
\endif
\if :{?slot}
\else
  \set slot walcast
\endif

SELECT pg_catalog.pg_drop_replication_slot(slot_name)
  FROM pg_catalog.pg_replication_slots
 WHERE slot_name = :'slot';

DROP PUBLICATION IF EXISTS :"publication";
