//! Learning-rate schedules, as multipliers of the optimizer's base lr (torch's LambdaLR).

use anyhow::Result;
use tune_core::{ArgSpec, ArgType, Args, Component, ComponentKind};

/// torchtune's `get_cosine_schedule_with_warmup`: linear warmup from 0, then a half cosine to 0.
#[derive(Debug, Clone, PartialEq)]
pub struct CosineWithWarmup {
    pub num_warmup_steps: usize,
    pub num_training_steps: usize,
    pub num_cycles: f64,
}

impl CosineWithWarmup {
    /// The lr multiplier for optimizer step index `step` (0-based: the first step uses step 0,
    /// so it runs at lr 0 when there is warmup, as torchtune's does).
    pub fn multiplier(&self, step: usize) -> f64 {
        if step < self.num_warmup_steps {
            return step as f64 / self.num_warmup_steps.max(1) as f64;
        }
        let progress = (step - self.num_warmup_steps) as f64
            / self
                .num_training_steps
                .saturating_sub(self.num_warmup_steps)
                .max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
        cosine.max(0.0)
    }
}

/// What the `lr_scheduler` node asks for; `num_training_steps` is filled in by the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct CosineArgs {
    pub num_warmup_steps: usize,
    pub num_cycles: f64,
}

impl CosineArgs {
    fn from_args(args: &Args) -> Result<Self> {
        let last_epoch: i64 = args.get("last_epoch")?;
        if last_epoch != -1 {
            // torch's LambdaLR fails too: it needs an optimizer state it is not given.
            anyhow::bail!(
                "lr_scheduler.last_epoch={last_epoch}: the schedule starts with the run (-1); to \
                 continue a run where it stopped, use resume_from_checkpoint=True, which restores \
                 the step count"
            );
        }
        Ok(CosineArgs {
            num_warmup_steps: args.get("num_warmup_steps")?,
            num_cycles: args.get("num_cycles")?,
        })
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        aliases: &["torchtune.modules.get_cosine_schedule_with_warmup", "get_cosine_schedule_with_warmup"],
        kind: ComponentKind::LrScheduler,
        args: &[
            ArgSpec::required("num_warmup_steps", ArgType::Int),
            ArgSpec::optional("num_cycles", ArgType::Float, "0.5"),
            ArgSpec::optional("last_epoch", ArgType::Int, "-1"),
        ],
        extra_args: false,
        about: "linear warmup then cosine decay to 0",
        origin: "built-in",
        build: |args| Ok(Box::new(CosineArgs::from_args(args)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_torchtune_trajectory_lrs() {
        // From the trajectory fixture: warmup 2, 10 steps, base lr 3e-3.
        let s = CosineWithWarmup {
            num_warmup_steps: 2,
            num_training_steps: 10,
            num_cycles: 0.5,
        };
        let used = [
            0.0,
            0.0015,
            0.003,
            0.00288581929876693,
            0.002560660171779821,
            0.002074025148547635,
        ];
        for (i, lr) in used.iter().enumerate() {
            assert!((s.multiplier(i) * 3e-3 - lr).abs() < 1e-12, "step {i}");
        }
        assert_eq!(s.multiplier(10), 0.0);
    }

    #[test]
    fn a_schedule_that_starts_mid_run_is_refused() {
        let component = tune_core::registry::lookup("get_cosine_schedule_with_warmup").unwrap();
        let node = |extra: &str| -> serde_yaml::Value {
            serde_yaml::from_str(&format!("{{num_warmup_steps: 10{extra}}}")).unwrap()
        };
        assert!(component.build_from(&node("")).is_ok());
        let err = component
            .build_from(&node(", last_epoch: 5"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("resume_from_checkpoint=True"), "{err}");
    }
}
