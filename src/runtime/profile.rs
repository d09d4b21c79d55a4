//! Per-op timing of tract runs, for benchmarks: with `LORA_GRAFT_PROFILE=FILE`, every
//! run adds its node times to a table (op, node, shapes, op details), written to FILE on exit;
//! and `FILE.memory` gets the tensors alive at the largest peak of any run (tract's order
//! and flushes replayed on the sizes the run produced), grouped by op and node name.

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
    let mut bytes: HashMap<usize, usize> = HashMap::new();
    let out = state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
        let shapes: Vec<String> = input.iter().map(|t| format!("{:?}", t.shape())).collect();
        let start = Instant::now();
        let r = tract_core::plan::eval(ctx, op_state, node, input);
        let out: Vec<String> = match &r {
            Ok(o) => o.iter().map(|t| format!("{:?}", t.shape())).collect(),
            Err(_) => vec![],
        };
        if let Ok(o) = &r {
            let size = o.iter().map(|t| t.len() * t.datum_type().size_of()).sum();
            bytes.insert(node.id, size);
        }
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
    record_peak(plan, &bytes);
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    for (k, (d, n)) in local {
        let e = t.entry(k).or_default();
        e.0 += d;
        e.1 += n;
    }
    Ok(out)
}

/// The largest peak of live tensor bytes any run reached, and its report.
fn peak() -> &'static Mutex<(usize, String)> {
    static PEAK: OnceLock<Mutex<(usize, String)>> = OnceLock::new();
    PEAK.get_or_init(Default::default)
}

/// Replays `plan`'s order on the output sizes of a run: a node's outputs live from its
/// step until the step of its last consumer (tract flushes them then), the plan's outputs
/// to the end; keeps the report of the step with the most bytes alive if it is the
/// largest yet.
fn record_peak(plan: &Arc<TypedRunnableModel>, bytes: &HashMap<usize, usize>) {
    let order = plan.order_without_consts();
    let model = plan.model();
    let step: HashMap<usize, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let outputs: std::collections::HashSet<usize> = model
        .output_outlets()
        .unwrap_or(&[])
        .iter()
        .map(|o| o.node)
        .collect();
    let last_use = |n: usize| -> usize {
        if outputs.contains(&n) {
            return usize::MAX;
        }
        model.nodes()[n]
            .outputs
            .iter()
            .flat_map(|o| o.successors.iter())
            .filter_map(|inlet| step.get(&inlet.node).copied())
            .max()
            .unwrap_or(step[&n])
    };
    let mut alive: Vec<(usize, usize)> = Vec::new(); // (node, last use)
    let (mut live, mut best, mut best_alive) = (0usize, 0usize, Vec::new());
    for (i, &n) in order.iter().enumerate() {
        let size = bytes.get(&n).copied().unwrap_or(0);
        live += size;
        alive.push((n, last_use(n)));
        if live > best {
            best = live;
            best_alive = alive.iter().map(|&(n, _)| (n, i)).collect::<Vec<_>>();
        }
        alive.retain(|&(m, last)| {
            let keep = last > i;
            if !keep {
                live -= bytes.get(&m).copied().unwrap_or(0);
            }
            keep
        });
    }
    let mut p = peak().lock().unwrap_or_else(|e| e.into_inner());
    if best <= p.0 {
        return;
    }
    let at = best_alive.first().map(|&(_, i)| i).unwrap_or(0);
    let mut groups: HashMap<String, (usize, usize)> = HashMap::new();
    for &(n, _) in &best_alive {
        let node = &model.nodes()[n];
        let name: String = node
            .name
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        let g = groups
            .entry(format!("{}\t{name}", node.op().name()))
            .or_default();
        g.0 += bytes.get(&n).copied().unwrap_or(0);
        g.1 += 1;
    }
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    let mut text = format!(
        "peak {:.1} MB of tensors alive at step {at} ({}), digits in names as #\nMB\tnodes\top\tnode\n",
        best as f64 / 1e6,
        order.get(at).map(|&n| model.nodes()[n].name.as_str()).unwrap_or("")
    );
    for (k, (b, count)) in rows {
        text += &format!("{:.2}\t{count}\t{k}\n", b as f64 / 1e6);
    }
    *p = (best, text);
}

/// Writes the table to `LORA_GRAFT_PROFILE`'s file, slowest first (seconds, count, key),
/// and the largest peak's tensors to `FILE.memory`; a failure to write is a warning (the
/// run itself went well).
pub fn write() {
    let Some(path) = path() else {
        return;
    };
    let memory = format!("{path}.memory");
    let report = peak().lock().unwrap_or_else(|e| e.into_inner()).1.clone();
    if let Err(e) = std::fs::write(&memory, report) {
        eprintln!("warning: could not write the memory profile to {memory}: {e}");
    }
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
