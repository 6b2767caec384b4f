//! `lora_finetune_single_device`: torchtune 0.6.1's LoRA recipe on one device.
//!
//! Reads top to bottom like the loop it is: build model, tokenizer, data, optimizer, schedule,
//! loss and loggers from the config; then for each epoch and each window of
//! `gradient_accumulation_steps` micro-batches: forward, token-weighted loss, backward, scale the
//! gradients by 1/tokens, optionally clip, AdamW step at the scheduled lr, log; save at epoch end.
//!
//! `lora_finetune_distributed` runs this same loop in every rank of a [`ProcessGroup`]: each rank
//! takes its share of every batch, and at the end of each window the adapter gradients, token
//! counts and losses are summed across ranks before the (identical) optimizer step. With one
//! rank every collective is the identity, so both recipes are one loop.
//!
//! What a micro-batch's loss is comes from an [`Objective`]: next-token cross-entropy here
//! ([`NextToken`]), preference optimisation in `lora_dpo_single_device`. Everything else — the
//! model, optimizer, schedule, gradient accumulation, clipping, logging, checkpoints, resume,
//! Ctrl-C — is this loop.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::{ComponentKind, Config};
use tune_data::BatchSampler;
use tune_models::builders::model_spec_from_node;
use tune_models::{ModelSpec, TransformerDecoder};

use crate::checkpointer::{newest_checkpoint, HfCheckpointer, RecipeState};
use crate::data::{self, TrainData};
use crate::distributed::ProcessGroup;
use crate::loss::model_ce_sum;
use crate::lr_schedule::{CosineArgs, CosineWithWarmup};
use crate::metric_logging::{LoggerSpec, Metrics};
use crate::optim::{AdamW, AdamWConfig};
use crate::settings::{
    parse_device, parse_dtype, peak_rss_gib, random_seed, seed_setting, TopLevel,
};

pub struct LoraFinetuneSingleDevice;

tune_core::inventory::submit! { RecipeEntry(&LoraFinetuneSingleDevice) }

impl Recipe for LoraFinetuneSingleDevice {
    fn name(&self) -> &'static str {
        "lora_finetune_single_device"
    }

    fn configs(&self) -> &'static [&'static str] {
        &[
            "llama2/7B_lora_single_device",
            "llama2/7B_qlora_single_device",
            "llama2/13B_qlora_single_device",
            "stories260K/lora_single_device",
            "stories260K/qlora_single_device",
            "stories260K/lora_text_completion",
        ]
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        crate::settings::SFT_KEYS
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        crate::settings::TRAINING_KEYS_WITHOUT_EFFECT
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        if options.is_distributed() {
            bail!("lora_finetune_single_device runs on one device; use lora_finetune_distributed with --nproc_per_node");
        }
        train(config, options).map(|_| ())
    }
}

/// What a finished run reports (used by tests and benchmarks).
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: Vec<StepLog>,
    pub output_dir: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens: usize,
    pub tokens_per_second: f64,
}

/// What the loop optimises, one micro-batch at a time.
pub trait Objective {
    /// The batches of example indices this rank trains on, per epoch.
    fn sampler(&self) -> &BatchSampler;
    /// Examples in the dataset (for messages).
    fn num_examples(&self) -> usize;
    /// The forward pass and loss of the examples `indices`.
    fn micro_batch(
        &self,
        model: &TransformerDecoder,
        indices: &[usize],
        device: &Device,
    ) -> Result<MicroBatch>;
}

/// One micro-batch's contribution to its optimizer step.
pub struct MicroBatch {
    /// The micro-batch's loss times `weight`, to backpropagate.
    pub weighted_loss: Tensor,
    /// Its share of the step: the step's gradient and logged loss are the weighted sums divided
    /// by the summed weights of the window (over all ranks).
    pub weight: f64,
    /// Tokens it counts for `tokens_per_second_per_gpu`.
    pub tokens: usize,
    /// Extra numbers to log with the step (the window's last micro-batch's, on rank 0).
    pub metrics: Metrics,
}

/// The settings an objective builds its data with.
pub struct DataSettings {
    pub batch_size: usize,
    pub shuffle: bool,
    /// (ranks, this rank).
    pub replicas: (usize, usize),
}

/// Builds the objective from the config, before the weights load (bad data fails fast).
pub type BuildObjective = fn(&TopLevel, &ModelSpec, &DataSettings) -> Result<Box<dyn Objective>>;

