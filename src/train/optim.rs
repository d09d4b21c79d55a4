//! The optimizer: AdamW as PyTorch computes it, global gradient-norm clipping and
//! the learning-rate schedules.

use std::collections::BTreeMap;

use tract_core::ndarray::ArrayD;

/// Learning-rate schedules (Hugging Face's, after a linear warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// The learning rate of (0-based) step `step` of `total`, `warmup` of them warming up.
    pub fn lr(self, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return base * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - progress).max(0.0),
            Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// AdamW over named tensors, as `torch.optim.AdamW` computes it.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Learning rate of the next step (set by the schedule).
    pub lr: f64,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Steps taken.
    pub step: u64,
    /// First moments.
    pub m: BTreeMap<String, ArrayD<f32>>,
    /// Second moments.
    pub v: BTreeMap<String, ArrayD<f32>>,
}

impl AdamW {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn new(lr: f64, weight_decay: f64) -> AdamW {
        AdamW {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One step: p ← p·(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    /// p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).
    pub fn update(
        &mut self,
        params: &mut BTreeMap<String, ArrayD<f32>>,
        grads: &BTreeMap<String, ArrayD<f32>>,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = self.betas;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (name, p) in params.iter_mut() {
            let g = &grads[name];
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            for (((p, &g), m), v) in p
                .iter_mut()
                .zip(g.iter())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                let (g, mut pf) = (g as f64, *p as f64);
                pf *= 1.0 - self.lr * self.weight_decay;
                let mf = b1 * *m as f64 + (1.0 - b1) * g;
                let vf = b2 * *v as f64 + (1.0 - b2) * g * g;
                *m = mf as f32;
                *v = vf as f32;
                let denom = (vf / c2).sqrt() + self.eps;
                pf -= self.lr * (mf / c1) / denom;
                *p = pf as f32;
            }
        }
    }
}

/// Scales `grads` so their global L2 norm is at most `max` (torch's clip_grad_norm_);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, ArrayD<f32>>, max: f64) -> f64 {
    let norm = grads
        .values()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let coef = max / (norm + 1e-6);
    if max > 0.0 && coef < 1.0 {
        for g in grads.values_mut() {
            g.mapv_inplace(|x| (x as f64 * coef) as f32);
        }
    }
    norm
}
