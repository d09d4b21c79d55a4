//! Grafting: creates a variant's adapter tensors for every target module and splices
//! its branch around every target node (`y' = y + Δ(x)`), or adapter inputs for
//! runtimes ([`inputs`]). No variant rewrites a weight; serving PiSSA on PEFT's `W_res`
//! does.

use std::collections::{BTreeMap, HashMap};

use tract_core::ndarray::{Array2, ArrayD};

use super::target::{Layout, Role, Target};
use super::variants::{init_params, Config, Dims, Params, Splice, Variant};
use crate::error::{Error, Result};
use crate::ir::build::{int_attr, Builder};
use crate::ir::{Def, Graph, Initializer, ValueId};
use crate::proto::tensor_proto::DataType;
use crate::rng::Rng;
use crate::tensor::Array;

pub mod inputs;
mod splice;
mod weight;

pub use crate::parallel::{par_map, par_map_then, PARALLEL_MEMORY_BUDGET};
pub use splice::{bias, Bias};
use splice::{compute_dtype, splice};
pub use weight::{
    apply_weight, effective_weight, onnx_layout, rounding, set_weight, weight_patch, WeightPatch,
};

/// What to graft.
#[derive(Clone)]
pub struct GraftOptions<'a> {
    /// The variant.
    pub variant: &'a dyn Variant,
    /// Its settings.
    pub cfg: Config,
    /// Element type the adapter tensors are stored and computed in (default float32).
    pub adapter_dtype: i32,
    /// Serve the adapters as graph inputs (ONNX Runtime's Multi-LoRA form) relative to
    /// this base, instead of splicing the variant's branch.
    pub adapter_inputs: Option<inputs::InputBase>,
    /// With adapter inputs: stack them in this many slots, one picked per batch row by
    /// the `adapter_index` input (always against the original weights).
    pub adapter_slots: Option<usize>,
    /// The calibration run's statistics, for a data-calibrated init (EVA, LoRA-GA);
    /// without them such a variant starts at its simple inits (values from a file).
    pub calibration: Option<&'a crate::calibrate::Calibration>,
    /// The output's data file, for rewritten weights (PiSSA's `W_res`) to be written to
    /// as they are made; without it they go to the scratch file until saved.
    pub sink: Option<&'a crate::ir::DataSink>,
}

impl GraftOptions<'_> {
    /// The options of `module` (its own rank and alpha, where it has them).
    pub fn for_module(&self, module: &str) -> GraftOptions<'_> {
        GraftOptions {
            cfg: self.cfg.for_module(module).into_owned(),
            ..self.clone()
        }
    }
}

/// One linear node a module's adapter was spliced around.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Site {
    /// The ONNX node.
    pub node: String,
    /// Its role.
    pub role: Role,
}

/// The adapter of one module.
#[derive(Debug, Clone)]
pub struct ModuleAdapter {
    /// Module path (the key prefix).
    pub module: String,
    /// Layer widths.
    pub dims: Dims,
    /// Tensors in torch layout, rounded to the adapter dtype, as f32.
    pub params: Params,
    /// Which tensors are trained.
    pub trainable: Vec<&'static str>,
    /// The nodes it was spliced around (two for a module called twice).
    pub sites: Vec<Site>,
}

/// The result of grafting.
#[derive(Debug, Clone, Default)]
pub struct Grafted {
    /// Per module, in graph order.
    pub modules: Vec<ModuleAdapter>,
    /// Tensors shared by every module (VeRA's projections), torch layout; each
    /// module's params hold its slice of them.
    pub shared: Params,
}

impl Grafted {
    /// Number of trainable adapter parameters.
    pub fn trainable_params(&self) -> u64 {
        self.modules
            .iter()
            .flat_map(|m| m.trainable.iter().map(|n| m.params[n].len() as u64))
            .sum()
    }
}

/// The default-domain opset of a model.
pub fn default_opset(proto: &crate::proto::ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| matches!(o.domain(), "" | "ai.onnx"))
        .map(|o| o.version())
        .unwrap_or(1)
}