/// torchtune's SFT objective: next-token cross-entropy (`CEWithChunkedOutputLoss`), each
/// micro-batch's mean loss weighted by its label tokens.
pub struct NextToken {
    pub data: TrainData,
}

impl NextToken {
    pub fn build(
        cfg: &TopLevel,
        spec: &ModelSpec,
        settings: &DataSettings,
    ) -> Result<Box<dyn Objective>> {
        let _loss: crate::loss::ChunkedCrossEntropy = cfg.build_expecting(
            "loss",
            ComponentKind::Loss,
            "; it trains with torchtune.modules.loss.CEWithChunkedOutputLoss (DPOLoss belongs to \
             lora_dpo_single_device / lora_dpo_distributed)",
        )?;
        let data = data::build(
            cfg,
            (spec.transformer.vocab_size, spec.transformer.max_seq_len),
            settings.batch_size,
            settings.shuffle,
            settings.replicas,
        )?;
        Ok(Box::new(NextToken { data }))
    }
}

impl Objective for NextToken {
    fn sampler(&self) -> &BatchSampler {
        &self.data.sampler
    }

    fn num_examples(&self) -> usize {
        self.data.num_examples()
    }

    fn micro_batch(
        &self,
        model: &TransformerDecoder,
        indices: &[usize],
        device: &Device,
    ) -> Result<MicroBatch> {
        let batch = self.data.collate(indices, device, model.dtype())?;
        let tokens = batch.num_label_tokens;
        let (ce_sum, shifted) = model_ce_sum(
            model,
            &batch.tokens,
            &batch.labels,
            batch.packed.as_ref(),
            true,
        )?;
        // torchtune weights each micro-batch's mean loss by its (unshifted) label count. With
        // no label left after the shift there is nothing to learn (torchtune's mean is 0/0):
        // weight 0, as a micro-batch without labels.
        let weighted_loss = ((ce_sum / shifted.max(1) as f64)? * tokens as f64)?;
        Ok(MicroBatch {
            weighted_loss,
            weight: if shifted == 0 { 0.0 } else { tokens as f64 },
            tokens,
            metrics: Vec::new(),
        })
    }
}

pub fn train(config: Config, options: &RunOptions) -> Result<RunSummary> {
    train_data_parallel(config, options, &mut ProcessGroup::single())
}

/// The SFT loop, run by every rank of `group` (a group of one for the single-device recipe).
pub fn train_data_parallel(
    config: Config,
    options: &RunOptions,
    group: &mut ProcessGroup,
) -> Result<RunSummary> {
    train_objective(config, options, group, NextToken::build)
}

