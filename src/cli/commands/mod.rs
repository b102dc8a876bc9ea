//! One module per group of subcommands. Each keeps its cluster calls in a
//! thin `async` layer and its row building and filtering in plain functions
//! with unit tests.

pub mod access;
pub mod audit;
pub mod exposure;
pub mod grant;
pub mod inject;
pub mod state;
pub mod usage;