/// Groups `targets` by module, in graph order (a module called twice has two nodes).
pub fn by_module(targets: &[Target]) -> Vec<(String, Vec<&Target>)> {
    let mut groups: Vec<(String, Vec<&Target>)> = Vec::new();
    for t in targets {
        match groups.iter_mut().find(|(m, _)| *m == t.module) {
            Some((_, g)) => g.push(t),
            None => groups.push((t.module.clone(), vec![t])),
        }
    }
    groups
}

/// The memory [`prepare_module`] of `group` holds at once.
fn module_cost(group: &[&Target], opts: &GraftOptions) -> usize {
    let t = group[0];
    let dims = Dims {
        d_in: t.d_in,
        d_out: t.d_out,
    };
    opts.variant.working_set(dims, &opts.cfg)
}

/// The pass: grafts `opts.variant` onto `targets`.
pub struct Graft<'a> {
    /// The linear layers to adapt.
    pub targets: &'a [Target],
    /// The variant and its settings.
    pub opts: GraftOptions<'a>,
    /// What it made.
    pub grafted: Grafted,
}

impl<'a> Graft<'a> {
    /// The pass for `targets`.
    pub fn new(targets: &'a [Target], opts: GraftOptions<'a>) -> Graft<'a> {
        Graft {
            targets,
            opts,
            grafted: Grafted::default(),
        }
    }
}

impl super::Pass for Graft<'_> {
    fn name(&self) -> &'static str {
        "graft"
    }

    fn run(&mut self, graph: &mut Graph, cx: &super::PassContext) -> Result<()> {
        self.grafted = graft_targets(graph, cx.opset, self.targets, &self.opts)?;
        Ok(())
    }
}

fn graft_targets(
    graph: &mut Graph,
    opset: i64,
    targets: &[Target],
    opts: &GraftOptions,
) -> Result<Grafted> {
    let groups = by_module(targets);
    for (module, group) in &groups {
        check_module(module, group[0], &opts.for_module(module))?;
    }
    let dtypes = crate::ir::infer::value_dtypes(graph)?;
    // Shared tensors, once, for the widest layer.
    let shared = if opts.variant.shared_params().is_empty() {
        Params::new()
    } else {
        let max = Dims {
            d_in: targets.iter().map(|t| t.d_in).max().unwrap_or(0),
            d_out: targets.iter().map(|t| t.d_out).max().unwrap_or(0),
        };
        let mut rng = Rng::for_name(opts.cfg.seed, "shared");
        let mut shared = opts.variant.shared_init(max, &opts.cfg, &mut rng);
        let round = rounding(opts.adapter_dtype);
        for t in shared.values_mut() {
            round(t);
        }
        shared
    };
    // 1. Adapter tensors and rewritten weights, read-only on the graph, in parallel;
    //    the weights leave memory in module order (the sink's file is the same every run).
    let prepared = par_map_then(
        &groups,
        |(_, group)| module_cost(group, opts),
        PARALLEL_MEMORY_BUDGET,
        |(module, group)| {
            prepare_module(
                graph,
                &dtypes,
                module,
                group,
                &opts.for_module(module),
                &shared,
            )
            .map_err(|e| e.context(format!("grafting '{module}'")))
        },
        |i, prepared| {
            let mut prepared = prepared?;
            if let Some(patch) = prepared.weight.take() {
                let placed = patch.place(opts.sink);
                prepared.weight =
                    Some(placed.map_err(|e| e.context(format!("grafting '{}'", groups[i].0)))?);
            }
            Ok(prepared)
        },
    );
    // 2. The edits, in graph order.
    let mut grafted = Grafted {
        shared,
        ..Grafted::default()
    };
    let index = match opts.adapter_slots {
        Some(_) => Some(inputs::add_adapter_index(graph)?),
        None => None,
    };
    for ((module, group), prepared) in groups.iter().zip(prepared) {
        let prepared = prepared?;
        let opts = opts.for_module(module);
        let m = apply_module(graph, &dtypes, opset, module, group, prepared, index, &opts)
            .map_err(|e| e.context(format!("grafting '{module}'")))?;
        grafted.modules.push(m);
    }
    Ok(grafted)
}

/// A module's adapter, computed before the graph is edited.
struct Prepared {
    dims: Dims,
    specs: Vec<super::variants::ParamSpec>,
    params: Params,
    weight: Option<WeightPatch>,
}

