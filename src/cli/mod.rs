//! The command line.

pub mod args;
pub mod demo;
pub mod setup;
pub mod tail;
