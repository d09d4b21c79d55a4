//! ROAD (Liao et al. 2024, arXiv 2409.00119; lora-lite `road`, PEFT `road`): the layer
//! output (after the bias) rotated and scaled in 2-D planes. Within each group of
//! `group_size` output channels, channel `j` of the low half pairs with `j + g/2`:
//! `y'_j = c1_j y_j − c2_j y_{j+g/2}`, `y'_{j+g/2} = c1_{j+g/2} y_{j+g/2} + c2_{j+g/2} y_j`,
//! with `c1 = α cos θ` and `c2 = α sin θ` drawn from the trained angles and scales as
//! the sub-variant says (`road_1`: one pair per plane, `road_2`: one per channel,
//! `road_4`: separate ones for `c1` and `c2`).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array1, Array2};

use super::{vec1, Config, Dims, Init, ParamSpec, Params, Splice, Variant};
use crate::error::Result;
use crate::ir::build::{int_attr, Builder};
use crate::ir::ValueId;

/// ROAD's sub-variants (lora-lite's `road_variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RoadVariant {
    /// One angle and scale per rotation plane (`d_out / 2` each).
    #[default]
    #[value(name = "road_1")]
    Road1,
    /// One angle and scale per output channel (`d_out` each).
    #[value(name = "road_2")]
    Road2,
    /// Separate angles and scales for the cosine and sine terms (`2·d_out` each).
    #[value(name = "road_4")]
    Road4,
}

impl RoadVariant {
    /// lora-lite's name.
    pub fn name(self) -> &'static str {
        match self {
            RoadVariant::Road1 => "road_1",
            RoadVariant::Road2 => "road_2",
            RoadVariant::Road4 => "road_4",
        }
    }

    /// The sub-variant called `name`.
    pub fn from_name(name: &str) -> Option<RoadVariant> {
        [RoadVariant::Road1, RoadVariant::Road2, RoadVariant::Road4]
            .into_iter()
            .find(|v| v.name() == name)
    }

    /// Angles (and scales) per layer of `d_out` outputs.
    fn len(self, d_out: usize) -> usize {
        match self {
            RoadVariant::Road1 => d_out / 2,
            RoadVariant::Road2 => d_out,
            RoadVariant::Road4 => 2 * d_out,
        }
    }
}

/// ROAD: `lora_road_theta` (zeros) and `lora_road_alpha` (ones), so `R = I` at init.
pub struct Road;

/// Where each output channel `j` reads: `c1_j` from entry `cos[j]`, `c2_j` from
/// `sin[j]`; its partner channel `partner[j]`, with `sign[j]` (−1 in a group's low half).
struct Planes {
    cos: Vec<i64>,
    sin: Vec<i64>,
    partner: Vec<usize>,
    sign: Vec<f64>,
}

fn planes(d_out: usize, cfg: &Config) -> Planes {
    let g = cfg.road_group_size;
    let h = g / 2;
    let mut p = Planes {
        cos: Vec::with_capacity(d_out),
        sin: Vec::with_capacity(d_out),
        partner: Vec::with_capacity(d_out),
        sign: Vec::with_capacity(d_out),
    };
    for j in 0..d_out {
        let (group, q) = (j / g, j % g);
        let low = q < h;
        let (c, s) = match cfg.road_variant {
            RoadVariant::Road1 => (group * h + q % h, group * h + q % h),
            RoadVariant::Road2 => (j, j),
            RoadVariant::Road4 => (group * 2 * g + q, group * 2 * g + g + q),
        };
        p.cos.push(c as i64);
        p.sin.push(s as i64);
        p.partner.push(if low { j + h } else { j - h });
        p.sign.push(if low { -1.0 } else { 1.0 });
    }
    p
}

impl Road {
    /// Calls `f(j, c1_j, partner_j, sign_j·c2_j)` for every output channel `j`, so that
    /// `(R v)_j = c1_j v_j + sign_j·c2_j v_partner` (the merge of `W`'s rows and `b`).
    fn rotate<F: FnMut(usize, f64, usize, f64)>(p: &Params, cfg: &Config, d_out: usize, mut f: F) {
        let (theta, alpha) = (vec1(p, "lora_road_theta"), vec1(p, "lora_road_alpha"));
        let pl = planes(d_out, cfg);
        for j in 0..d_out {
            let (c, s) = (pl.cos[j] as usize, pl.sin[j] as usize);
            let c1 = alpha[c] as f64 * (theta[c] as f64).cos();
            let c2 = alpha[s] as f64 * (theta[s] as f64).sin();
            f(j, c1, pl.partner[j], pl.sign[j] * c2);
        }
    }
}

