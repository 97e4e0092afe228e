//! Decode: pgoutput bytes → committed transactions of typed change events. Pure
//! and total: no IO, no panics on any input.

pub mod assembler;
pub mod event;
pub mod pgoutput;
pub mod relation;
pub mod value;
