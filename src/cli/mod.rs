//! The command line (layer 7).
//!
//! - [`args`]: subcommands and flags.
//! - [`setup`]: `walcast setup`, `status`, `teardown`.
//! - [`tail`]: `walcast tail`, every change as a JSON line.
//! - [`log`]: `walcast log`, the change log (the audit trail) as JSON lines.
//! - [`demo`]: `walcast demo`: a throwaway cluster, the bakery, traffic, `serve`.

pub mod args;
pub mod demo;
pub mod log;
pub mod setup;
pub mod tail;
