//! HF PEFT's adapter folders: `adapter_config.json` beside `adapter_model.safetensors`
//! (keys `base_model.model.<module>.lora_A.weight`, torch layout). Read for
//! `--adapter-in folder/` and written by `export-adapter --format peft`.
//!
//! Every key of PEFT's (0.21) `LoraConfig` is known: the ones that change what the
//! adapter computes are read (`r`, `lora_alpha`, `use_rslora`, `rank_pattern`,
//! `alpha_pattern`, `init_lora_weights`), the ones about training, targeting or the
//! PyTorch model are accepted as they are, and the ones for features lora-graft does not
//! serve must hold their neutral value. Any other key is an error that names it.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::passes::variants::{self, Alpha, ModuleRank, Variant};

/// The config file's name in a PEFT folder.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The tensor file's name in a PEFT folder.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The PEFT version whose config keys are known, written in exported configs.
pub const PEFT_VERSION: &str = "0.21.2";

/// Keys read, or accepted whatever they hold (training, targeting, bookkeeping).
const ACCEPTED: &[&str] = &[
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
    "peft_type",
    "peft_version",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "lora_dropout",
    "ensure_weight_tying",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
];

/// Keys of features lora-graft does not serve, with the value that means "not used".
const NEUTRAL: &[(&str, &str)] = &[
    ("bias", "\"none\""),
    ("lora_bias", "false"),
    ("use_dora", "false"),
    ("use_qalora", "false"),
    ("use_bdlora", "null"),
    ("modules_to_save", "null"),
    ("layer_replication", "null"),
    ("trainable_token_indices", "null"),
    ("target_parameters", "null"),
    ("alora_invocation_tokens", "null"),
    ("arrow_config", "null"),
    ("kasa_config", "null"),
    ("monteclora_config", "null"),
    ("velora_config", "null"),
];

