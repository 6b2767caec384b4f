//! torchtune's preference losses (`torchtune.rlhf.loss`): DPO (Rafailov et al. 2023) and RSO's
//! hinge loss, from the policy's and the reference's sequence log-probabilities.

use anyhow::Result;
use candle_core::{DType, Tensor};
use tune_core::{ArgSpec, ArgType, Component, ComponentKind};

/// torchtune's `DPOLoss(beta, label_smoothing)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoLoss {
    /// How far the policy may move from the reference (typically 0.1 to 0.5).
    pub beta: f64,
    /// The assumed probability that a preference label is wrong (conservative DPO).
    pub label_smoothing: f64,
}

/// torchtune's `RSOLoss(gamma)` (statistical rejection sampling optimisation's hinge loss):
/// `relu(1 - gamma * ((pi_c - pi_r) - (ref_c - ref_r)))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RsoLoss {
    pub gamma: f64,
}

/// The preference losses this recipe trains with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreferenceLoss {
    Dpo(DpoLoss),
    Rso(RsoLoss),
}

impl PreferenceLoss {
    pub fn forward(
        &self,
        policy: (&Tensor, &Tensor),
        reference: (&Tensor, &Tensor),
    ) -> Result<PreferenceOutput> {
        match self {
            PreferenceLoss::Dpo(loss) => loss.forward(policy, reference),
            PreferenceLoss::Rso(loss) => loss.forward(policy, reference),
        }
    }
}

/// A micro-batch's preference-loss numbers.
pub struct PreferenceOutput {
    /// The mean loss over the pairs (differentiable through the policy log-probabilities).
    pub loss: Tensor,
    /// `beta * (pi - ref)` per pair, for the chosen and the rejected responses.
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
}

impl DpoLoss {
    /// The loss from the policy's and the reference's sequence log-probabilities, each [pairs].
    pub fn forward(
        &self,
        (policy_chosen, policy_rejected): (&Tensor, &Tensor),
        (reference_chosen, reference_rejected): (&Tensor, &Tensor),
    ) -> Result<PreferenceOutput> {
        let margin = log_ratio_margin(
            (policy_chosen, policy_rejected),
            (reference_chosen, reference_rejected),
        )?;
        let scaled = (margin * self.beta)?;
        let losses = ((log_sigmoid(&scaled)? * -(1.0 - self.label_smoothing))?
            - (log_sigmoid(&scaled.neg()?)? * self.label_smoothing)?)?;
        preference_output(
            losses,
            self.beta,
            (policy_chosen, policy_rejected),
            (reference_chosen, reference_rejected),
        )
    }
}

impl RsoLoss {
    pub fn forward(
        &self,
        policy: (&Tensor, &Tensor),
        reference: (&Tensor, &Tensor),
    ) -> Result<PreferenceOutput> {
        let margin = log_ratio_margin(policy, reference)?;
        let losses = (1.0 - (margin * self.gamma)?)?.relu()?;
        preference_output(losses, self.gamma, policy, reference)
    }
}

/// `(pi_c - pi_r) - (ref_c - ref_r)`, differentiable through the policy only.
fn log_ratio_margin(
    (policy_chosen, policy_rejected): (&Tensor, &Tensor),
    (reference_chosen, reference_rejected): (&Tensor, &Tensor),
) -> Result<Tensor> {
    let reference_margin = (reference_chosen - reference_rejected)?.detach();
    Ok(((policy_chosen - policy_rejected)? - reference_margin)?)
}

/// The mean of `losses` and the rewards `scale * (pi - ref)` of both responses.
fn preference_output(
    losses: Tensor,
    scale: f64,
    (policy_chosen, policy_rejected): (&Tensor, &Tensor),
    (reference_chosen, reference_rejected): (&Tensor, &Tensor),
) -> Result<PreferenceOutput> {
    let reward = |policy: &Tensor, reference: &Tensor| -> Result<Vec<f32>> {
        Ok(((policy.detach() - reference.detach())? * scale)?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    };
    Ok(PreferenceOutput {
        loss: losses.mean_all()?,
        chosen_rewards: reward(policy_chosen, reference_chosen)?,
        rejected_rewards: reward(policy_rejected, reference_rejected)?,
    })
}

/// `log(sigmoid(x))`, computed as `min(x, 0) - log(1 + exp(-|x|))` (no overflow for large |x|);
/// its gradient is `sigmoid(-x)`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let y = (xd.minimum(0.0)? - (xd.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let x_saved = xd.clone();
    Ok(tune_core::autograd::with_backward(
        "log_sigmoid",
        x,
        y,
        move |grad| grad.mul(&candle_nn::ops::sigmoid(&x_saved.neg()?)?),
    )?)
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.rlhf.loss.DPOLoss",
        aliases: &["DPOLoss"],
        kind: ComponentKind::Loss,
        args: &[
            ArgSpec::optional("beta", ArgType::Float, "0.1"),
            ArgSpec::optional("label_smoothing", ArgType::Float, "0.0"),
        ],
        extra_args: false,
        about: "Direct Preference Optimization: -log sigmoid(beta * (policy - reference log-ratio)) of chosen vs rejected",
        origin: "built-in",
        build: |args| {
            let beta: f64 = args.get_opt("beta")?.unwrap_or(0.1);
            if beta.is_nan() || beta <= 0.0 {
                anyhow::bail!("loss.beta={beta}: the DPO loss needs beta > 0 (at 0 it is constant and trains nothing); torchtune's configs use 0.1");
            }
            let label_smoothing: f64 = args.get_opt("label_smoothing")?.unwrap_or(0.0);
            // cDPO's probability that a pair's labels are flipped: at 0.5 the loss no longer
            // prefers either response, above it prefers the rejected one.
            if !(0.0..0.5).contains(&label_smoothing) {
                anyhow::bail!("loss.label_smoothing={label_smoothing}: it is the probability that a pair's preference is wrong (conservative DPO), so it must be at least 0 and below 0.5 (at 0.5 the loss prefers neither response); the default is 0");
            }
            Ok(Box::new(PreferenceLoss::Dpo(DpoLoss {
                beta,
                label_smoothing,
            })))
        },
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.rlhf.loss.RSOLoss",
        aliases: &["RSOLoss"],
        kind: ComponentKind::Loss,
        args: &[ArgSpec::optional("gamma", ArgType::Float, "0.1")],
        extra_args: false,
        about: "Statistical rejection sampling optimisation: hinge loss relu(1 - gamma * (policy - reference log-ratio))",
        origin: "built-in",
        build: |args| {
            let gamma: f64 = args.get_opt("gamma")?.unwrap_or(0.1);
            if gamma.is_nan() || gamma <= 0.0 {
                anyhow::bail!("loss.gamma={gamma}: the RSO loss needs gamma > 0 (at 0 it is constant and trains nothing); its default is 0.1");
            }
            Ok(Box::new(PreferenceLoss::Rso(RsoLoss { gamma })))
        },
    }
}
