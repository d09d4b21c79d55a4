//! The rewriting passes, one per file. This is the one place that lists them.
//!
//! Pipelines:
//! - analysis: [`target`] finds the linear layers to adapt.
//! - grafting: [`target`], then [`graft`] with a variant of [`variants::VARIANTS`].
//! - applying a trained adapter: [`target`] (the file's modules), [`graft`], then its values.
//! - merging: [`target`] (the file's modules), then [`merge`].
//! - training graph: grafting, then [`grad::loss`] and [`grad`].
//! - runtime preparation (before handing a model to tract): [`prepare_for_tract`].

pub mod fold;
pub mod gemm_scalars;
pub mod grad;
pub mod graft;
pub mod merge;
pub mod target;
pub mod variants;

use std::collections::HashMap;

use crate::error::{Result, ResultExt};
use crate::ir::Graph;

/// The passes that make a model runnable by tract for concrete input shapes, in order.
pub fn prepare_for_tract(
    graph: &mut Graph,
    input_shapes: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    fold::run(graph, input_shapes).context("fold")?;
    gemm_scalars::run(graph).context("gemm_scalars")?;
    graph.validate().context("prepare_for_tract")
}