/// The settings against one module's layer (the rank, the variant's own checks), before
/// anything is allocated for them.
fn check_module(module: &str, t: &Target, opts: &GraftOptions) -> Result<()> {
    let (cfg, variant) = (&opts.cfg, opts.variant);
    let dims = Dims {
        d_in: t.d_in,
        d_out: t.d_out,
    };
    if variant.uses_rank() && (cfg.r == 0 || cfg.r > dims.d_in.min(dims.d_out)) {
        return Err(Error::Usage(format!(
            "r = {} does not fit layer '{module}' ({} -> {}): r must be between 1 and {}",
            cfg.r,
            dims.d_in,
            dims.d_out,
            dims.d_in.min(dims.d_out)
        )));
    }
    variant
        .check_layer(dims, cfg)
        .map_err(|why| Error::Usage(format!("{} on layer '{module}': {why}", variant.name())))
}

fn prepare_module(
    graph: &Graph,
    dtypes: &HashMap<ValueId, i32>,
    module: &str,
    group: &[&Target],
    opts: &GraftOptions,
    shared: &Params,
) -> Result<Prepared> {
    let t0 = group[0];
    let dims = Dims {
        d_in: t0.d_in,
        d_out: t0.d_out,
    };
    let cfg = &opts.cfg;
    let variant = opts.variant;
    // A quantized weight is read dequantized (DeLoRA's norms, PiSSA's SVD); MatMulNBits
    // has no dense weight in the graph for DoRA's norm.
    let serve_residual =
        opts.adapter_inputs == Some(inputs::InputBase::Trained) && variant.frozen_start();
    if t0.quantized && serve_residual {
        return Err(Error::Usage(format!(
            "serving {} on W_res rewrites the weight of '{module}', which is quantized ({}); serve it against the original weights (--against-original)",
            variant.name(),
            t0.op
        )));
    }
    if t0.op == "MatMulInteger" && variant.splice() == Splice::Input {
        return Err(Error::Usage(format!(
            "{} changes the input of '{module}', which onnxruntime's dynamic quantization (MatMulInteger) quantizes once for several layers; use a variant that adds to the output (lora, delora, ...)",
            variant.name()
        )));
    }
    if (t0.layout == super::target::Layout::Packed || t0.op == "MatMulInteger")
        && variant.weight_in_graph()
    {
        return Err(Error::Usage(format!(
            "{} reads the dense weight of '{module}' at every step, which is quantized ({} keeps it packed); use lora or delora, or a float or DequantizeLinear model",
            variant.name(),
            t0.op
        )));
    }
    let specs = variant.param_specs(dims, cfg);
    let mut rng = Rng::for_name(cfg.seed, module);
    let mut params = init_params(&specs, &mut rng);
    for spec in specs.iter().filter(|s| shared.contains_key(s.name)) {
        let slice = super::variants::leading_slice(&shared[spec.name], &spec.shape)
            .expect("shared tensors fit the widest layer");
        params.insert(spec.name, slice);
    }
    let round = rounding(opts.adapter_dtype);
    let mut w_res = None;
    let mut weight = None;
    if variant.reads_weight() {
        let w = effective_weight(graph, t0)?;
        w_res = variant.init(&w, &mut params, cfg, &mut rng, &round)?;
        if w_res.is_some() && t0.quantized {
            return Err(Error::Usage(format!(
                "{} rewrites the weight of '{module}', which is quantized ({}); use a float model",
                variant.name(),
                t0.op
            )));
        }
        weight = Some(w);
    }
    if let Some(stats) = opts.calibration.and_then(|c| c.modules.get(module)) {
        variant
            .init_calibrated(weight.as_ref(), stats, &mut params, cfg, &round)
            .map_err(|e| e.context(format!("{} on '{module}'", variant.name())))?;
    }
    if serve_residual {
        // Served on PEFT's base: W_res = W − s·B₀A₀, with the start as the defaults.
        let mut res = match weight {
            Some(w) => w,
            None => effective_weight(graph, t0)?,
        };
        super::variants::lora::Lora::start_low_rank(&params, cfg).subtract_from(&mut res);
        w_res = Some(res);
    }
    for p in params.values_mut() {
        round(p);
    }
    let weight = match w_res {
        Some(w_res) => Some(weight_patch(graph, dtypes, module, group, w_res)?),
        None => None,
    };
    Ok(Prepared {
        dims,
        specs,
        params,
        weight,
    })
}