/// The loop for any objective, run by every rank of `group`.
pub fn train_objective(
    config: Config,
    options: &RunOptions,
    group: &mut ProcessGroup,
    build_objective: BuildObjective,
) -> Result<RunSummary> {
    let cfg = TopLevel(&config);

    // ---- Environment -------------------------------------------------------------------
    // An empty one would put checkpoints in the working folder and `${output_dir}/logs` at /logs.
    for key in ["output_dir", "checkpointer.output_dir"] {
        if config
            .get(key)
            .and_then(|v| v.as_str())
            .is_some_and(|d| d.trim().is_empty())
        {
            bail!("{key} is empty; set output_dir=<folder> for the checkpoints and logs");
        }
    }
    let epochs: usize = cfg.get("epochs", 1)?;
    let mut max_steps_per_epoch: Option<usize> = cfg.opt("max_steps_per_epoch")?;
    if max_steps_per_epoch == Some(0) {
        bail!("max_steps_per_epoch=0 would train nothing; set it to at least 1, or null for whole epochs");
    }
    let grad_accum: usize = cfg.get("gradient_accumulation_steps", 1)?;
    let clip_grad_norm: Option<f64> = cfg.opt("clip_grad_norm")?;
    let batch_size: usize = cfg.require("batch_size")?;
    let shuffle: bool = cfg.get("shuffle", true)?;
    let save_adapter_weights_only: bool = cfg.get("save_adapter_weights_only", false)?;
    let log_every: usize = cfg.get("log_every_n_steps", 1)?;
    if log_every == 0 {
        bail!("log_every_n_steps=0 would never log; set it to at least 1");
    }
    let log_peak_memory: bool = cfg.get("log_peak_memory_stats", false)?;
    let save_every_n_steps: Option<usize> = cfg.opt("save_every_n_steps")?;
    if grad_accum == 0 || batch_size == 0 {
        bail!("batch_size and gradient_accumulation_steps must be at least 1");
    }

    // ---- Model -------------------------------------------------------------------------
    let spec = model_spec_from_node(cfg.node("model")?).context("building `model`")?;
    if spec.lora.is_none() {
        bail!(
            "`{}` has no adapter; this recipe trains LoRA models (e.g. lora_llama2_7b)",
            spec.builder
        );
    }
    if spec.transformer.attn_dropout > 0.0 {
        // torchtune drops attention probabilities in training; the fused attention here has no
        // dropout, so the value would be ignored.
        bail!(
            "model.attn_dropout={} is not supported in training (attention dropout is not \
             implemented); set model.attn_dropout=0.0, as every torchtune llama2 config does",
            spec.transformer.attn_dropout
        );
    }
    let checkpointer: HfCheckpointer = cfg.build("checkpointer", ComponentKind::Checkpointer)?;
    let resume = cfg.get("resume_from_checkpoint", false)? || checkpointer.resume_from_checkpoint;
    let seed_asked = seed_setting(&cfg, group.world_size())?;
    if options.dry_run {
        println!("{}", config.to_yaml_string());
        println!("{}", spec.counts()?.summary());
        return Ok(RunSummary {
            steps: Vec::new(),
            output_dir: checkpointer.output_dir.clone(),
            last_checkpoint: None,
        });
    }
    checkpointer.check_output_dir()?;
    crate::checkpointer::refuse_files_named_like_checkpoints(&checkpointer.output_dir)?;
    // Leftovers of a killed run first (a checkpoint it had moved aside comes back), so that
    // every rank then sees the same checkpoints.
    if group.is_main() {
        for done in crate::atomic::remove_stale(&checkpointer.output_dir) {
            tracing::info!("{done}");
        }
    }
    group.barrier()?;

    // ---- Resume point: before the seed, which a resumed run takes from its checkpoint ------
    let resume_from: Option<(PathBuf, RecipeState)> =
        resume.then(|| checkpointer.resume_point()).transpose()?;
    if let (Some((dir, _)), Some(adapter)) = (&resume_from, &checkpointer.adapter_checkpoint) {
        tracing::warn!(
            "checkpointer.adapter_checkpoint ({}) is not used when resuming: the adapter comes \
             from {}",
            adapter.display(),
            dir.display()
        );
    }
    let seed: u64 = match (&resume_from, seed_asked) {
        // As torchtune: the checkpoint's seed and max_steps_per_epoch win (the adapters' dropout
        // and the epoch length must be the ones the run started with), with a warning.
        (Some((dir, saved)), asked) => {
            if asked.is_some_and(|s| s != saved.seed) {
                tracing::warn!(
                    "seed differs from {}'s; using the checkpoint's seed {}",
                    dir.display(),
                    saved.seed
                );
            }
            if max_steps_per_epoch != saved.max_steps_per_epoch {
                tracing::warn!(
                    "max_steps_per_epoch differs from {}'s; using the checkpoint's {}",
                    dir.display(),
                    saved
                        .max_steps_per_epoch
                        .map_or("null".to_string(), |n| n.to_string())
                );
                max_steps_per_epoch = saved.max_steps_per_epoch;
            }
            saved.seed
        }
        (None, Some(s)) => s,
        // With `seed: null` rank 0 draws one and every rank uses it (the same adapter init).
        (None, None) => group.broadcast_u64(random_seed(group.world_size()))?,
    };
    // Past the dry run: only now does the device matter.
    let device_name = rank_device(&cfg.get("device", "cpu".to_string())?, group);
    let device = parse_device(&device_name)?;
    let dtype = parse_dtype(&cfg.get("dtype", "fp32".to_string())?, &device)?;
    // A model that cannot fit fails here with the numbers, not as an allocation error mid-load.
    crate::settings::check_weights_fit(
        crate::settings::weight_bytes(&spec, dtype)?,
        crate::device_memory::free_bytes(&device),
        &device_name,
        dtype,
        group.world_size() > 1,
    )?;
    let started = Instant::now();

    if cfg.get("compile", false)? {
        tracing::info!("compile=True: torch.compile has no tune-rs counterpart (the recipe is compiled Rust); ignoring it");
    }
    if cfg.get("enable_activation_offloading", false)? {
        // torchtune refuses it off CUDA and without checkpointing; tune-rs does not implement it.
        if device.is_cpu() {
            bail!(
                "enable_activation_offloading=True only applies to training on CUDA (as in \
                 torchtune); set it to False"
            );
        }
        if !cfg.get("enable_activation_checkpointing", false)? {
            bail!(
                "enable_activation_offloading=True needs enable_activation_checkpointing=True (as in \
                 torchtune)"
            );
        }
        tracing::warn!(
            "enable_activation_offloading=True is not implemented: activations stay on the GPU \
             (enable_activation_checkpointing keeps only each layer's input)"
        );
    }

    // ---- Data (before the weights: a bad tokenizer or dataset fails fast) ------------------
    let objective = build_objective(
        &cfg,
        &spec,
        &DataSettings {
            batch_size,
            shuffle,
            replicas: (group.world_size(), group.rank()),
        },
    )?;
    // Every rank must train the same thing: a rank given another config, seed or data would
    // train apart without a word (only rank 0 saves).
    group.check_all_agree(
        &(config.to_yaml_string(), seed, objective.num_examples()),
        "config, seed or dataset",
    )?;
    // Dropout draws from the device's generator: seeded per rank, as torchtune seeds each rank
    // with seed + rank (candle cannot seed its CPU generator; there it stays unseeded).
    let _ = device.set_seed(seed.wrapping_add(group.rank() as u64));
    let (mut model, spec, layout) = checkpointer.load_base(&spec, dtype, &device, seed)?;
    tracing::info!("{}", spec.counts()?.summary());
    // As torchtune: the GPU memory the model takes, then peaks that count training only.
    if let Some(memory) = crate::device_memory::read(&device) {
        use crate::device_memory::gib;
        tracing::info!(
            "GPU memory after model init: peak allocated {:.2} GiB, peak reserved {:.2} GiB",
            gib(memory.peak_in_use),
            gib(memory.peak_reserved)
        );
        crate::device_memory::reset_peaks(&device);
    }

    let batches_per_epoch = objective.sampler().num_batches();
    let steps_per_epoch = match max_steps_per_epoch {
        Some(m) => (batches_per_epoch / grad_accum).min(m),
        None => batches_per_epoch / grad_accum,
    };
    if steps_per_epoch == 0 {
        bail!(
            "one optimizer step needs batch_size * gradient_accumulation_steps * ranks = {} samples, \
             but the dataset has {} (packs when packed=True; after drop_last); lower batch_size or gradient_accumulation_steps",
            batch_size * grad_accum * group.world_size(),
            objective.num_examples()
        );
    }

    // ---- Optimizer, schedule, loss, loggers ----------------------------------------------
    let opt_config: AdamWConfig = cfg.build("optimizer", ComponentKind::Optimizer)?;
    // No `lr_scheduler` node means a constant learning rate.
    let schedule: Option<CosineWithWarmup> = match cfg.node("lr_scheduler") {
        Ok(_) => {
            let a: CosineArgs = cfg.build("lr_scheduler", ComponentKind::LrScheduler)?;
            Some(CosineWithWarmup {
                num_warmup_steps: a.num_warmup_steps,
                num_training_steps: epochs * steps_per_epoch,
                num_cycles: a.num_cycles,
            })
        }
        Err(_) => None,
    };
    if let Ok(node) = cfg.node("profiler") {
        if node.get("enabled").and_then(|v| v.as_bool()) == Some(true) {
            tracing::warn!(
                "profiler.enabled=True: the torch profiler has no tune-rs equivalent; ignoring it"
            );
        }
    }
    if cfg.get("enable_activation_checkpointing", false)? {
        if spec.lora.as_ref().is_some_and(|l| l.adapter.dropout > 0.0) {
            bail!(
                "enable_activation_checkpointing with lora_dropout > 0 is not supported (the \
                 recomputed dropout mask would differ); set model.lora_dropout=0.0 or \
                 enable_activation_checkpointing=False"
            );
        }
        model.activation_checkpointing = true;
    }
    // Only rank 0 logs and writes; the other ranks build the logger spec for its checks.
    let logger_spec = match cfg.node("metric_logger") {
        Ok(_) => cfg.build::<LoggerSpec>("metric_logger", ComponentKind::MetricLogger)?,
        Err(_) => LoggerSpec::Stdout,
    };
    let mut logger = group.is_main().then(|| logger_spec.open()).transpose()?;
    if group.is_main() {
        if !resume {
            // Only a warning: an unreadable old state must not stop a run that never reads it.
            if let Some((dir, _)) = newest_checkpoint(&checkpointer.output_dir).ok().flatten() {
                tracing::warn!(
                    "output_dir {} already holds checkpoints (newest: {}); this fresh run \
                     overwrites those with the same names, and resume_from_checkpoint=True later \
                     takes the one furthest into its run. Use a new output_dir to keep runs apart",
                    checkpointer.output_dir.display(),
                    dir.display()
                );
            }
        }
        std::fs::create_dir_all(&checkpointer.output_dir).with_context(|| {
            format!(
                "cannot create output_dir {}",
                checkpointer.output_dir.display()
            )
        })?;
        crate::atomic::write(
            &checkpointer.output_dir.join("torchtune_config.yaml"),
            config.to_yaml_string().as_bytes(),
        )?;
    }

    let params = model.adapter_params();
    let mut optimizer = AdamW::new(opt_config.clone(), params.clone())?;

    // ---- Resume or warm start --------------------------------------------------------------
    let mut state = RecipeState {
        epochs_run: 0,
        global_step: 0,
        batches_in_epoch: 0,
        seed,
        total_epochs: epochs,
        max_steps_per_epoch,
        gradient_accumulation_steps: grad_accum,
        optimizer_step: 0,
        world_size: group.world_size(),
        batch_size: Some(batch_size),
        steps_per_epoch: Some(steps_per_epoch),
        data_order: Some(crate::checkpointer::data_order(shuffle).to_string()),
    };
    if let Some((dir, saved)) = resume_from {
        if saved.gradient_accumulation_steps != grad_accum {
            bail!(
                "{} was written with gradient_accumulation_steps {}; resume with the same value",
                dir.display(),
                saved.gradient_accumulation_steps
            );
        }
        // Mid-epoch, the saved position counts batches of this many ranks, of this size, in
        // an epoch of this many steps.
        if saved.batches_in_epoch > 0 {
            let same = |saved: Option<usize>, now: usize| saved.is_none_or(|s| s == now);
            if saved.world_size != group.world_size()
                || !same(saved.batch_size, batch_size)
                || !same(saved.steps_per_epoch, steps_per_epoch)
            {
                bail!(
                    "{} stopped mid-epoch in a run of {} rank(s) with batch_size {} and {} steps per \
                     epoch; resume it with the same (this run: {} rank(s), batch_size {batch_size}, \
                     {steps_per_epoch} steps per epoch)",
                    dir.display(),
                    saved.world_size,
                    saved.batch_size.map_or("?".to_string(), |b| b.to_string()),
                    saved.steps_per_epoch.map_or("?".to_string(), |s| s.to_string()),
                    group.world_size()
                );
            }
            // File order never changed; a shuffled order saved before tune-rs recorded it was
            // not torch's.
            let order = crate::checkpointer::data_order(shuffle);
            let same_order = match saved.data_order.as_deref() {
                Some(saved_order) => saved_order == order,
                None => !shuffle,
            };
            if !same_order {
                bail!(
                    "{} stopped mid-epoch {}; this run (shuffle={shuffle}) orders the samples \
                     otherwise and would repeat some and skip others. Resume it with the same \
                     shuffle, or from an epoch's end (checkpointer.recipe_checkpoint=epoch_N)",
                    dir.display(),
                    match saved.data_order.as_deref() {
                        Some("torch_randperm") => "with shuffle=True",
                        Some("sequential") => "with shuffle=False",
                        _ => "in a run written before tune-rs shuffled as torch does",
                    }
                );
            }
        }
        let state_file = |name: &str| {
            let path = dir.join("recipe_state").join(name);
            candle_core::safetensors::load(&path, &device).with_context(|| {
                format!(
                    "cannot read {} ({}); resume from another checkpoint \
                     (checkpointer.recipe_checkpoint=<epoch_N or step_N>), or start afresh with \
                     resume_from_checkpoint=False",
                    path.display(),
                    if path.exists() { "damaged" } else { "missing" }
                )
            })
        };
        let adapter = state_file("adapter_torchtune.safetensors")?;
        model.load_adapter(&adapter)?;
        let moments = state_file("optimizer.safetensors")?;
        for p in optimizer.params.iter_mut() {
            p.exp_avg = moments
                .get(&format!("exp_avg.{}", p.name))
                .cloned()
                .context("optimizer state incomplete")?;
            p.exp_avg_sq = moments
                .get(&format!("exp_avg_sq.{}", p.name))
                .cloned()
                .context("optimizer state incomplete")?;
        }
        optimizer.step = saved.optimizer_step;
        tracing::info!(
            "resuming from {} (epoch {}, step {})",
            dir.display(),
            saved.epochs_run,
            saved.global_step
        );
        state = RecipeState {
            total_epochs: epochs,
            max_steps_per_epoch,
            world_size: group.world_size(),
            batch_size: Some(batch_size),
            steps_per_epoch: Some(steps_per_epoch),
            data_order: Some(crate::checkpointer::data_order(shuffle).to_string()),
            ..saved
        };
        // At an epoch's end the run may go on with other ranks or batch sizes: count the steps
        // taken as this run's epochs (as torchtune does), so the schedule ends with the run.
        if saved.batches_in_epoch == 0 {
            state.global_step = saved.epochs_run * steps_per_epoch;
        }
        if state.epochs_run >= epochs {
            tracing::warn!(
                "{} already finished all {epochs} epoch(s): nothing to train. Raise `epochs` to \
                 train further",
                dir.display()
            );
        }
    } else if let Some(path) = &checkpointer.adapter_checkpoint {
        let adapter = HfCheckpointer::read_adapter(path, &spec)?;
        model
            .load_adapter(&adapter)
            .with_context(|| format!("loading adapter_checkpoint {}", path.display()))?;
    } else {
        for (_, layer) in model.linears() {
            layer.on_weights_loaded()?;
        }
    }
    tracing::info!("ready to train in {:.2}s", started.elapsed().as_secs_f64());

    // ---- Train -------------------------------------------------------------------------------
    let total_steps = epochs * steps_per_epoch;
    let progress = if group.is_main() {
        indicatif::ProgressBar::new(total_steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_position(state.global_step as u64);
    let mut summary = RunSummary {
        steps: Vec::new(),
        output_dir: checkpointer.output_dir.clone(),
        last_checkpoint: None,
    };
    let lr_at = |step: usize| opt_config.lr * schedule.as_ref().map_or(1.0, |s| s.multiplier(step));

    // Rank 0 writes each checkpoint; the others wait for it, so a failed save stops them too.
    let save = |name: &str,
                merged: bool,
                state: &RecipeState,
                optimizer: &AdamW,
                group: &mut ProcessGroup|
     -> Result<PathBuf> {
        let dir = if group.is_main() {
            checkpointer.save(name, &model, &spec, &layout, merged, state, optimizer)?
        } else {
            checkpointer.output_dir.join(name)
        };
        group.barrier()?;
        Ok(dir)
    };
    let _listening = tune_core::recipe::listen_for_stop();
    // Set when the ranks agreed to stop at a step that ended an epoch: stop after its save.
    let mut stopping = false;
    for epoch in state.epochs_run..epochs {
        let batches = objective.sampler().batches_for_epoch(epoch as u64);
        let mut window_grads: Option<Vec<Tensor>> = None;
        let (mut window_weight, mut window_tokens, mut window_loss) = (0f64, 0usize, 0f64);
        // The objective's extra numbers: the last micro-batch's, and their sums over the window.
        let mut last_metrics: Metrics;
        let mut metric_sums: Vec<f64> = Vec::new();
        let mut window_micro_batches = 0usize;
        let mut window_start = Instant::now();
        let first_batch = if epoch == state.epochs_run {
            state.batches_in_epoch
        } else {
            0
        };
        for (idx, batch_indices) in batches.iter().enumerate().skip(first_batch) {
            if idx / grad_accum >= steps_per_epoch {
                break;
            }
            let step = state.global_step + 1;
            let out_of_memory = |what: &str, e: anyhow::Error| {
                crate::settings::explain_out_of_memory(
                    e,
                    || format!("in the {what} of step {step} (batch_size {batch_size})"),
                    crate::settings::TRAINING_MEMORY_ADVICE,
                )
            };
            let micro = objective
                .micro_batch(&model, batch_indices, &device)
                .map_err(|e| out_of_memory("forward", e))?;
            let loss = micro.weighted_loss;
            let loss_value: f32 = loss.to_dtype(DType::F32)?.to_scalar()?;
            if !loss_value.is_finite() && optimizer.step == 0 {
                // No update has run yet: the learning rate is not to blame.
                bail!(
                    "the loss is {loss_value} at epoch {epoch}, batch {idx}, before any update: \
                     the starting weights give it. Check the checkpoint{} for NaN/inf weights, \
                     or run with dtype=fp32 if bf16 overflows",
                    if checkpointer.adapter_checkpoint.is_some() {
                        " and checkpointer.adapter_checkpoint"
                    } else {
                        ""
                    }
                );
            }
            if !loss_value.is_finite() {
                bail!(
                    "loss became {loss_value} at epoch {epoch}, batch {idx} (step {}). Nothing was saved \
                     from this run after {}; lower the learning rate, enable clip_grad_norm, or check the data",
                    state.global_step + 1,
                    summary.last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "its start".into())
                );
            }
            // A micro-batch without label tokens (every label masked) adds nothing to learn
            // from: no backward, and its weight of 0 leaves the window's average alone.
            if micro.weight > 0.0 {
                let store = loss
                    .backward()
                    .map_err(|e| out_of_memory("backward", e.into()))?;
                // The graph (every kept activation) goes with the loss tensor: free it now, not
                // after the all-reduce and the optimizer step.
                drop(loss);
                let grads = params
                    .iter()
                    .map(|(name, var)| {
                        tune_core::autograd::param_grad(&store, var)?
                            .with_context(|| format!("no gradient reached {name}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                drop(store);
                window_grads = Some(match window_grads {
                    None => grads,
                    Some(acc) => acc
                        .iter()
                        .zip(&grads)
                        .map(|(a, g)| a.add(g))
                        .collect::<candle_core::Result<Vec<_>>>()?,
                });
            }
            window_weight += micro.weight;
            window_tokens += micro.tokens;
            window_loss += loss_value as f64;
            metric_sums.resize(micro.metrics.len(), 0.0);
            for (sum, (_, value)) in metric_sums.iter_mut().zip(&micro.metrics) {
                *sum += value;
            }
            window_micro_batches += 1;
            last_metrics = micro.metrics;

            if !(idx + 1).is_multiple_of(grad_accum) {
                continue;
            }
            // Across ranks: sum the gradients, token counts and losses; agree on stopping.
            // Zeros when none of this rank's micro-batches had label tokens (the others may).
            let mut grads = match window_grads.take() {
                Some(grads) => grads,
                None => params
                    .iter()
                    .map(|(_, var)| var.as_tensor().zeros_like())
                    .collect::<candle_core::Result<Vec<_>>>()?,
            };
            group.all_reduce_tensors(&mut grads)?;
            let mut totals = [
                window_weight,
                window_tokens as f64,
                window_loss,
                tune_core::recipe::stop_requested() as u8 as f64,
            ];
            group.all_reduce_sum_f64(&mut totals)?;
            let (step_weight, step_tokens, step_loss, stop) =
                (totals[0], totals[1] as usize, totals[2], totals[3] > 0.0);
            stopping = stop;
            if !step_loss.is_finite() {
                bail!(
                    "the loss summed over ranks became {step_loss} at step {}; lower the learning \
                     rate, enable clip_grad_norm, or check the data",
                    state.global_step + 1
                );
            }
            // Nothing to learn from (torchtune's loss is 0/0 = NaN here, and its update makes
            // every weight NaN): the step passes without an update, its loss logged as NaN.
            let learns = step_weight > 0.0;
            if !learns {
                tracing::warn!(
                    "step {}: its batches have no label tokens to learn from (every response \
                     masked, or cut off by tokenizer.max_seq_len); skipped without an update. \
                     Raise tokenizer.max_seq_len, set train_on_input, or check the data",
                    state.global_step + 1
                );
            }
            // One device logs the objective's numbers of the window's last micro-batch (as
            // torchtune's single-device recipes do); several ranks log their mean over the
            // window's micro-batches on all ranks (as its distributed recipes do).
            let mut step_metrics = std::mem::take(&mut last_metrics);
            if group.world_size() > 1 && !step_metrics.is_empty() {
                metric_sums.push(window_micro_batches as f64);
                group.all_reduce_sum_f64(&mut metric_sums)?;
                let count = metric_sums.pop().unwrap_or(1.0).max(1.0);
                for ((_, value), sum) in step_metrics.iter_mut().zip(&metric_sums) {
                    *value = sum / count;
                }
            }
            metric_sums.clear();
            window_micro_batches = 0;
            let scale = 1.0f32 / step_weight as f32;
            for g in grads.iter_mut().filter(|_| learns) {
                *g = (&*g * scale as f64)?;
            }
            // torchtune's norm of a 0/0 step is NaN too.
            let mut grad_norm = clip_grad_norm.filter(|_| !learns).map(|_| f64::NAN);
            if let (Some(max_norm), true) = (clip_grad_norm, learns) {
                let total = grads
                    .iter()
                    .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>())
                    .sum::<candle_core::Result<f32>>()?
                    .sqrt();
                let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
                for g in grads.iter_mut() {
                    *g = (&*g * coef as f64)?;
                }
                grad_norm = Some(total as f64);
            }
            if learns {
                optimizer.step(&grads, lr_at(state.global_step))?;
            }
            state.global_step += 1;
            state.optimizer_step = optimizer.step;
            state.batches_in_epoch = idx + 1;

            let elapsed = window_start.elapsed().as_secs_f64();
            let loss_to_log = step_loss / step_weight;
            let lr_logged = lr_at(state.global_step);
            // torchtune: all ranks' tokens over the window's time, per rank.
            let tps = step_tokens as f64 / (elapsed.max(1e-9) * group.world_size() as f64);
            if state.global_step.is_multiple_of(log_every.max(1)) {
                let mut metrics: Metrics = vec![
                    ("loss".into(), loss_to_log),
                    ("lr".into(), lr_logged),
                    ("tokens_per_second_per_gpu".into(), tps),
                ];
                if let Some(n) = grad_norm {
                    metrics.push(("grad_norm".into(), n));
                }
                metrics.append(&mut step_metrics);
                if log_peak_memory {
                    if let Some(gib) = peak_rss_gib() {
                        metrics.push(("peak_memory_rss".into(), gib));
                    }
                    // On a GPU, torchtune's peaks since the last log ("active" equals
                    // "allocated" here: candle frees nothing that another stream still uses).
                    if let Some(memory) = crate::device_memory::read(&device) {
                        use crate::device_memory::gib;
                        metrics.push(("peak_memory_active".into(), gib(memory.peak_in_use)));
                        metrics.push(("peak_memory_alloc".into(), gib(memory.peak_in_use)));
                        metrics.push(("peak_memory_reserved".into(), gib(memory.peak_reserved)));
                        crate::device_memory::reset_peaks(&device);
                    }
                }
                if let Some(logger) = logger.as_mut() {
                    logger.log(state.global_step, &metrics)?;
                }
            }
            progress.set_message(format!(
                "loss {loss_to_log:.4} lr {lr_logged:.2e} {tps:.0} tok/s"
            ));
            progress.inc(1);
            summary.steps.push(StepLog {
                step: state.global_step,
                loss: loss_to_log,
                lr: lr_logged,
                tokens: step_tokens,
                tokens_per_second: tps,
            });
            window_weight = 0.0;
            window_tokens = 0;
            window_loss = 0.0;
            // A mid-epoch checkpoint when asked for (the epoch's end saves anyway).
            let epoch_continues = (idx + 1) / grad_accum < steps_per_epoch;
            let every_n_due = save_every_n_steps
                .is_some_and(|every| every > 0 && state.global_step.is_multiple_of(every));
            if epoch_continues && (every_n_due || stop) {
                let name = format!("step_{}", state.global_step);
                summary.last_checkpoint = Some(save(&name, false, &state, &optimizer, group)?);
            }
            if stop && epoch_continues {
                let dir = summary.last_checkpoint.clone().expect("saved just above");
                progress.finish_and_clear();
                if group.is_main() {
                    eprintln!(
                        "Stopped at step {} on request; saved {}. Continue with resume_from_checkpoint=True",
                        state.global_step,
                        dir.display()
                    );
                }
                tune_core::recipe::note_stopped_early();
                return Ok(summary);
            }
            window_start = Instant::now();
        }
        state.epochs_run = epoch + 1;
        state.batches_in_epoch = 0;
        let dir = save(
            &format!("epoch_{epoch}"),
            !save_adapter_weights_only,
            &state,
            &optimizer,
            group,
        )?;
        tracing::info!("saved {}", dir.display());
        summary.last_checkpoint = Some(dir);
        if stopping && epoch + 1 < epochs {
            progress.finish_and_clear();
            if group.is_main() {
                eprintln!(
                    "Stopped after epoch {epoch} on request. Continue with resume_from_checkpoint=True"
                );
            }
            tune_core::recipe::note_stopped_early();
            return Ok(summary);
        }
    }
    progress.finish_and_clear();
    if let Some(mut logger) = logger {
        logger.close()?;
    }
    if let Some(gib) = peak_rss_gib() {
        tracing::info!("peak RSS {gib:.3} GiB");
    }
    Ok(summary)
}

/// The device this rank trains on: with several ranks, `cuda` means this rank's GPU
/// (`cuda:{local_rank}`), as under torchrun.
fn rank_device(configured: &str, group: &ProcessGroup) -> String {
    if group.world_size() > 1 && (configured == "cuda" || configured.starts_with("cuda:")) {
        format!("cuda:{}", group.local_rank())
    } else {
        configured.to_string()
    }
}
