//! AdamW with torch's semantics, over the adapter's trainable tensors.
//!
//! Per step t (torch.optim.AdamW, non-amsgrad): `p *= 1 - lr*wd; m = b1 m + (1-b1) g;
//! v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
//! Moments are kept in fp32 whatever the parameter dtype.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use tune_core::{ArgSpec, ArgType, Args, Component, ComponentKind};

/// AdamW hyper-parameters (torch's names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_args(args: &Args) -> Result<Self> {
        let betas: Vec<f64> = args.get("betas")?;
        if betas.len() != 2 {
            bail!("optimizer.betas must have two values, e.g. [0.9, 0.999]");
        }
        if args.get::<bool>("amsgrad")? {
            bail!("optimizer.amsgrad=True is not supported; remove it");
        }
        let config = AdamWConfig {
            lr: args.get("lr")?,
            betas: (betas[0], betas[1]),
            eps: args.get("eps")?,
            weight_decay: args.get("weight_decay")?,
        };
        // torch.optim.AdamW refuses these too (a negative lr would ascend the loss).
        if !at_least_zero(config.lr) {
            bail!(
                "invalid optimizer.lr={} (the learning rate must be >= 0)",
                config.lr
            );
        }
        if !at_least_zero(config.eps) {
            bail!("invalid optimizer.eps={} (it must be >= 0)", config.eps);
        }
        if !at_least_zero(config.weight_decay) {
            bail!(
                "invalid optimizer.weight_decay={} (it must be >= 0)",
                config.weight_decay
            );
        }
        if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            bail!(
                "invalid optimizer.betas=[{}, {}] (each must be in [0, 1), e.g. [0.9, 0.999])",
                betas[0],
                betas[1]
            );
        }
        Ok(config)
    }
}

/// `x >= 0`, and false for NaN.
fn at_least_zero(x: f64) -> bool {
    x >= 0.0
}

/// One parameter's optimizer state.
pub struct ParamState {
    pub name: String,
    pub var: Var,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Number of steps taken (torch's `state['step']`, shared by all params here).
    pub step: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: Vec<(String, Var)>) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(ParamState {
                    name,
                    var,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    /// One update at learning rate `lr`; `grads[i]` is the gradient of `params[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!(
                "AdamW got {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let c = &self.config;
        let (b1, b2) = c.betas;
        let t = self.step as i32;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bias1;
        for (state, grad) in self.params.iter_mut().zip(grads) {
            let g = grad.to_dtype(DType::F32)?;
            let p = state.var.as_tensor().to_dtype(DType::F32)?;
            let p = (p * (1.0 - lr * c.weight_decay))?;
            state.exp_avg = ((&state.exp_avg * b1)? + (&g * (1.0 - b1))?)?;
            state.exp_avg_sq = ((&state.exp_avg_sq * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((state.exp_avg_sq.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (state.exp_avg.div(&denom)? * step_size)?;
            let new = (p - update)?.to_dtype(state.var.dtype())?;
            state.var.set(&new)?;
        }
        Ok(())
    }

    /// The moments by name (`exp_avg.{param}`, `exp_avg_sq.{param}`), as a checkpoint keeps them.
    pub fn moments(&self) -> HashMap<String, Tensor> {
        let mut moments = HashMap::new();
        for p in &self.params {
            moments.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            moments.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
        }
        moments
    }

    /// Takes every parameter's moments from `moments` (as [`AdamW::moments`] names them).
    pub fn load_moments(&mut self, moments: &HashMap<String, Tensor>) -> Result<()> {
        for p in self.params.iter_mut() {
            let get = |name: String| {
                moments
                    .get(&name)
                    .cloned()
                    .with_context(|| format!("optimizer state incomplete: {name} is missing"))
            };
            p.exp_avg = get(format!("exp_avg.{}", p.name))?;
            p.exp_avg_sq = get(format!("exp_avg_sq.{}", p.name))?;
        }
        Ok(())
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torch.optim.AdamW",
        aliases: &["AdamW", "torch.optim.adamw.AdamW"],
        kind: ComponentKind::Optimizer,
        args: &[
            ArgSpec::optional("lr", ArgType::Float, "0.001"),
            ArgSpec::optional("betas", ArgType::FloatList, "[0.9, 0.999]"),
            ArgSpec::optional("eps", ArgType::Float, "1e-8"),
            ArgSpec::optional("weight_decay", ArgType::Float, "0.01"),
            ArgSpec::optional("amsgrad", ArgType::Bool, "false"),
            ArgSpec::nullable("fused", ArgType::Bool),
            ArgSpec::nullable("foreach", ArgType::Bool),
        ],
        extra_args: false,
        about: "AdamW with torch semantics (fp32 moments)",
        origin: "built-in",
        build: |args| Ok(Box::new(AdamWConfig::from_args(args)?)),
    }
}

// bitsandbytes' optimizers save memory on full-model state; a LoRA run's optimizer state is a
// few MB, so AdamW serves the same purpose.
tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "bitsandbytes.optim.PagedAdamW",
        aliases: &["PagedAdamW", "bitsandbytes.optim.PagedAdamW32bit", "bitsandbytes.optim.AdamW"],
        why: "bitsandbytes is a CUDA library for Python. LoRA trains few parameters, so \
              torch.optim.AdamW's state is small: use it",
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "bitsandbytes.optim.PagedAdamW8bit",
        aliases: &["PagedAdamW8bit", "bitsandbytes.optim.AdamW8bit", "torchao.prototype.low_bit_optim.AdamW8bit", "torchao.optim.AdamW8bit"],
        why: "bitsandbytes is a CUDA library for Python. LoRA trains few parameters, so \
              torch.optim.AdamW's state is small: use it",
    }
}
