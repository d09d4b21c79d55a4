//! Reading an adapter file for applying or merging: lora-graft's, lora-lite's and
//! PEFT's key forms, the request the file implies, and its check against the model's
//! targets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tract_core::ndarray::ArrayD;

use crate::adapter::meta::{GraftMeta, LiteCfg};
use crate::adapter::peft::{self, PeftConfig};
use crate::adapter::{AdapterFile, CFG_KEY, GRAFT_KEY};
use crate::error::{Error, Result};
use crate::jobs::request::{AdapterDtype, GraftRequest};
use crate::model::Model;
use crate::passes::target::{self, Filters, Role, Targeting};
use crate::passes::variants::delora::DeloraInit;
use crate::passes::variants::{self, Alpha, ModuleRank, Variant};
use crate::tensor::Array;

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
    /// Tensors shared by every module (VeRA's `vera_A`, `vera_B`), by name.
    pub shared: BTreeMap<String, ArrayD<f32>>,
}

/// What the user says about a file that has no `cfg` (a PEFT adapter): the variant
/// and alpha; and targeting help for any file.
#[derive(Debug, Clone, Default)]
pub struct AdapterOverrides {
    /// Variant when the file does not say (default lora).
    pub variant: Option<&'static dyn Variant>,
    /// alpha, when the file does not say.
    pub alpha: Option<Alpha>,
    /// Prefix removed from the model's module names.
    pub strip_prefix: Option<String>,
    /// Roles of square layers.
    pub role_overrides: Vec<(regex::Regex, crate::passes::target::Role)>,
}

/// `(module, parameter)` of an adapter key: lora-lite's `<module>.lora_A`, or PEFT's
/// `base_model.model.<module>.lora_A[.default].weight` (and `vera_*` alike).
pub fn split_key(key: &str) -> Option<(String, String)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let at = [".lora_", ".vera_"]
        .iter()
        .filter_map(|p| key.find(p))
        .min()?;
    let param = key[at + 1..].split('.').next()?.to_string();
    Some((key[..at].to_string(), param))
}

/// The name of a tensor shared by every module (VeRA's `vera_A`, PEFT's
/// `base_model.vera_A`), if `key` is one.
fn shared_key(key: &str) -> Option<&str> {
    let bare = key.strip_prefix("base_model.").unwrap_or(key);
    (bare.starts_with("vera_") && !bare.contains('.')).then_some(bare)
}

