//! The main job, end to end: target, graft, and write the model and its adapter file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::adapter::{AdapterFile, CFG_KEY, GRAFT_KEY};
use crate::error::{Error, Result};
use crate::model::{Model, SaveOptions, SaveReport};
use crate::passes::graft::{self, GraftOptions, Grafted};
use crate::passes::target::{self, Filters, Role, Targeting};
use crate::passes::variants::{self, Config, Variant};
use crate::proto::tensor_proto::DataType;
use crate::tensor::Array;
use tract_core::ndarray::ArrayD;

/// Everything `lora-graft model.onnx --variant ...` was asked for.
#[derive(Debug, Clone)]
pub struct GraftRequest {
    /// Variant name (`lora`, `pissa`, `delora`).
    pub variant: String,
    /// Rank, alpha, seeds, variant options.
    pub cfg: Config,
    /// Adapter element type (ONNX), default float32.
    pub adapter_dtype: i32,
    /// Targeting.
    pub filters: Filters,
    /// The filters as the user wrote them, for the `cfg` metadata.
    pub filter_text: FilterText,
}

/// lora-lite's filter fields as given.
#[derive(Debug, Clone)]
pub struct FilterText {
    /// `target_roles`.
    pub roles: Vec<String>,
    /// `target_names`.
    pub names: Vec<String>,
    /// `exclude_names`.
    pub excludes: Vec<String>,
    /// `layers`.
    pub layers: Option<Vec<usize>>,
}

impl Default for FilterText {
    fn default() -> Self {
        FilterText {
            roles: vec!["reader".into(), "writer".into()],
            names: vec![],
            excludes: vec!["lm_head".into(), "embed_tokens".into()],
            layers: None,
        }
    }
}

impl Default for GraftRequest {
    fn default() -> Self {
        GraftRequest {
            variant: "lora".into(),
            cfg: Config::default(),
            adapter_dtype: DataType::Float as i32,
            filters: Filters::default(),
            filter_text: FilterText::default(),
        }
    }
}

/// What grafting did.
pub struct Outcome {
    /// The variant used.
    pub variant: &'static dyn Variant,
    /// The targets.
    pub targeting: Targeting,
    /// The adapters.
    pub grafted: Grafted,
}

/// torch's name of an ONNX float type.
pub fn torch_dtype_name(elem_type: i32) -> &'static str {
    match DataType::try_from(elem_type) {
        Ok(DataType::Float16) => "float16",
        Ok(DataType::Bfloat16) => "bfloat16",
        Ok(DataType::Double) => "float64",
        _ => "float32",
    }
}

/// Parses `float32`, `float16`, `bfloat16` (or `fp32`, `fp16`, `bf16`).
pub fn parse_dtype(s: &str) -> Result<i32> {
    Ok(match s {
        "float32" | "fp32" | "f32" => DataType::Float,
        "float16" | "fp16" | "f16" => DataType::Float16,
        "bfloat16" | "bf16" => DataType::Bfloat16,
        other => {
            return Err(Error::Usage(format!(
                "unknown adapter dtype '{other}'; use float32, float16 or bfloat16"
            )))
        }
    } as i32)
}

/// Targets and grafts `model` in memory.
pub fn graft(model: &mut Model, req: &GraftRequest) -> Result<Outcome> {
    let variant = variants::variant(&req.variant)?;
    let targeting = target::run(&model.graph, &req.filters)
        .map_err(|e| e.context(format!("{}: targeting", model.path.display())))?;
    let opts = GraftOptions {
        variant,
        cfg: req.cfg.clone(),
        adapter_dtype: req.adapter_dtype,
    };
    let opset = graft::default_opset(&model.proto);
    let grafted = graft::run(&mut model.graph, opset, &targeting.targets, &opts)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    Ok(Outcome {
        variant,
        targeting,
        grafted,
    })
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("json")
}

fn json_list(items: &[String]) -> String {
    let v: Vec<String> = items.iter().map(|s| json_str(s)).collect();
    format!("[{}]", v.join(", "))
}