#[allow(clippy::too_many_arguments)]
fn apply_module(
    graph: &mut Graph,
    dtypes: &HashMap<ValueId, i32>,
    opset: i64,
    module: &str,
    group: &[&Target],
    prepared: Prepared,
    index: Option<ValueId>,
    opts: &GraftOptions,
) -> Result<ModuleAdapter> {
    let Prepared {
        dims,
        specs,
        params,
        weight,
    } = prepared;
    let cfg = &opts.cfg;
    let trainable = specs
        .iter()
        .filter(|s| s.trainable)
        .map(|s| s.name)
        .collect();
    if let Some(base) = opts.adapter_inputs {
        let sites = serve_module(
            graph, dtypes, opset, module, group, &params, base, index, opts,
        )?;
        if let (Some(patch), inputs::InputBase::Trained) = (weight, base) {
            apply_weight(graph, module, group, patch);
        }
        return Ok(ModuleAdapter {
            module: module.to_string(),
            dims,
            trainable,
            params,
            sites,
        });
    }
    let adapter_dtype = opts.adapter_dtype;
    // The tensors, named after their adapter-file keys, in ONNX layout.
    let mut ids: BTreeMap<&'static str, ValueId> = BTreeMap::new();
    for spec in &specs {
        let key = format!("{module}.{}", spec.name);
        if graph.value_by_name(&key).is_some() {
            return Err(Error::Usage(format!(
                "the model already has a tensor named '{key}'; was it grafted already?"
            )));
        }
        let onnx = onnx_layout(&params[spec.name]);
        let array = Array::from_f32(onnx, adapter_dtype).expect("float adapter dtype");
        ids.insert(
            spec.name,
            graph.add_initializer(&key, Initializer::new(array.to_proto(""))),
        );
    }
    let mut branch = Builder::new(
        &mut *graph,
        opset,
        opts.adapter_dtype,
        format!("{module}.lora"),
        '.',
    );
    if opts.variant.weight_in_graph() {
        let w = graph_weight(&mut branch, dtypes, group[0])?;
        ids.insert("weight", w);
    }
    for (name, v) in opts.variant.module_values(&mut branch, &ids, cfg)? {
        ids.insert(name, v);
    }
    let mut sites = Vec::new();
    for t in group {
        splice(graph, dtypes, opset, module, t, &ids, opts)?;
        sites.push(Site {
            node: t.node_name.clone(),
            role: t.role,
        });
    }
    if let Some(patch) = weight {
        apply_weight(graph, module, group, patch);
    }
    Ok(ModuleAdapter {
        module: module.to_string(),
        dims,
        trainable,
        params,
        sites,
    })
}

/// Splices `module`'s adapter inputs (see [`inputs`]) around every node of `group`:
/// defaults are the variant's init as a low-rank update when the inputs are relative
/// to PEFT's `W_res` (PiSSA, OLoRA), empty otherwise.
#[allow(clippy::too_many_arguments)]
fn serve_module(
    graph: &mut Graph,
    dtypes: &HashMap<ValueId, i32>,
    opset: i64,
    module: &str,
    group: &[&Target],
    params: &Params,
    base: inputs::InputBase,
    index: Option<ValueId>,
    opts: &GraftOptions,
) -> Result<Vec<Site>> {
    let variant = opts.variant;
    let t0 = group[0];
    let dims = Dims {
        d_in: t0.d_in,
        d_out: t0.d_out,
    };
    variant.low_rank(params, &opts.cfg).map_err(|why| {
        Error::Usage(format!(
            "{} cannot be served as adapter inputs: {why}",
            variant.name()
        ))
    })?;
    let defaults = if base == inputs::InputBase::Trained && variant.frozen_start() {
        super::variants::lora::Lora::start_low_rank(params, &opts.cfg)
    } else {
        super::variants::LowRank::empty(dims)
    };
    // The inputs are in the model's own compute type: no casts around the branch.
    let dtype = compute_dtype(graph, dtypes, t0);
    let mut ids = inputs::add_inputs(graph, module, &defaults, dtype, opts.adapter_slots)?;
    let variant: &dyn Variant = match index {
        Some(index) => {
            ids.insert("adapter_index", index);
            &inputs::Slotted
        }
        None => &inputs::Served,
    };
    let mut b = Builder::new(&mut *graph, opset, dtype, format!("{module}.lora"), '.');
    for (name, v) in variant.module_values(&mut b, &ids, &opts.cfg)? {
        ids.insert(name, v);
    }
    let served = GraftOptions {
        variant,
        cfg: opts.cfg.clone(),
        adapter_dtype: dtype,
        adapter_inputs: None,
        adapter_slots: None,
        calibration: None,
        sink: None,
    };
    let mut sites = Vec::new();
    for t in group {
        splice(graph, dtypes, opset, module, t, &ids, &served)?;
        sites.push(Site {
            node: t.node_name.clone(),
            role: t.role,
        });
    }
    Ok(sites)
}

