//! Test support: the throwaway PostgreSQL cluster ([`walcast::testing`], shared
//! with the benchmark driver) and helpers to run the `walcast` binary.
//!
//! One cluster serves all tests of the binary; each test makes its own database,
//! slot and publication.

#![allow(dead_code)]

pub mod js;
pub mod walcast;

use std::sync::OnceLock;

pub use ::walcast::testing::{free_port, wait_for, Cluster};

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// The cluster shared by the tests of this process.
pub fn cluster() -> &'static Cluster {
    SHARED.get_or_init(|| Cluster::start(&[]))
}