impl Variant for Road {
    fn name(&self) -> &'static str {
        "road"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let n = cfg.road_variant.len(d.d_out);
        vec![
            ParamSpec {
                name: "lora_road_theta",
                shape: vec![n],
                init: Init::Zeros,
                trainable: true,
            },
            ParamSpec {
                name: "lora_road_alpha",
                shape: vec![n],
                init: Init::Constant(1.0),
                trainable: true,
            },
        ]
    }

    fn check_layer(&self, d: Dims, cfg: &Config) -> std::result::Result<(), String> {
        let g = cfg.road_group_size;
        if g < 2 || !g.is_multiple_of(2) || !d.d_out.is_multiple_of(g) {
            return Err(format!(
                "group size {g} must be even and divide the layer's {} outputs; choose --road-group-size accordingly (8 divides most)",
                d.d_out
            ));
        }
        Ok(())
    }

    fn uses_rank(&self) -> bool {
        false
    }

    fn splice(&self) -> Splice {
        Splice::PostBias
    }

    fn cfg_fields(&self, cfg: &Config) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("road_variant", cfg.road_variant.name().into()),
            ("group_size", cfg.road_group_size.into()),
        ]
    }

    // Once per module: c1 = Gather(α) cos Gather(θ), c2 = sign ⊙ Gather(α) sin Gather(θ),
    // one per output channel.
    fn module_values(
        &self,
        b: &mut Builder,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        let (theta, alpha) = (p["lora_road_theta"], p["lora_road_alpha"]);
        let term = |b: &mut Builder, idx: &[i64], op: &str| -> Result<ValueId> {
            let idx = b.ints("index", idx);
            let th = b.op("Gather", &[theta, idx], vec![int_attr("axis", 0)])?;
            let al = b.op("Gather", &[alpha, idx], vec![int_attr("axis", 0)])?;
            let trig = b.op(op, &[th], vec![])?;
            b.op("Mul", &[al, trig], vec![])
        };
        let pl = planes(self.d_out_of(b, theta, cfg)?, cfg);
        let c1 = term(b, &pl.cos, "Cos")?;
        let c2 = term(b, &pl.sin, "Sin")?;
        let sign = b.floats("sign", &[pl.sign.len()], &pl.sign);
        let c2 = b.op("Mul", &[c2, sign], vec![])?;
        Ok(vec![("road_c1", c1), ("road_c2", c2)])
    }

    // y' = y ⊙ c1 + swap_halves(y) ⊙ c2, the halves of each group swapped by a Split
    // and a Concat (no d_out × d_out matrix).
    fn branch(
        &self,
        b: &mut Builder,
        _x: ValueId,
        y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        let d_out = self.d_out_of(b, p["lora_road_theta"], cfg)?;
        let h = cfg.road_group_size / 2;
        let chunks = d_out / h;
        let sizes = vec![h as i64; chunks];
        // The sizes are an input from opset 13, an attribute before.
        let (inputs, mut attrs) = (vec![y], vec![int_attr("axis", -1)]);
        let inputs = if b.opset >= 13 {
            vec![y, b.ints("split", &sizes)]
        } else {
            attrs.push(crate::ir::build::ints_attr("split", &sizes));
            inputs
        };
        let name = format!("{}{}Split", b.prefix, b.sep);
        let parts = b.graph.add_op("Split", &name, &inputs, attrs, chunks)?.1;
        let swapped: Vec<ValueId> = parts
            .chunks(2)
            .flat_map(|pair| [pair[1], pair[0]])
            .collect();
        let rot = b.op("Concat", &swapped, vec![int_attr("axis", -1)])?;
        let a = b.op("Mul", &[y, p["road_c1"]], vec![])?;
        let r = b.op("Mul", &[rot, p["road_c2"]], vec![])?;
        b.op("Add", &[a, r], vec![])
    }

    // W' = R W: row j = c1_j W[j,:] + c2_j·sign_j W[partner_j,:].
    fn low_rank(&self, _p: &Params, _cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Err("it rotates pairs of outputs (R y), a full-rank change: serving it needs rotation inputs; serve the merged model instead".into())
    }

    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        let mut out = w.clone(); // each row mixes two rows of the original
        Road::rotate(p, cfg, w.nrows(), |j, c1, k, c2| {
            let row = w.row(j).mapv(|v| c1 as f32 * v) + w.row(k).mapv(|v| c2 as f32 * v);
            out.row_mut(j).assign(&row);
        });
        out
    }

    // b' = R b
    fn merged_bias(&self, b: &Array1<f32>, p: &Params, cfg: &Config) -> Option<Array1<f32>> {
        let mut out = b.clone();
        Road::rotate(p, cfg, b.len(), |j, c1, k, c2| {
            out[j] = (c1 * b[j] as f64 + c2 * b[k] as f64) as f32;
        });
        Some(out)
    }
}

impl Road {
    /// The layer's output width, from the length of θ.
    fn d_out_of(&self, b: &Builder, theta: ValueId, cfg: &Config) -> Result<usize> {
        let n = b
            .graph
            .initializer(theta)
            .map(|i| i.dims().first().copied().unwrap_or(0) as usize)
            .unwrap_or(0);
        Ok(match cfg.road_variant {
            RoadVariant::Road1 => 2 * n,
            RoadVariant::Road2 => n,
            RoadVariant::Road4 => n / 2,
        })
    }
}
