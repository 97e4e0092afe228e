//! Integration tests, one binary, against a real throwaway PostgreSQL cluster.

mod cases;
mod support;
