//! The rewriting passes, one per file. This is the one place that lists them.
//!
//! Pipelines:
//! - runtime preparation (before handing a model to tract): [`fold`].

pub mod fold;