/// lora-lite's `cfg` JSON, as Python's `json.dumps` writes it.
pub fn cfg_json(variant: &dyn Variant, req: &GraftRequest) -> String {
    let t = &req.filter_text;
    let layers = match &t.layers {
        None => "null".to_string(),
        Some(l) => format!(
            "[{}]",
            l.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut fields = vec![
        ("variant", json_str(variant.name())),
        ("r", req.cfg.r.to_string()),
        ("alpha", req.cfg.alpha_json.clone()),
        ("dtype", json_str(torch_dtype_name(req.adapter_dtype))),
        ("target_roles", json_list(&t.roles)),
        ("target_names", json_list(&t.names)),
        ("exclude_names", json_list(&t.excludes)),
        ("layers", layers),
    ];
    fields.extend(variant.cfg_fields(&req.cfg));
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

impl Outcome {
    /// The adapter file: lora-lite keys and layout, `cfg`, and lora-graft's metadata.
    pub fn adapter_file(&self, req: &GraftRequest) -> AdapterFile {
        let mut tensors = BTreeMap::new();
        for m in &self.grafted.modules {
            for (name, values) in &m.params {
                let a = Array::from_f32(values.clone(), req.adapter_dtype).expect("float dtype");
                tensors.insert(format!("{}.{name}", m.module), a);
            }
        }
        let targets: Vec<serde_json::Value> = self
            .grafted
            .modules
            .iter()
            .map(|m| {
                serde_json::json!({
                    "module": m.module, "d_in": m.dims.d_in, "d_out": m.dims.d_out,
                    "sites": m.sites,
                })
            })
            .collect();
        let graft = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "rslora": req.cfg.rslora,
            "pissa_niter": req.cfg.pissa_niter,
            "seed": req.cfg.seed,
            "layout": "torch",
            "targets": targets,
        });
        let metadata = BTreeMap::from([
            (CFG_KEY.to_string(), cfg_json(self.variant, req)),
            (GRAFT_KEY.to_string(), graft.to_string()),
        ]);
        AdapterFile { metadata, tensors }
    }
}

/// `<stem>.<variant>.onnx` beside the input, and the adapter file beside the model
/// (`<model stem>.safetensors`).
pub fn default_paths(
    input: &Path,
    variant: &str,
    out: Option<&Path>,
    adapter: Option<&Path>,
) -> (PathBuf, PathBuf) {
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| {
        let stem = input.file_stem().unwrap_or_default().to_string_lossy();
        input.with_file_name(format!("{stem}.{variant}.onnx"))
    });
    let adapter = adapter
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.with_extension("safetensors"));
    (out, adapter)
}

/// Checks, before any work, that the model `out` and the adapter file can be written
/// without touching the input: neither is the input, they differ, and their folders
/// exist and are writable.
pub fn check_output_paths(input: &Path, out: &Path, adapter_path: &Path) -> Result<()> {
    for (what, p) in [("output model", out), ("adapter file", adapter_path)] {
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(p), std::fs::canonicalize(input)) {
            if a == b {
                return Err(Error::Usage(format!(
                    "{}: the {what} would overwrite the input model; choose another path",
                    p.display()
                )));
            }
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let writable = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            // SAFETY: a valid NUL-terminated path; access() only reads it.
            .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
            .unwrap_or(false);
        if !dir.is_dir() || !writable {
            return Err(Error::Usage(format!(
                "{}: the {what}'s folder '{}' does not exist or is not writable",
                p.display(),
                dir.display()
            )));
        }
    }
    if out == adapter_path {
        return Err(Error::Usage(format!(
            "{}: the model and the adapter file cannot have the same path",
            out.display()
        )));
    }
    Ok(())
}