/// A module's adapter tensors as the graft pass initialises them from its weight `w`
/// (torch layout; the same seed gives the same tensors), and the weight the variant
/// rewrites it to, if any: merging, serving and exporting recompute the frozen start of
/// PiSSA and OLoRA from the original weights when a file (PEFT's) lacks it. Not for
/// variants with shared tensors (VeRA), which read none.
pub fn initial_params(
    w: &Array2<f32>,
    module: &str,
    variant: &dyn Variant,
    cfg: &Config,
    adapter_dtype: i32,
) -> Result<(Params, Option<Array2<f32>>)> {
    let dims = Dims {
        d_in: w.ncols(),
        d_out: w.nrows(),
    };
    let mut rng = Rng::for_name(cfg.seed, module);
    let mut params = init_params(&variant.param_specs(dims, cfg), &mut rng);
    let round = rounding(adapter_dtype);
    let rewritten = variant.init(w, &mut params, cfg, &mut rng, &round)?;
    for p in params.values_mut() {
        round(p);
    }
    Ok((params, rewritten))
}

/// `params` of `module` with the frozen start (`Init::Start` tensors: PiSSA's and
/// OLoRA's `A₀`, `B₀`) that a file lacks (PEFT's, lora-lite's) recomputed by
/// [`initial_params`] from the weight `weight` gives (asked for only then).
pub fn complete_start(
    params: Params,
    module: &str,
    variant: &dyn Variant,
    cfg: &Config,
    adapter_dtype: i32,
    weight: impl FnOnce() -> Result<Array2<f32>>,
) -> Result<Params> {
    // The names of a variant's tensors do not depend on the layer's widths.
    let names = Dims { d_in: 1, d_out: 1 };
    let lacking = variant
        .param_specs(names, cfg)
        .iter()
        .any(|s| s.init == super::variants::Init::Start && !params.contains_key(s.name));
    if !lacking {
        return Ok(params);
    }
    if variant.calibration(cfg).is_some() {
        return Err(Error::Usage(format!(
            "'{module}' lacks the frozen start of {} (lora_A0, lora_B0), which only the calibration data gives; use the adapter file lora-graft wrote",
            variant.name()
        )));
    }
    let (mut start, _) = initial_params(&weight()?, module, variant, cfg, adapter_dtype)?;
    start.extend(params);
    Ok(start)
}

/// The weight as target `t`'s node sees it, as `[d_in, d_out]` in the builder's dtype
/// with Gemm's alpha folded in.
fn graph_weight(b: &mut Builder, dtypes: &HashMap<ValueId, i32>, t: &Target) -> Result<ValueId> {
    let mut w = b.graph.node(t.node).inputs[1].expect("weight input");
    if dtypes.get(&w).is_some_and(|&d| d != b.dtype) {
        w = b.op("Cast", &[w], vec![int_attr("to", b.dtype as i64)])?;
    }
    if t.op == "Gemm" && t.layout == super::target::Layout::OutIn {
        w = b.op(
            "Transpose",
            &[w],
            vec![crate::ir::build::ints_attr("perm", &[1, 0])],
        )?;
    }
    if t.alpha != 1.0 {
        let alpha = b.scalar("alpha", t.alpha as f64);
        w = b.op("Mul", &[w, alpha], vec![])?;
    }
    Ok(w)
}