impl LoadedAdapter {
    /// Reads `path` and works out the request it implies.
    pub fn read(path: &Path, overrides: &AdapterOverrides) -> Result<LoadedAdapter> {
        let bad = |reason: String| Error::Usage(format!("{}: {reason}", path.display()));
        let (weights, config) = peft::paths(path);
        if path.is_dir() && !weights.is_file() {
            return Err(bad(format!(
                "a folder without {}: not a PEFT adapter folder",
                peft::WEIGHTS_NAME
            )));
        }
        let file = AdapterFile::read(&weights)?;
        let mut tensors: BTreeMap<String, BTreeMap<String, ArrayD<f32>>> = BTreeMap::new();
        let mut shared = BTreeMap::new();
        for (key, a) in &file.tensors {
            if !matches!(
                a,
                Array::F32(_) | Array::F16(_) | Array::BF16(_) | Array::F64(_)
            ) {
                return Err(bad(format!(
                    "tensor '{key}' is {}, not a float tensor",
                    crate::dtype::name(a.elem_type())
                )));
            }
            let values = a.to_f32();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "tensor '{key}' holds NaN or infinite values (in float32); the adapter is unusable"
                )));
            }
            if let Some(name) = shared_key(key) {
                shared.insert(name.to_string(), values);
                continue;
            }
            let (module, param) = split_key(key).ok_or_else(|| {
                bad(format!(
                    "key '{key}' is not an adapter key (<module>.lora_*)"
                ))
            })?;
            tensors.entry(module).or_default().insert(param, values);
        }
        if tensors.is_empty() {
            return Err(bad("the file holds no adapter tensor".into()));
        }
        let graft_meta =
            GraftMeta::parse_or_default(file.metadata.get(GRAFT_KEY).map(String::as_str))
                .map_err(bad)?;
        let mut peft_settings = None;
        let (variant_name, mut req) = match file.metadata.get(CFG_KEY) {
            Some(text) => {
                let cfg = LiteCfg::parse(text)
                    .map_err(|e| bad(format!("metadata 'cfg' is not lora-lite's config: {e}")))?;
                let mut req = GraftRequest::default();
                req.cfg.r = cfg.r;
                req.cfg.alpha = Alpha(cfg.alpha.clone());
                req.adapter_dtype = AdapterDtype::from_torch_name(&cfg.dtype).ok_or_else(|| {
                    bad(format!(
                        "unknown adapter dtype '{}'; use float32, float16 or bfloat16",
                        cfg.dtype
                    ))
                })?;
                if let Some(l) = cfg.extra("lambda0").and_then(|l| l.as_f64()) {
                    req.cfg.lambda0 = l;
                }
                if let Some(v) = cfg.extra("road_variant") {
                    req.cfg.road_variant = v
                        .as_str()
                        .and_then(crate::passes::variants::road::RoadVariant::from_name)
                        .ok_or_else(|| {
                            bad(format!(
                                "unknown road_variant {v}; lora-lite's are road_1, road_2, road_4"
                            ))
                        })?;
                }
                if let Some(g) = cfg.extra("group_size") {
                    req.cfg.road_group_size =
                        g.as_u64().filter(|&g| g <= 1 << 20).ok_or_else(|| {
                            bad(format!("group_size {g} is not a small positive integer"))
                        })? as usize;
                }
                let o = &mut req.cfg.antipasto;
                if let Some(bs) = cfg.extra("block_size").and_then(|v| v.as_u64()) {
                    o.block_size = bs.min(1 << 20) as usize;
                }
                if let Some(a) = cfg.extra("max_rotation_angle").and_then(|v| v.as_f64()) {
                    o.max_angle = a;
                }
                if let Some(v) = cfg.extra("rotate_basis") {
                    o.basis = v
                        .as_str()
                        .and_then(crate::passes::variants::antipasto::RotateBasis::from_name)
                        .ok_or_else(|| {
                            bad(format!("unknown rotate_basis {v}; use V, U or none"))
                        })?;
                }
                if let Some(ranks) = cfg.extra("rank_pattern").and_then(|v| v.as_object()) {
                    for (module, r) in ranks {
                        let r = r
                            .as_u64()
                            .filter(|&r| (1..=1 << 20).contains(&r))
                            .ok_or_else(|| {
                                bad(format!(
                                    "rank_pattern: '{module}' has rank {r}, not a positive integer"
                                ))
                            })? as usize;
                        let alpha = (cfg.extra("alpha_pattern"))
                            .and_then(|a| a.get(module))
                            .and_then(|a| a.as_number())
                            .map(|a| Alpha(a.clone()))
                            .unwrap_or_else(|| req.cfg.alpha.clone());
                        req.cfg
                            .modules
                            .insert(module.clone(), ModuleRank { r, alpha });
                    }
                }
                req.filter_text = cfg.filters.clone();
                (cfg.variant, req)
            }
            None if config.is_some() => {
                let config = config.as_deref().expect("some");
                let peft = PeftConfig::read(config)?;
                let mut req = GraftRequest::default();
                req.cfg.r = peft.r;
                req.cfg.alpha = peft.alpha.clone();
                for (module, params) in &tensors {
                    let own = peft.module_rank(module);
                    let r = own.as_ref().map_or(peft.r, |m| m.r);
                    if let Some(a) = params
                        .get("lora_A")
                        .filter(|a| a.ndim() == 2 && a.shape()[0] != r)
                    {
                        return Err(bad(format!(
                            "{module}.lora_A has rank {}, but {} says {r} ('r' or 'rank_pattern')",
                            a.shape()[0],
                            config.display()
                        )));
                    }
                    if let Some(own) = own {
                        req.cfg.modules.insert(module.clone(), own);
                    }
                }
                peft_settings = Some((peft.rslora, peft.pissa_niter));
                (peft.variant.name().to_string(), req)
            }
            None => {
                let mut req = GraftRequest::default();
                let first = tensors.values().next().expect("non-empty");
                req.cfg.r = first
                    .get("lora_A")
                    .map(|a| a.shape()[0])
                    .or_else(|| first.get("vera_lambda_d").map(|l| l.len()))
                    .ok_or_else(|| {
                        bad("no lora_A (or vera_lambda_d) tensor to read r from".into())
                    })?;
                let name = overrides.variant.map(|v| v.name()).unwrap_or("lora");
                match &overrides.alpha {
                    Some(alpha) => req.cfg.alpha = alpha.clone(),
                    None if variants::variant(name)?.uses_alpha() => {
                        return Err(bad(format!(
                            "the file has no lora-lite 'cfg' and no {} beside it, so its alpha is unknown; give it with --alpha",
                            peft::CONFIG_NAME
                        )))
                    }
                    None => {}
                }
                (name.to_string(), req)
            }
        };
        req.variant = variants::variant(&variant_name)?;
        (req.cfg.rslora, req.cfg.pissa_niter) =
            peft_settings.unwrap_or((graft_meta.rslora, graft_meta.pissa_niter));
        req.cfg.seed = graft_meta.seed;
        req.cfg.delora_init = match graft_meta.delora_init.as_deref() {
            None => DeloraInit::LoraLite,
            Some(name) => DeloraInit::from_name(name).ok_or_else(|| {
                bad(format!(
                    "unknown delora_init '{name}'; use paper or lora-lite"
                ))
            })?,
        };
        req.cfg.check().map_err(|e| bad(e.to_string()))?;
        req.values_from_file = true;
        req.filters = Filters {
            roles: vec![Role::Reader, Role::Writer, Role::Inner],
            names: vec![],
            excludes: vec![],
            layers: None,
            strip_prefix: overrides.strip_prefix.clone(),
            d_model: None,
            role_overrides: overrides.role_overrides.clone(),
            modules: Some(tensors.keys().cloned().collect()),
            include_heads: true,
        };
        Ok(LoadedAdapter {
            path: path.to_path_buf(),
            req,
            tensors,
            shared,
        })
    }

    /// Targets the file's modules in `model`; checks every key against them.
    pub fn targets(&self, model: &Model) -> Result<Targeting> {
        let targeting = target::run(&model.graph, &self.req.filters).map_err(|e| match e {
            Error::NoTarget { .. } => Error::Usage(format!(
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
    pub fn check(&self, model: &Model, targeting: &Targeting) -> Result<()> {
        let variant = self.req.variant;
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
            let specs = variant.param_specs(dims, &self.req.cfg.for_module(&t.module));
            let given = self.tensors.get(&t.module);
            let shared = variant.shared_params();
            for spec in &specs {
                if shared.contains(&spec.name) {
                    match self.shared.get(spec.name) {
                        None => missing.push(spec.name.to_string()),
                        Some(a) if variants::leading_slice(a, &spec.shape).is_none() => mismatched
                            .push(format!(
                                "{} is {:?} in the file, too small for {}'s {:?}",
                                spec.name,
                                a.shape(),
                                t.module,
                                spec.shape
                            )),
                        Some(_) => {}
                    }
                    continue;
                }
                match given.and_then(|g| g.get(spec.name)) {
                    // A frozen start the file lacks is recomputed from the weights.
                    None if spec.init == variants::Init::Start => {}
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

    /// The file's tensors of every module, as variant parameters (checked by
    /// [`LoadedAdapter::check`]).
    pub fn params(
        &self,
        outcome_modules: &[String],
        targeting: &Targeting,
    ) -> BTreeMap<String, variants::Params> {
        let mut out = BTreeMap::new();
        for module in outcome_modules {
            let t = targeting
                .targets
                .iter()
                .find(|t| &t.module == module)
                .expect("target");
            let dims = variants::Dims {
                d_in: t.d_in,
                d_out: t.d_out,
            };
            out.insert(
                module.clone(),
                self.module_params(module, dims).expect("checked"),
            );
        }
        out
    }

    /// `module`'s tensors for a `dims` layer, as variant parameters; an error names a
    /// missing tensor or one of another shape. A frozen start the file lacks
    /// (`Init::Start`: PEFT's PiSSA) is left out, for the caller to recompute.
    pub fn module_params(&self, module: &str, dims: variants::Dims) -> Result<variants::Params> {
        let variant = self.req.variant;
        let bad = |reason: String| Error::Usage(format!("{}: {reason}", self.path.display()));
        let held = |name: &str| {
            self.shared.contains_key(name)
                || self
                    .tensors
                    .get(module)
                    .is_some_and(|m| m.contains_key(name))
        };
        variant
            .param_specs(dims, &self.req.cfg.for_module(module))
            .iter()
            .filter(|s| s.init != variants::Init::Start || held(s.name))
            .map(|s| {
                let value = match self.shared.get(s.name) {
                    Some(a) => variants::leading_slice(a, &s.shape).ok_or_else(|| {
                        bad(format!(
                            "{} is {:?}, too small for {module}'s {:?}",
                            s.name,
                            a.shape(),
                            s.shape
                        ))
                    })?,
                    None => {
                        let a = self
                            .tensors
                            .get(module)
                            .and_then(|m| m.get(s.name))
                            .ok_or_else(|| bad(format!("missing key {module}.{}", s.name)))?;
                        if a.shape() != s.shape.as_slice() {
                            return Err(bad(format!(
                                "{module}.{} is {:?}, the model's layer needs {:?}",
                                s.name,
                                a.shape(),
                                s.shape
                            )));
                        }
                        a.clone()
                    }
                };
                Ok((s.name, value))
            })
            .collect()
    }
}
