//! Per-op timing of tract runs, for benchmarks: with `LORA_GRAFT_PROFILE=FILE`, every
//! run adds its node times to a table (op, node, shapes, op details), written to FILE on exit.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

/// Time spent per node and shapes (the key: op, node, input -> output shapes, op
/// details): total, and how many times it ran.
type Table = HashMap<String, (Duration, usize)>;

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// The file `LORA_GRAFT_PROFILE` names, if set.
fn path() -> Option<&'static str> {
    static PATH: OnceLock<Option<String>> = OnceLock::new();
    PATH.get_or_init(|| std::env::var("LORA_GRAFT_PROFILE").ok())
        .as_deref()
}

/// Whether `LORA_GRAFT_PROFILE` is set.
pub fn enabled() -> bool {
    path().is_some()
}

/// Runs `plan` on `inputs`, timing each node.
pub fn run(plan: &Arc<TypedRunnableModel>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
    let mut state = tract_core::plan::SimpleState::new(plan)?;
    let mut local: Table = HashMap::new();
    let out = state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
        let shapes: Vec<String> = input.iter().map(|t| format!("{:?}", t.shape())).collect();
        let start = Instant::now();
        let r = tract_core::plan::eval(ctx, op_state, node, input);
        let out: Vec<String> = match &r {
            Ok(o) => o.iter().map(|t| format!("{:?}", t.shape())).collect(),
            Err(_) => vec![],
        };
        let info = node.op().info().unwrap_or_default().join(" ");
        let key = format!(
            "{}\t{}\t{} -> {}\t{info}",
            node.op().name(),
            node.name,
            shapes.join(" "),
            out.join(" ")
        );
        let e = local.entry(key).or_default();
        e.0 += start.elapsed();
        e.1 += 1;
        r
    })?;
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    for (k, (d, n)) in local {
        let e = t.entry(k).or_default();
        e.0 += d;
        e.1 += n;
    }
    Ok(out)
}

/// Writes the table to `LORA_GRAFT_PROFILE`'s file, slowest first (seconds, count, key);
/// a failure to write is a warning (the run itself went well).
pub fn write() {
    let Some(path) = path() else {
        return;
    };
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    let text: String = rows
        .iter()
        .map(|(k, (d, n))| format!("{:.4}\t{n}\t{k}\n", d.as_secs_f64()))
        .collect();
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("warning: could not write the profile to {path}: {e}");
    }
}
