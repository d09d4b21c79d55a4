//! The main job, end to end: target, graft, and write the model and its adapter file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::adapter::{AdapterFile, CFG_KEY, GRAFT_KEY};
use crate::error::{Error, Result};
use crate::model::{Model, SaveOptions, SaveReport};
use crate::passes::graft::{self, GraftOptions, Grafted};
use crate::passes::target::{self, Filters, Targeting};
use crate::passes::variants::{self, Config, Variant};
use crate::proto::tensor_proto::DataType;
use crate::tensor::Array;

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

/// Writes the grafted model and its adapter file; on any failure neither is left behind.
pub fn write(
    model: &Model,
    adapter: &AdapterFile,
    out: &Path,
    adapter_path: &Path,
) -> Result<SaveReport> {
    for (what, p) in [("output model", out), ("adapter file", adapter_path)] {
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(p), std::fs::canonicalize(&model.path)) {
            if a == b {
                return Err(Error::Usage(format!(
                    "{}: the {what} would overwrite the input model; choose another path",
                    p.display()
                )));
            }
        }
    }
    if out == adapter_path {
        return Err(Error::Usage(format!(
            "{}: the model and the adapter file cannot have the same path",
            out.display()
        )));
    }
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