/// Writes the grafted model and its adapter file; on any failure neither is left behind.
pub fn write(
    model: &Model,
    adapter: &AdapterFile,
    out: &Path,
    adapter_path: &Path,
) -> Result<SaveReport> {
    check_output_paths(&model.path, out, adapter_path)?;
    let bytes = adapter.to_bytes()?;
    let report = model.save(out, &SaveOptions::default())?;
    let mut created = Vec::new();
    if let Err(e) = crate::model::write_atomic(adapter_path, &bytes, &mut created) {
        let _ = std::fs::remove_file(out);
        for p in report
            .linked
            .iter()
            .chain(&report.cloned)
            .chain(&report.copied)
            .chain(&report.own_data)
        {
            let _ = std::fs::remove_file(p);
        }
        for p in created {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    Ok(report)
}

/// An adapter file read for applying or merging: the request it implies and its tensors
/// by module and parameter, torch layout.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    /// The file.
    pub path: PathBuf,
    /// Variant, r, alpha, dtype (from `cfg`, else from the overrides).
    pub req: GraftRequest,
    /// module -> parameter (`lora_A`, ...) -> values.
    pub tensors: BTreeMap<String, BTreeMap<String, ArrayD<f32>>>,
}

/// What the user says about a file that has no `cfg` (a PEFT adapter): the variant
/// and alpha; and targeting help for any file.
#[derive(Debug, Clone, Default)]
pub struct AdapterOverrides {
    /// Variant when the file does not say (default lora).
    pub variant: Option<String>,
    /// alpha and its JSON text, when the file does not say.
    pub alpha: Option<(f64, String)>,
    /// Prefix removed from the model's module names.
    pub strip_prefix: Option<String>,
    /// Roles of square layers.
    pub role_overrides: Vec<(regex::Regex, crate::passes::target::Role)>,
}

/// `(module, parameter)` of an adapter key: lora-lite's `<module>.lora_A`, or PEFT's
/// `base_model.model.<module>.lora_A[.default].weight`.
pub fn split_key(key: &str) -> Option<(String, String)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let at = key.find(".lora_")?;
    let param = key[at + 1..].split('.').next()?.to_string();
    Some((key[..at].to_string(), param))
}

