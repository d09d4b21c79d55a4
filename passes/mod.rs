//! The rewriting passes, one per file, behind one contract ([`Pass`]) and one runner
//! ([`run_pass`]) that compacts, validates and, on request, dumps around each. This is
//! the one place that lists them and their pipelines.
//!
//! Pipelines:
//! - analysis: [`target::run`] finds the linear layers to adapt (read-only), after
//!   [`expose::ExposeProjections`] where an adapter lands on a projection that
//!   onnxruntime's `Attention` fused (`jobs::expose_fused_projections`).
//! - grafting: targets, then [`graft::Graft`] with a variant of [`variants::VARIANTS`].
//! - applying a trained adapter: targets (the file's modules), [`graft::Graft`], then
//!   its values.
//! - merging: targets (the file's modules), then [`merge::Merge`].
//! - training graph: grafting, [`lower::Lower`] (onnxruntime's fused ops into default
//!   ones), then the loss ([`grad::loss`]) and [`grad::Grad`].
//! - `--lower`: grafting, then [`lower::Lower`] on the emitted model.
//! - runtime preparation (before handing a model to tract): [`prepare_for_tract`].
//!
//! `LORA_GRAFT_DUMP=<pass>[,<pass>...]` (or `all`) writes the canonical dump of the graph
//! before and after each run of those passes, and their line diff, into
//! `LORA_GRAFT_DUMP_DIR` (default `lora_graft_dump/`), as rustc's `-Zdump-mir` does.

pub mod expose;
pub mod fold;
pub mod gemm_scalars;
pub mod grad;
pub mod graft;
pub mod lower;
pub mod merge;
pub mod target;
pub mod variants;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Result, ResultExt};
use crate::ir::{Graph, Remap};

/// What every pass sees besides the graph.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassContext {
    /// The model's default-domain opset (decides attribute-or-input op forms).
    pub opset: i64,
}

/// A pass over the IR: configured when made, run once on a graph, its results kept in
/// the pass value for the caller to take.
pub trait Pass {
    /// The name `LORA_GRAFT_DUMP` selects and validation errors carry.
    fn name(&self) -> &'static str;

    /// Rewrites `graph`. The runner compacts and validates afterwards.
    fn run(&mut self, graph: &mut Graph, cx: &PassContext) -> Result<()>;
}

/// Runs `pass` on `graph`: dumps before (when asked), runs, compacts, validates, dumps
/// after. Returns how compaction renumbered the ids held before the pass.
pub fn run_pass(graph: &mut Graph, cx: &PassContext, pass: &mut dyn Pass) -> Result<Remap> {
    let name = pass.name();
    let dump = dump_requested(name);
    let before = if dump { Some(graph.dump()?) } else { None };
    pass.run(graph, cx)?;
    let remap = graph.compact();
    graph.validate().context(name)?;
    if let Some(before) = before {
        write_dump(name, &before, &graph.dump()?);
    }
    Ok(remap)
}

/// The passes that make a model runnable by tract for concrete input shapes, in order.
pub fn prepare_for_tract(
    graph: &mut Graph,
    input_shapes: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    let cx = PassContext::default();
    run_pass(graph, &cx, &mut fold::Fold::new(input_shapes)).context("fold")?;
    run_pass(graph, &cx, &mut gemm_scalars::GemmScalars::default()).context("gemm_scalars")?;
    Ok(())
}

fn dump_requested(pass: &str) -> bool {
    std::env::var("LORA_GRAFT_DUMP")
        .map(|v| v.split(',').any(|p| p.trim() == pass || p.trim() == "all"))
        .unwrap_or(false)
}

/// Writes `<n>.<pass>.before.txt`, `.after.txt` and `.diff` (numbered in run order).
fn write_dump(pass: &str, before: &str, after: &str) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::var_os("LORA_GRAFT_DUMP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("lora_graft_dump"));
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let file = |ext: &str| dir.join(format!("{n:03}.{pass}.{ext}"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(file("before.txt"), before)?;
        std::fs::write(file("after.txt"), after)?;
        std::fs::write(file("diff"), crate::ir::dump::line_diff(before, after))
    });
    if let Err(e) = written {
        eprintln!(
            "warning: LORA_GRAFT_DUMP: cannot write {}: {e}",
            dir.display()
        );
    }
}
