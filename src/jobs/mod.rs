//! The user-facing jobs, one file each, as short functions over typed requests:
//! grafting and applying ([`graft`]), merging ([`merge`]), training graphs
//! ([`training_graph`]); where they write ([`output`]).

pub mod export;
pub mod graft;
pub mod merge;
pub mod output;
pub mod request;
pub mod training_graph;

pub use graft::{
    apply, expose_fused_projections, graft, graft_writing_to, lower, set_param, Outcome,
};
pub use merge::{merge, merge_writing_to};
pub use output::{default_paths, write, write_staged, OutputPlan};
pub use request::{AdapterDtype, GraftRequest, TrainingRequest};
pub use training_graph::{input_shapes, training_graph, training_graph_of, Training};

/// This machine's memory in bytes (`MemTotal`), or unbounded where it cannot be read.
pub fn machine_memory() -> u128 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(u64::MAX as u128)
}

/// Refuses, before anything is allocated for it, a batch of `batch` rows of `seq`
/// tokens (when `model`'s inputs have a sequence axis) whose float32 input to the
/// widest target (`width` values a position) alone exceeds this machine's memory;
/// `flags` name the options that set it.
pub fn check_batch_fits(
    model: &crate::Model,
    (batch, seq): (usize, usize),
    width: usize,
    flags: &str,
) -> crate::Result<()> {
    // A sequence axis is one whose size follows `seq`.
    let shapes = |seq| input_shapes(model, 1, seq).ok();
    let positions = if shapes(1) != shapes(2) { seq } else { 1 };
    let need = batch as u128 * positions as u128 * width as u128 * 4;
    let total = machine_memory();
    if need > total {
        return Err(crate::Error::Usage(format!(
            "{flags}: a batch of {batch} rows of {positions} positions needs {:.1} GiB for one layer's input alone ({width} values a position), more than this machine's {:.1} GiB; lower them",
            need as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}