/// What a PEFT LoRA config says about the adapter.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    /// The variant its init makes (`lora`, `pissa`, `olora`).
    pub variant: &'static dyn Variant,
    /// The default rank.
    pub r: usize,
    /// The default alpha.
    pub alpha: Alpha,
    /// `alpha / sqrt(r)`.
    pub rslora: bool,
    /// PiSSA's `pissa_niter_N`.
    pub pissa_niter: Option<usize>,
    /// `rank_pattern`: module regex key and rank, in the file's order.
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`: module regex key and alpha.
    pub alpha_pattern: Vec<(String, Alpha)>,
}

/// The `(tensors, config)` paths of a PEFT folder or of a tensor file with a config
/// beside it; `None` for the config when there is none.
pub fn paths(path: &Path) -> (PathBuf, Option<PathBuf>) {
    if path.is_dir() {
        return (path.join(WEIGHTS_NAME), Some(path.join(CONFIG_NAME)));
    }
    let beside = crate::files::parent_folder(path).join(CONFIG_NAME);
    (path.to_path_buf(), beside.is_file().then_some(beside))
}

impl PeftConfig {
    /// Reads and checks `path`.
    pub fn read(path: &Path) -> Result<PeftConfig> {
        let text = crate::files::read_regular_text(path)?;
        let bad = |why: String| Error::Usage(format!("{}: {why}", path.display()));
        let json: Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON object ({e})")))?;
        for (key, value) in &json {
            if ACCEPTED.contains(&key.as_str()) {
                continue;
            }
            match NEUTRAL.iter().find(|(k, _)| k == key) {
                Some((_, neutral)) => {
                    let neutral: Value = serde_json::from_str(neutral).expect("json");
                    let empty = matches!(value, Value::Null)
                        || value.as_object().is_some_and(Map::is_empty)
                        || value.as_array().is_some_and(Vec::is_empty);
                    if *value != neutral && !(neutral.is_null() && empty) {
                        return Err(bad(format!(
                            "'{key}' is {value}: lora-graft serves plain LoRA weights only (it must be {neutral})"
                        )));
                    }
                }
                None => {
                    return Err(bad(format!(
                        "unknown key '{key}' (PEFT {PEFT_VERSION}'s LoraConfig keys are known); remove it if it does not change the adapter"
                    )))
                }
            }
        }
        match json.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "peft_type {} is not LORA; pass the tensor file with --variant for other PEFT methods",
                    other.map_or("missing".into(), |t| format!("'{t}'"))
                )))
            }
        }
        let r = json
            .get("r")
            .and_then(Value::as_u64)
            .filter(|r| (1..=1 << 20).contains(r))
            .ok_or_else(|| bad("'r' is not a positive integer".into()))? as usize;
        let alpha = match json.get("lora_alpha") {
            Some(Value::Number(n)) => Alpha(n.clone()),
            _ => return Err(bad("'lora_alpha' is not a number".into())),
        };
        let rslora = json
            .get("use_rslora")
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| bad("'use_rslora' is not a boolean".into()))
            })
            .transpose()?
            .unwrap_or(false);
        let (variant, pissa_niter) = match json.get("init_lora_weights") {
            None | Some(Value::Bool(_)) => (variants::variant("lora")?, None),
            Some(Value::String(s)) => match s.as_str() {
                "gaussian" | "eva" | "corda" | "loftq" | "orthogonal" => {
                    (variants::variant("lora")?, None)
                }
                "pissa" => (variants::variant("pissa")?, None),
                "olora" => (variants::variant("olora")?, None),
                other => match other.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                    Some(Ok(n)) => (variants::variant("pissa")?, Some(n)),
                    _ => {
                        return Err(bad(format!(
                            "init_lora_weights '{other}' is not one lora-graft knows (true, gaussian, pissa, pissa_niter_N, olora)"
                        )))
                    }
                },
            },
            Some(other) => return Err(bad(format!("init_lora_weights {other} is not known"))),
        };
        let pattern = |key: &str| -> Result<Vec<(String, Value)>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => {
                    Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                }
                Some(other) => Err(bad(format!("'{key}' is {other}, not an object"))),
            }
        };
        let rank_pattern: Vec<(String, usize)> = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, v)| match v.as_u64() {
                Some(n) if (1..=1 << 20).contains(&n) => Ok((k, n as usize)),
                _ => Err(bad(format!(
                    "rank_pattern '{k}' is {v}, not a positive integer"
                ))),
            })
            .collect::<Result<_>>()?;
        let alpha_pattern: Vec<(String, Alpha)> = pattern("alpha_pattern")?
            .into_iter()
            .map(|(k, v)| match v {
                Value::Number(n) => Ok((k, Alpha(n))),
                other => Err(bad(format!("alpha_pattern '{k}' is {other}, not a number"))),
            })
            .collect::<Result<_>>()?;
        let keys = rank_pattern.iter().map(|(k, _)| k);
        for key in keys.chain(alpha_pattern.iter().map(|(k, _)| k)) {
            pattern_regex(key).map_err(|e| {
                let why = crate::error::regex_reason(&e);
                bad(format!("pattern '{key}' is not a regex ({why})"))
            })?;
        }
        Ok(PeftConfig {
            variant,
            r,
            alpha,
            rslora,
            pissa_niter,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// `module`'s rank and alpha, where a pattern gives it its own (PEFT matches a key
    /// `k` as the regex `(.*\.)?k$` on the module path; the first matching key wins).
    pub fn module_rank(&self, module: &str) -> Option<ModuleRank> {
        let hit = |k: &String| pattern_regex(k).is_ok_and(|re| re.is_match(module));
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| hit(k))
            .map(|(_, r)| *r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| hit(k))
            .map(|(_, a)| a.clone());
        (r.is_some() || alpha.is_some()).then(|| ModuleRank {
            r: r.unwrap_or(self.r),
            alpha: alpha.unwrap_or_else(|| self.alpha.clone()),
        })
    }
}

fn pattern_regex(key: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

/// The `adapter_config.json` of a plain LoRA adapter of rank `r` on `modules`, with
/// `own` ranks and alphas by exact module path.
pub fn lora_config(
    r: usize,
    alpha: &Alpha,
    rslora: bool,
    modules: &[String],
    own: &[(String, usize, Alpha)],
) -> String {
    let exact = |m: &str| regex::escape(m);
    let rank_pattern: Map<String, Value> = own
        .iter()
        .filter(|(_, rm, _)| *rm != r)
        .map(|(m, rm, _)| (exact(m), json!(rm)))
        .collect();
    let alpha_pattern: Map<String, Value> = own
        .iter()
        .filter(|(_, _, am)| am != alpha)
        .map(|(m, _, am)| (exact(m), Value::Number(am.0.clone())))
        .collect();
    let mut targets: Vec<&String> = modules.iter().collect();
    targets.sort();
    targets.dedup();
    let config = json!({
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "task_type": null,
        "inference_mode": true,
        "r": r,
        "lora_alpha": alpha.0,
        "use_rslora": rslora,
        "target_modules": targets,
        "fan_in_fan_out": false,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": true,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": null,
        "use_dora": false,
    });
    serde_json::to_string_pretty(&config).expect("json")
}
