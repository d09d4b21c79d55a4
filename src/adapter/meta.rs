//! The adapter file's metadata as typed structs: lora-lite's `cfg` (its AdapterConfig,
//! written as Python's `json.dumps` writes it) and lora-graft's own `lora_graft` key.

use serde::{Deserialize, Serialize};

use crate::passes::graft::Site;

/// lora-lite's targeting fields of `cfg`, as the user gave them.
#[derive(Debug, Clone, PartialEq)]
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

/// lora-lite's `cfg`: the common fields in lora-lite's order, then the variant's own.
#[derive(Debug, Clone)]
pub struct LiteCfg {
    /// `variant`.
    pub variant: String,
    /// `r`.
    pub r: usize,
    /// `alpha`, an integer or a float as given.
    pub alpha: serde_json::Number,
    /// `dtype`, torch's name (`float32`, ...).
    pub dtype: String,
    /// The targeting fields.
    pub filters: FilterText,
    /// The variant's fields, in order (e.g. DeLoRA's `lambda0`).
    pub extra: Vec<(String, serde_json::Value)>,
}

impl Serialize for LiteCfg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let f = &self.filters;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("variant", &self.variant)?;
        m.serialize_entry("r", &self.r)?;
        m.serialize_entry("alpha", &self.alpha)?;
        m.serialize_entry("dtype", &self.dtype)?;
        m.serialize_entry("target_roles", &f.roles)?;
        m.serialize_entry("target_names", &f.names)?;
        m.serialize_entry("exclude_names", &f.excludes)?;
        m.serialize_entry("layers", &f.layers)?;
        for (k, v) in &self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// `cfg` as read: the common fields typed, the rest kept by name.
#[derive(Debug, Clone, Deserialize)]
struct LiteCfgIn {
    variant: String,
    r: usize,
    alpha: serde_json::Number,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    target_roles: Vec<String>,
    #[serde(default)]
    target_names: Vec<String>,
    #[serde(default)]
    exclude_names: Vec<String>,
    #[serde(default)]
    layers: Option<Vec<usize>>,
    #[serde(flatten)]
    extra: serde_json::Map<String, serde_json::Value>,
}

impl LiteCfg {
    /// The JSON text, as Python's `json.dumps(cfg)` writes it.
    pub fn to_json(&self) -> String {
        py_json(self)
    }

    /// Parses `cfg` JSON.
    pub fn parse(text: &str) -> Result<LiteCfg, serde_json::Error> {
        let c: LiteCfgIn = serde_json::from_str(text)?;
        Ok(LiteCfg {
            variant: c.variant,
            r: c.r,
            alpha: c.alpha,
            dtype: c.dtype.unwrap_or_else(|| "float32".into()),
            filters: FilterText {
                roles: c.target_roles,
                names: c.target_names,
                excludes: c.exclude_names,
                layers: c.layers,
            },
            extra: c.extra.into_iter().collect(),
        })
    }

    /// A variant field by name.
    pub fn extra(&self, key: &str) -> Option<&serde_json::Value> {
        self.extra.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// One adapted module in [`GraftMeta`] (fields in sorted order: the file's bytes
/// are those of a sorted JSON map).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetMeta {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Module path.
    pub module: String,
    /// The nodes the adapter was spliced around.
    pub sites: Vec<SiteMeta>,
}

/// A site as written ([`Site`] with its role as text).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteMeta {
    /// The ONNX node.
    pub node: String,
    /// `reader`, `writer` or `inner`.
    pub role: String,
}

impl From<&Site> for SiteMeta {
    fn from(s: &Site) -> SiteMeta {
        SiteMeta {
            node: s.node.clone(),
            role: s.role.as_str().to_string(),
        }
    }
}

/// lora-graft's metadata key: what lora-lite's `cfg` does not say (fields in sorted
/// order, compact JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GraftMeta {
    /// DeLoRA's init (`paper`, `lora-lite`); none for other variants, and in files
    /// lora-lite wrote, which start as lora-lite's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delora_init: Option<String>,
    /// Always `torch`: the tensors' layout.
    pub layout: String,
    /// PiSSA's randomized SVD iterations (`None`: exact SVD).
    pub pissa_niter: Option<usize>,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// Seed of the random inits.
    pub seed: u64,
    /// The adapted modules.
    pub targets: Vec<TargetMeta>,
    /// lora-graft's version.
    pub version: String,
}

impl GraftMeta {
    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }

    /// Parses the key; a file without it (lora-lite's, PEFT's) gets the defaults, and
    /// one whose key is not this JSON the reason (its settings would be guessed).
    pub fn parse_or_default(text: Option<&str>) -> std::result::Result<GraftMeta, String> {
        match text {
            None => Ok(GraftMeta::default()),
            Some(t) => serde_json::from_str(t).map_err(|e| {
                format!("metadata 'lora_graft' is not lora-graft's settings ({e}); remove the key or save the adapter again")
            }),
        }
    }
}

/// Python's `repr` of a float (`16.0`, `1e-05`), as `json.dumps` writes floats.
pub fn py_float(v: f64) -> String {
    let s = format!("{v:?}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = e.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("+", e));
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// A JSON number as the user wrote it: `16` stays an integer, `16.0` a float.
pub fn number_as_given(text: &str) -> Option<serde_json::Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(i.into());
    }
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
}

/// `value` as Python's `json.dumps` writes it: `", "` and `": "` separators, floats
/// in Python's repr.
pub fn py_json(value: &impl Serialize) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    value.serialize(&mut ser).expect("serialisable");
    String::from_utf8(out).expect("JSON is UTF-8")
}

struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + std::io::Write>(&mut self, w: &mut W, v: f64) -> std::io::Result<()> {
        w.write_all(py_float(v).as_bytes())
    }
}