impl LoadedAdapter {
    /// Reads `path` and works out the request it implies.
    pub fn read(path: &Path, overrides: &AdapterOverrides) -> Result<LoadedAdapter> {
        let file = AdapterFile::read(path)?;
        let bad = |reason: String| Error::Usage(format!("{}: {reason}", path.display()));
        let mut tensors: BTreeMap<String, BTreeMap<String, ArrayD<f32>>> = BTreeMap::new();
        for (key, a) in &file.tensors {
            let (module, param) = split_key(key).ok_or_else(|| {
                bad(format!(
                    "key '{key}' is not an adapter key (<module>.lora_*)"
                ))
            })?;
            tensors.entry(module).or_default().insert(param, a.to_f32());
        }
        if tensors.is_empty() {
            return Err(bad("the file holds no adapter tensor".into()));
        }
        let mut req = GraftRequest::default();
        let graft_meta: serde_json::Value = file
            .metadata
            .get(GRAFT_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(serde_json::Value::Null);
        match file.metadata.get(CFG_KEY) {
            Some(cfg) => {
                let cfg: serde_json::Value = serde_json::from_str(cfg)
                    .map_err(|e| bad(format!("metadata 'cfg' is not JSON: {e}")))?;
                let field = |k: &str| {
                    cfg.get(k)
                        .ok_or_else(|| bad(format!("metadata 'cfg' has no '{k}'")))
                };
                req.variant = field("variant")?
                    .as_str()
                    .ok_or_else(|| bad("cfg.variant is not a string".into()))?
                    .to_string();
                req.cfg.r = field("r")?
                    .as_u64()
                    .ok_or_else(|| bad("cfg.r is not an integer".into()))?
                    as usize;
                let alpha = field("alpha")?;
                req.cfg.alpha = alpha
                    .as_f64()
                    .ok_or_else(|| bad("cfg.alpha is not a number".into()))?;
                req.cfg.alpha_json = alpha.to_string();
                if let Some(d) = cfg.get("dtype").and_then(|d| d.as_str()) {
                    req.adapter_dtype = parse_dtype(d)?;
                }
                if let Some(l) = cfg.get("lambda0").and_then(|l| l.as_f64()) {
                    req.cfg.lambda0 = l;
                }
                let strings = |k: &str| -> Vec<String> {
                    cfg.get(k)
                        .and_then(|v| v.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                req.filter_text = FilterText {
                    roles: strings("target_roles"),
                    names: strings("target_names"),
                    excludes: strings("exclude_names"),
                    layers: cfg.get("layers").and_then(|v| v.as_array()).map(|a| {
                        a.iter()
                            .filter_map(|i| i.as_u64().map(|i| i as usize))
                            .collect()
                    }),
                };
            }
            None => {
                req.variant = overrides.variant.clone().unwrap_or_else(|| "lora".into());
                let first = tensors.values().next().expect("non-empty");
                let a = first
                    .get("lora_A")
                    .ok_or_else(|| bad("no lora_A tensor to read r from".into()))?;
                req.cfg.r = a.shape()[0];
                if let Some((alpha, text)) = &overrides.alpha {
                    req.cfg.alpha = *alpha;
                    req.cfg.alpha_json = text.clone();
                }
            }
        }
        req.cfg.rslora = graft_meta
            .get("rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        req.cfg.pissa_niter = graft_meta
            .get("pissa_niter")
            .and_then(|v| v.as_u64())
            .map(|n| n as usize);
        req.cfg.seed = graft_meta.get("seed").and_then(|v| v.as_u64()).unwrap_or(0);
        req.filters = Filters {
            roles: vec![Role::Reader, Role::Writer, Role::Inner],
            names: vec![],
            excludes: vec![],
            layers: None,
            strip_prefix: overrides.strip_prefix.clone(),
            d_model: None,
            role_overrides: overrides.role_overrides.clone(),
            modules: Some(tensors.keys().cloned().collect()),
        };
        variants::variant(&req.variant)?;
        Ok(LoadedAdapter {
            path: path.to_path_buf(),
            req,
            tensors,
        })
    }

    /// Targets the file's modules in `model`; checks every key against them.
    fn targets(&self, model: &Model) -> Result<Targeting> {
        let targeting = target::run(&model.graph, &self.req.filters).map_err(|e| match e {
            Error::Usage(m) if m.starts_with("no target left") => Error::Usage(format!(
                "{} does not fit {}: none of its {} modules is a linear layer of the model (e.g. '{}'); was it made for another model? (--strip-prefix may help)",
                self.path.display(),
                model.path.display(),
                self.tensors.len(),
                self.tensors.keys().next().expect("non-empty")
            )),
            other => other,
        })?;
        Ok(targeting)
    }

    /// Checks keys and shapes against `specs` of every targeted module, in one error.
    fn check(&self, model: &Model, targeting: &Targeting, variant: &dyn Variant) -> Result<()> {
        let found: std::collections::BTreeSet<&str> = targeting
            .targets
            .iter()
            .map(|t| t.module.as_str())
            .collect();
        let mut missing = Vec::new();
        let mut unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|m| !found.contains(m.as_str()))
            .map(|m| format!("{m}.*"))
            .collect();
        let mut mismatched = Vec::new();
        for t in &targeting.targets {
            let dims = variants::Dims {
                d_in: t.d_in,
                d_out: t.d_out,
            };
            let specs = variant.param_specs(dims, &self.req.cfg);
            let given = self.tensors.get(&t.module);
            for spec in &specs {
                match given.and_then(|g| g.get(spec.name)) {
                    None => missing.push(format!("{}.{}", t.module, spec.name)),
                    Some(a) if a.shape() != spec.shape.as_slice() => mismatched.push(format!(
                        "{}.{} is {:?} in the file, the model needs {:?}",
                        t.module,
                        spec.name,
                        a.shape(),
                        spec.shape
                    )),
                    Some(_) => {}
                }
            }
            if let Some(g) = given {
                unexpected.extend(
                    g.keys()
                        .filter(|k| !specs.iter().any(|s| s.name == k.as_str()))
                        .map(|k| format!("{}.{k}", t.module)),
                );
            }
        }
        missing.dedup();
        unexpected.dedup();
        mismatched.dedup();
        if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() {
            return Ok(());
        }
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
            format!(
                "{}{}",
                shown.join(", "),
                if v.len() > 5 {
                    format!(" and {} more", v.len() - 5)
                } else {
                    String::new()
                }
            )
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("missing keys: {}", list(&missing)));
        }
        if !unexpected.is_empty() {
            parts.push(format!("unexpected keys: {}", list(&unexpected)));
        }
        if !mismatched.is_empty() {
            parts.push(format!("shape mismatches: {}", list(&mismatched)));
        }
        Err(Error::Usage(format!(
            "{} does not fit {} ({}): {}",
            self.path.display(),
            model.path.display(),
            variant.name(),
            parts.join("; ")
        )))
    }

    /// The file's tensors of every module, as variant parameters.
    fn params(
        &self,
        outcome_modules: &[String],
        variant: &dyn Variant,
        targeting: &Targeting,
    ) -> BTreeMap<String, variants::Params> {
        let mut out = BTreeMap::new();
        for module in outcome_modules {
            let t = targeting
                .targets
                .iter()
                .find(|t| &t.module == module)
                .expect("target");
            let specs = variant.param_specs(
                variants::Dims {
                    d_in: t.d_in,
                    d_out: t.d_out,
                },
                &self.req.cfg,
            );
            let params: variants::Params = specs
                .iter()
                .map(|s| (s.name, self.tensors[module][s.name].clone()))
                .collect();
            out.insert(module.clone(), params);
        }
        out
    }
}

/// Sets adapter tensor `name` of `module` to `values` (torch layout), in the graph
/// (ONNX layout, its dtype) and in `outcome`.
pub fn set_param(
    model: &mut Model,
    outcome: &mut Outcome,
    module: &str,
    name: &'static str,
    values: ArrayD<f32>,
) -> Result<()> {
    let key = format!("{module}.{name}");
    let v = model
        .graph
        .value_by_name(&key)
        .ok_or_else(|| Error::Usage(format!("the model has no adapter tensor '{key}'")))?;
    let dtype = model
        .graph
        .initializer(v)
        .map(|i| i.elem_type())
        .unwrap_or(DataType::Float as i32);
    let a = Array::from_f32(graft::onnx_layout(&values), dtype).expect("float dtype");
    model
        .graph
        .replace_initializer(v, crate::ir::Initializer::from_array(&a)?);
    if let Some(m) = outcome
        .grafted
        .modules
        .iter_mut()
        .find(|m| m.module == module)
    {
        m.params.insert(name, values);
    }
    Ok(())
}

/// Grafts a trained adapter file onto `model` (its values instead of fresh inits).
pub fn apply(model: &mut Model, adapter: &LoadedAdapter) -> Result<Outcome> {
    let variant = variants::variant(&adapter.req.variant)?;
    let targeting = adapter.targets(model)?;
    adapter.check(model, &targeting, variant)?;
    let mut outcome = graft(model, &adapter.req)?;
    let modules: Vec<String> = outcome
        .grafted
        .modules
        .iter()
        .map(|m| m.module.clone())
        .collect();
    for (module, params) in adapter.params(&modules, variant, &targeting) {
        for (name, values) in params {
            set_param(model, &mut outcome, &module, name, values)?;
        }
    }
    Ok(outcome)
}

/// Folds a trained adapter file into `model`'s weights; returns the modules merged.
pub fn merge(
    model: &mut Model,
    adapter: &LoadedAdapter,
    base: crate::passes::merge::PissaBase,
) -> Result<usize> {
    let variant = variants::variant(&adapter.req.variant)?;
    let targeting = adapter.targets(model)?;
    adapter.check(model, &targeting, variant)?;
    let modules: Vec<String> = adapter.tensors.keys().cloned().collect();
    let params = adapter.params(&modules, variant, &targeting);
    crate::passes::merge::run(
        &mut model.graph,
        &targeting.targets,
        variant,
        &adapter.req.cfg,
        &params,
        adapter.req.adapter_dtype,
        base,
    )
    .map_err(|e| e.context(model.path.display().to_string()))
}

/// What `lora-graft grad` (and training) asks for.
#[derive(Debug, Clone)]
pub struct TrainingRequest {
    /// The graft (variant, r, filters...).
    pub graft: GraftRequest,
    /// The loss.
    pub loss: crate::passes::grad::loss::Loss,
    /// Training batch size (the first symbolic input dim).
    pub batch: usize,
    /// Training sequence length (the second symbolic input dim).
    pub seq: usize,
    /// The model output the loss reads (default: the first).
    pub output: Option<String>,
    /// Also expose the model's outputs.
    pub keep_outputs: bool,
}

impl TrainingRequest {
    /// A request for the loss over the model's first output, without the model outputs.
    pub fn new(
        graft: GraftRequest,
        loss: crate::passes::grad::loss::Loss,
        batch: usize,
        seq: usize,
    ) -> TrainingRequest {
        TrainingRequest {
            graft,
            loss,
            batch,
            seq,
            output: None,
            keep_outputs: false,
        }
    }
}

/// A training graph, made.
pub struct Training {
    /// The training model (trainable tensors are inputs).
    pub model: Model,
    /// The graft it was made from (initial adapter values).
    pub outcome: Outcome,
    /// Loss and gradient outputs.
    pub graph: crate::passes::grad::TrainingGraph,
    /// Concrete shapes of every input (model inputs, labels, trainable tensors).
    pub input_shapes: std::collections::HashMap<String, Vec<usize>>,
    /// The graft request it was made with.
    pub request: GraftRequest,
    /// The number of classes the loss reads (classification).
    pub classes: Option<usize>,
}

/// Concrete shapes of the model's inputs: symbolic dims become `batch`, then `seq`;
/// a KV cache's `past_*` length is 0 and a `total_*` length is `seq`.
pub fn input_shapes(
    model: &Model,
    batch: usize,
    seq: usize,
) -> Result<std::collections::HashMap<String, Vec<usize>>> {
    use crate::proto::tensor_shape_proto::dimension::Value as Dim;
    let mut symbols: Vec<String> = Vec::new();
    let mut shapes = std::collections::HashMap::new();
    for name in crate::runtime::input_names(model) {
        let io = model
            .graph
            .inputs
            .iter()
            .find(|io| model.graph.value(io.value).name == name)
            .expect("input");
        let Some(crate::proto::type_proto::Value::TensorType(t)) =
            io.info.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(Error::Usage(format!("input '{name}' is not a tensor")));
        };
        let dims = t
            .shape
            .as_ref()
            .map(|s| s.dim.as_slice())
            .unwrap_or_default();
        let mut shape = Vec::new();
        for d in dims {
            shape.push(match &d.value {
                Some(Dim::DimValue(v)) => *v as usize,
                // A KV cache is empty in training: past length 0, total = the sequence.
                Some(Dim::DimParam(p)) if p.contains("past") => 0,
                Some(Dim::DimParam(p)) if p.contains("total") => seq,
                Some(Dim::DimParam(p)) => {
                    if !symbols.contains(p) {
                        symbols.push(p.clone());
                    }
                    match symbols.iter().position(|s| s == p) {
                        Some(0) => batch,
                        Some(1) => seq,
                        _ => return Err(Error::Usage(format!("input '{name}' has a third symbolic dim '{p}': only batch, sequence and a KV cache's past_*/total_* lengths get sizes; export the model with '{p}' fixed"))),
                    }
                }
                None => return Err(Error::Usage(format!("input '{name}' has a dim of unknown size"))),
            });
        }
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// Grafts `req.graft` onto `model` and builds its training graph.
pub fn training_graph(mut model: Model, req: &TrainingRequest) -> Result<Training> {
    use crate::passes::grad;
    let mut outcome = graft(&mut model, &req.graft)?;
    let mut shapes = input_shapes(&model, req.batch, req.seq)?;
    let trainable_names: Vec<String> = outcome
        .grafted
        .modules
        .iter()
        .flat_map(|m| m.trainable.iter().map(move |p| format!("{}.{p}", m.module)))
        .collect();
    // Shapes from tract, with the trainable tensors as inputs (as constants tract would
    // fold what is computed from them alone, and forget those values' names).
    let mut probe = model.clone();
    let mut probe_shapes = shapes.clone();
    for name in &trainable_names {
        let t = probe.graph.value_by_name(name).expect("adapter tensor");
        let init = probe.graph.initializer(t).cloned();
        probe_shapes.insert(
            name.clone(),
            init.as_ref()
                .map(|i| i.dims().iter().map(|&d| d as usize).collect())
                .unwrap_or_default(),
        );
        grad::make_input(&mut probe.graph, t, init, req.graft.adapter_dtype);
    }
    let facts = crate::runtime::value_facts(&probe, &probe_shapes)
        .map_err(|e| e.context("shapes for the gradient pass"))?;
    drop(probe);
    let mut by_name: grad::Shapes = facts
        .into_iter()
        .filter_map(|(name, f)| {
            f.shape
                .iter()
                .map(|d| d.parse::<usize>().ok())
                .collect::<Option<Vec<_>>>()
                .map(|s| (name, s))
        })
        .collect();
    let output = match &req.output {
        Some(o) => model
            .graph
            .value_by_name(o)
            .filter(|v| model.graph.is_output(*v))
            .ok_or_else(|| Error::Usage(format!("the model has no output '{o}'")))?,
        None => model
            .graph
            .outputs
            .first()
            .map(|o| o.value)
            .ok_or_else(|| Error::Usage("the model has no output".into()))?,
    };
    let opset = crate::passes::graft::default_opset(&model.proto);
    let dtype = req.graft.adapter_dtype;
    let model_outputs: Vec<GraphIoSnapshot> = model
        .graph
        .outputs
        .iter()
        .map(|o| (o.value, o.info.clone()))
        .collect();
    let loss = {
        let dtypes = grad::value_dtypes(&model.graph)?;
        let mut e = grad::Emit {
            graph: &mut model.graph,
            opset,
            shapes: Default::default(),
            dtype,
            dtypes,
            prefix: "loss".into(),
        };
        for v in e.graph.value_ids().collect::<Vec<_>>() {
            if let Some(s) = by_name.get(&e.graph.value(v).name) {
                e.shapes.insert(v, s.clone());
            }
        }
        let loss = grad::loss::build(&mut e, req.loss, output)?;
        for (v, s) in &e.shapes {
            by_name.insert(e.graph.value(*v).name.clone(), s.clone());
        }
        loss
    };
    if !req.keep_outputs {
        model.graph.outputs.clear();
    }
    let trainable: Vec<crate::ir::ValueId> = trainable_names
        .iter()
        .map(|k| model.graph.value_by_name(k).expect("adapter tensor"))
        .collect();
    for &t in &trainable {
        let init = model.graph.initializer(t).expect("initializer");
        shapes.insert(
            model.graph.value(t).name.clone(),
            init.dims().iter().map(|&d| d as usize).collect(),
        );
    }
    let label_shape = by_name
        .get(req.loss.label_name())
        .cloned()
        .unwrap_or_default();
    shapes.insert(req.loss.label_name().to_string(), label_shape);
    let classes = match req.loss {
        grad::loss::Loss::Class => by_name
            .get(&model.graph.value(output).name)
            .and_then(|s| s.get(1).copied()),
        _ => None,
    };
    let tg = grad::run(&mut model.graph, opset, loss, &trainable, &by_name)
        .map_err(|e| e.context("gradient pass"))?;
    // The training graph's model outputs go after loss and gradients.
    if req.keep_outputs {
        let n = model_outputs.len();
        let outs: Vec<_> = model.graph.outputs.drain(..n).collect();
        model.graph.outputs.extend(outs);
    }
    model.graph.compact();
    let _ = &mut outcome;
    Ok(Training {
        model,
        outcome,
        graph: tg,
        input_shapes: shapes,
        request: req.graft.clone(),
        classes,
    })
}

type GraphIoSnapshot = (crate::ir::ValueId, crate::proto::ValueInfoProto);
