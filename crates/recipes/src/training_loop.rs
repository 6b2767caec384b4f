//! The loop every LoRA training recipe runs: SFT and DPO, on one device or as one rank of many.
//!
//! [`train_objective`] reads top to bottom like torchtune's recipe: settings, model, checkpointer,
//! seed, device, data, weights, optimizer and schedule, loggers, resume. Then [`Trainer::run`] is
//! the loop: for each epoch and each window of `gradient_accumulation_steps` micro-batches:
//! forward, token-weighted loss, backward; at the window's end: sum over ranks, scale the
//! gradients by 1/tokens, optionally clip, AdamW step at the scheduled lr, log; save at each
//! epoch's end.
//!
//! The distributed recipes run this same loop in every rank of a [`ProcessGroup`]: each rank
//! takes its share of every batch, and the sums above run across the ranks before the (identical)
//! optimizer step. With one rank every collective is the identity, so both are one loop.
//!
//! What a micro-batch's loss is comes from an [`Objective`]: next-token cross-entropy in
//! `lora_finetune_*`, preference optimisation in `lora_dpo_*`. Everything else — the model,
//! optimizer, schedule, gradient accumulation, clipping, logging, checkpoints, resume, Ctrl-C —
//! is this loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use tune_core::recipe::RunOptions;
use tune_core::{ComponentKind, Config};
use tune_data::BatchSampler;
use tune_models::builders::model_spec_from_node;
use tune_models::{ModelSpec, TransformerDecoder};

use crate::checkpointer::{
    data_order, newest_checkpoint, progress, HfCheckpointer, RecipeState, SourceLayout,
};
use crate::distributed::ProcessGroup;
use crate::lr_schedule::{CosineArgs, CosineWithWarmup};
use crate::memory::peak_rss_gib;
use crate::metric_logging::{LoggerSpec, MetricLogger, Metrics};
use crate::optim::{AdamW, AdamWConfig};
use crate::settings::{parse_device, parse_dtype, random_seed, seed_setting, TopLevel};

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
    /// Whether a step divides its weighted sums by gradient_accumulation_steps x ranks, as
    /// torchtune's DPO recipes do (each micro-batch's loss over gradient_accumulation_steps),
    /// rather than by the weights the window holds. The two differ only for a step that takes
    /// micro-batches left over from the previous epoch.
    fn divides_by_accumulation_steps(&self) -> bool {
        false
    }
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

/// The loop for `build_objective`, run as one rank of the group the environment describes
/// (`tune run`'s launcher sets it), or as a group of one: what the distributed recipes run.
pub fn run_distributed(
    config: Config,
    options: &RunOptions,
    build_objective: BuildObjective,
) -> Result<RunSummary> {
    let mut group = if options.dry_run {
        ProcessGroup::single()
    } else {
        ProcessGroup::from_env()?
    };
    // torchtune's FSDP option (`fsdp_cpu_offload`; its 70B config spells it `fsdp.cpu_offload`,
    // which its recipe does not read): every rank here holds the whole model.
    for key in ["fsdp_cpu_offload", "fsdp.cpu_offload"] {
        if group.is_main() && config.get(key).and_then(|v| v.as_bool()) == Some(true) {
            tracing::warn!(
                "{key}=True has no effect: tune-rs does not shard or offload the frozen base \
                 model; each rank keeps it on its device"
            );
        }
    }
    if group.world_size() > 1 {
        tracing::info!(
            "rank {} of {} (local rank {})",
            group.rank(),
            group.world_size(),
            group.local_rank()
        );
    }
    train_objective(config, options, &mut group, build_objective)
}

/// The loop for any objective, run by every rank of `group`.
pub fn train_objective(
    config: Config,
    options: &RunOptions,
    group: &mut ProcessGroup,
    build_objective: BuildObjective,
) -> Result<RunSummary> {
    let cfg = TopLevel(&config);

    // ---- Settings, model, checkpointer: all checked before anything is written -----------
    refuse_empty_output_dir(&config)?;
    let mut settings = LoopSettings::read(&cfg)?;
    let spec = lora_model_spec(&cfg)?;
    let checkpointer: HfCheckpointer = cfg.build("checkpointer", ComponentKind::Checkpointer)?;
    let resume = cfg.get("resume_from_checkpoint", false)? || checkpointer.resume_from_checkpoint;
    let seed_asked = seed_setting(&cfg, group.world_size())?;
    if options.dry_run {
        println!("{}", config.to_yaml_string());
        println!("{}", spec.counts()?.summary());
        return Ok(RunSummary::empty(&checkpointer));
    }
    prepare_output_dir(&checkpointer, group)?;

    // ---- Resume point: before the seed, which a resumed run takes from its checkpoint ------
    let resume_from = resume.then(|| resume_point(&checkpointer)).transpose()?;
    let seed = run_seed(resume_from.as_ref(), seed_asked, &mut settings, group)?;

    // ---- Device: only now does it matter ----------------------------------------------------
    let (device, dtype) = open_device(&cfg, &spec, group)?;
    let started = Instant::now();
    check_torch_only_options(&cfg, &device)?;

    // ---- Data (before the weights: a bad tokenizer or dataset fails fast), then the model ----
    let objective = build_objective(&cfg, &spec, &settings.data_settings(group))?;
    // Every rank must train the same thing: a rank given another config, seed or data would
    // train apart without a word (only rank 0 saves).
    group.check_all_agree(
        &(config.to_yaml_string(), seed, objective.num_examples()),
        "config, seed or dataset",
    )?;
    let steps_per_epoch = settings.steps_per_epoch(objective.as_ref(), group.world_size())?;
    let fresh = RecipeState {
        epochs_run: 0,
        global_step: 0,
        batches_in_epoch: 0,
        seed,
        total_epochs: settings.epochs,
        max_steps_per_epoch: settings.max_steps_per_epoch,
        gradient_accumulation_steps: settings.gradient_accumulation_steps,
        optimizer_step: 0,
        world_size: group.world_size(),
        batch_size: Some(settings.batch_size),
        steps_per_epoch: Some(steps_per_epoch),
        data_order: Some(data_order(settings.shuffle).to_string()),
        quantize_base: Some(spec.lora.as_ref().is_some_and(|l| l.quantize_base)),
    };
    // Before the weights load and anything is written: a run that cannot continue from its
    // checkpoint stops here.
    if let Some((dir, saved)) = &resume_from {
        check_resumable(dir, saved, &fresh, settings.shuffle)?;
        if saved.total_epochs != fresh.total_epochs && group.is_main() {
            // As torchtune: the run goes on to this config's epochs.
            tracing::warn!(
                "epochs differs from {}'s ({}); training to epoch {}",
                dir.display(),
                saved.total_epochs,
                fresh.total_epochs
            );
        }
        if let (Some(then), Some(now)) = (saved.quantize_base, fresh.quantize_base) {
            if then != now && group.is_main() {
                let base = |nf4: bool| {
                    if nf4 {
                        "an NF4 (QLoRA)"
                    } else {
                        "a full-precision"
                    }
                };
                tracing::warn!(
                    "{}'s adapter was trained on {} base, and this run uses {} base \
                     (model.quantize_base={now}): the adapter goes on against other weights, so \
                     the loss will not continue where it stopped",
                    dir.display(),
                    base(then),
                    base(now)
                );
            }
        }
    }
    // Dropout draws from the device's generator: seeded per rank, as torchtune seeds each rank
    // with seed + rank (candle cannot seed its CPU generator; there it stays unseeded).
    let _ = device.set_seed(seed.wrapping_add(group.rank() as u64));
    let (mut model, spec, layout) = checkpointer.load_base(&spec, dtype, &device, seed)?;
    tracing::info!("{}", spec.counts()?.summary());
    log_memory_after_model_init(&device);

    // ---- Optimizer, schedule, loggers ---------------------------------------------------------
    let opt_config: AdamWConfig = cfg.build("optimizer", ComponentKind::Optimizer)?;
    let lr = LearningRate::build(&cfg, opt_config.lr, settings.epochs * steps_per_epoch)?;
    model.activation_checkpointing = activation_checkpointing(&cfg, &spec)?;
    // Only rank 0 logs and writes; the other ranks build the logger spec for its checks.
    let logger_spec = match cfg.node("metric_logger") {
        Ok(_) => cfg.build::<LoggerSpec>("metric_logger", ComponentKind::MetricLogger)?,
        Err(_) => LoggerSpec::Stdout,
    };
    let logger = group.is_main().then(|| logger_spec.open()).transpose()?;
    if group.is_main() {
        write_run_config(&config, &checkpointer, resume)?;
    }
    let params = model.adapter_params();
    let mut optimizer = AdamW::new(opt_config, params.clone())?;

    // ---- Resume or warm start ------------------------------------------------------------------
    // At an epoch's end, the micro-batches that epoch left for the next step are computed
    // again, when this run cuts that epoch into the same batches.
    let at_epoch_end = resume_from
        .as_ref()
        .filter(|(_, saved)| saved.batches_in_epoch == 0 && saved.epochs_run > 0);
    let replay_leftovers = at_epoch_end.is_some_and(|(_, saved)| {
        same_batches(saved, &fresh)
            && saved.data_order.is_some()
            && saved.data_order == fresh.data_order
    });
    if let Some((dir, saved)) = at_epoch_end {
        if !replay_leftovers && settings.gradient_accumulation_steps > 1 && group.is_main() {
            tracing::info!(
                "{} cut its epochs into other batches than this run does: micro-batches its \
                 epoch {} may have left for the next step are not carried over",
                dir.display(),
                saved.epochs_run - 1
            );
        }
    }
    let state = match resume_from {
        Some((dir, saved)) => restore(&dir, saved, fresh, &model, &mut optimizer, &device)?,
        None => {
            warm_start(&checkpointer, &spec, &model)?;
            fresh
        }
    };
    tracing::info!("ready to train in {:.2}s", started.elapsed().as_secs_f64());

    // ---- Train -----------------------------------------------------------------------------------
    Trainer {
        progress: progress_bar(settings.epochs * steps_per_epoch, state.global_step, group),
        summary: RunSummary::empty(&checkpointer),
        settings,
        steps_per_epoch,
        replay_leftovers,
        objective: objective.as_ref(),
        model,
        spec,
        layout,
        params,
        optimizer,
        lr,
        checkpointer: &checkpointer,
        logger,
        device,
        group,
    }
    .run(state)
}

/// The loop's own top-level keys (torchtune's names and defaults).
struct LoopSettings {
    epochs: usize,
    max_steps_per_epoch: Option<usize>,
    gradient_accumulation_steps: usize,
    clip_grad_norm: Option<f64>,
    batch_size: usize,
    shuffle: bool,
    save_adapter_weights_only: bool,
    log_every_n_steps: usize,
    log_peak_memory_stats: bool,
    save_every_n_steps: Option<usize>,
}

impl LoopSettings {
    fn read(cfg: &TopLevel) -> Result<Self> {
        let epochs: usize = cfg.get("epochs", 1)?;
        if epochs == 0 {
            bail!("epochs=0 would train nothing; set it to at least 1");
        }
        let max_steps_per_epoch: Option<usize> = cfg.opt("max_steps_per_epoch")?;
        if max_steps_per_epoch == Some(0) {
            bail!("max_steps_per_epoch=0 would train nothing; set it to at least 1, or null for whole epochs");
        }
        let gradient_accumulation_steps: usize = cfg.get("gradient_accumulation_steps", 1)?;
        let clip_grad_norm: Option<f64> = cfg.opt("clip_grad_norm")?;
        if let Some(max_norm) = clip_grad_norm.filter(|n| n.is_nan() || *n <= 0.0) {
            // A negative bound flips the gradients (training ascends); 0 stops every update.
            bail!("clip_grad_norm={max_norm}: it must be above 0, or null for no clipping");
        }
        let batch_size: usize = cfg.require("batch_size")?;
        let shuffle: bool = cfg.get("shuffle", true)?;
        let save_adapter_weights_only: bool = cfg.get("save_adapter_weights_only", false)?;
        let log_every_n_steps: usize = cfg.get("log_every_n_steps", 1)?;
        if log_every_n_steps == 0 {
            bail!("log_every_n_steps=0 would never log; set it to at least 1");
        }
        let log_peak_memory_stats: bool = cfg.get("log_peak_memory_stats", false)?;
        let save_every_n_steps: Option<usize> = cfg.opt("save_every_n_steps")?;
        if save_every_n_steps == Some(0) {
            bail!("save_every_n_steps=0 would never save; set it to at least 1, or null to save at epoch ends only");
        }
        if gradient_accumulation_steps == 0 || batch_size == 0 {
            bail!("batch_size and gradient_accumulation_steps must be at least 1");
        }
        Ok(LoopSettings {
            epochs,
            max_steps_per_epoch,
            gradient_accumulation_steps,
            clip_grad_norm,
            batch_size,
            shuffle,
            save_adapter_weights_only,
            log_every_n_steps,
            log_peak_memory_stats,
            save_every_n_steps,
        })
    }

    fn data_settings(&self, group: &ProcessGroup) -> DataSettings {
        DataSettings {
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            replicas: (group.world_size(), group.rank()),
        }
    }

    /// Optimizer steps per epoch: whole windows of micro-batches, at most `max_steps_per_epoch`.
    fn steps_per_epoch(&self, objective: &dyn Objective, world_size: usize) -> Result<usize> {
        let windows = objective.sampler().num_batches() / self.gradient_accumulation_steps;
        let steps = self.max_steps_per_epoch.map_or(windows, |m| windows.min(m));
        if steps == 0 {
            bail!(
                "one optimizer step needs batch_size * gradient_accumulation_steps * ranks = {} samples, \
                 but the dataset has {} (packs when packed=True; after drop_last); lower batch_size or gradient_accumulation_steps",
                self.batch_size * self.gradient_accumulation_steps * world_size,
                objective.num_examples()
            );
        }
        Ok(steps)
    }
}

/// An empty one would put checkpoints in the working folder and `${output_dir}/logs` at /logs.
fn refuse_empty_output_dir(config: &Config) -> Result<()> {
    for key in ["output_dir", "checkpointer.output_dir"] {
        if config
            .get(key)
            .and_then(|v| v.as_str())
            .is_some_and(|d| d.trim().is_empty())
        {
            bail!("{key} is empty; set output_dir=<folder> for the checkpoints and logs");
        }
    }
    Ok(())
}

/// The `model` node: a LoRA model this loop can train.
fn lora_model_spec(cfg: &TopLevel) -> Result<ModelSpec> {
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
    Ok(spec)
}

/// Checks `output_dir`, and puts back what a killed run left half-written (a checkpoint it had
/// moved aside comes back) before any rank looks at the checkpoints.
fn prepare_output_dir(checkpointer: &HfCheckpointer, group: &mut ProcessGroup) -> Result<()> {
    checkpointer.check_output_dir()?;
    if group.is_main() {
        checkpointer.check_model_files_readable()?;
    }
    crate::checkpointer::refuse_files_named_like_checkpoints(&checkpointer.output_dir)?;
    if group.is_main() {
        for done in crate::atomic::remove_stale(&checkpointer.output_dir) {
            tracing::info!("{done}");
        }
    }
    group.barrier()
}

/// The checkpoint to resume from and its saved state.
fn resume_point(checkpointer: &HfCheckpointer) -> Result<(PathBuf, RecipeState)> {
    let (dir, saved) = checkpointer.resume_point()?;
    if let Some(adapter) = &checkpointer.adapter_checkpoint {
        tracing::warn!(
            "checkpointer.adapter_checkpoint ({}) is not used when resuming: the adapter comes \
             from {}",
            adapter.display(),
            dir.display()
        );
    }
    Ok((dir, saved))
}

/// The run's seed: the checkpoint's when resuming, else the config's, else one rank 0 draws.
fn run_seed(
    resume_from: Option<&(PathBuf, RecipeState)>,
    seed_asked: Option<u64>,
    settings: &mut LoopSettings,
    group: &mut ProcessGroup,
) -> Result<u64> {
    Ok(match (resume_from, seed_asked) {
        // As torchtune: the checkpoint's seed and max_steps_per_epoch win (the adapters' dropout
        // and the epoch length must be the ones the run started with), with a warning.
        (Some((dir, saved)), asked) => {
            // Every rank decides alike; rank 0 speaks for them.
            let speaks = group.is_main();
            if speaks && asked.is_some_and(|s| s != saved.seed) {
                tracing::warn!(
                    "seed differs from {}'s; using the checkpoint's seed {}",
                    dir.display(),
                    saved.seed
                );
            }
            if settings.max_steps_per_epoch != saved.max_steps_per_epoch {
                if speaks {
                    tracing::warn!(
                        "max_steps_per_epoch differs from {}'s; using the checkpoint's {}",
                        dir.display(),
                        saved
                            .max_steps_per_epoch
                            .map_or("null".to_string(), |n| n.to_string())
                    );
                }
                settings.max_steps_per_epoch = saved.max_steps_per_epoch;
            }
            saved.seed
        }
        (None, Some(s)) => s,
        // With `seed: null` rank 0 draws one and every rank uses it (the same adapter init).
        (None, None) => {
            let seed = group.broadcast_u64(random_seed(group.world_size()))?;
            tracing::info!("seed=null: drew seed {seed} (saved with each checkpoint)");
            seed
        }
    })
}

/// This rank's device and the training dtype, once the model is known to fit there (it fails
/// here with the numbers, not as an allocation error mid-load).
fn open_device(cfg: &TopLevel, spec: &ModelSpec, group: &ProcessGroup) -> Result<(Device, DType)> {
    let device_name = rank_device(&cfg.get("device", "cpu".to_string())?, group);
    let device = parse_device(&device_name)?;
    let dtype = parse_dtype(&cfg.get("dtype", "fp32".to_string())?, &device)?;
    crate::memory::check_weights_fit(
        crate::memory::weight_bytes(spec, dtype)?,
        crate::device_memory::free_bytes(&device),
        &device_name,
        dtype,
        group.world_size() > 1,
    )?;
    Ok((device, dtype))
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

/// torchtune's switches for torch machinery tune-rs has no counterpart for: ignored with a
/// word, or refused where torchtune refuses them.
fn check_torch_only_options(cfg: &TopLevel, device: &Device) -> Result<()> {
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
    if let Ok(node) = cfg.node("profiler") {
        if node.get("enabled").and_then(|v| v.as_bool()) == Some(true) {
            tracing::warn!(
                "profiler.enabled=True: the torch profiler has no tune-rs equivalent; ignoring it"
            );
        }
    }
    Ok(())
}

/// As torchtune: the GPU memory the model takes, then peaks that count training only.
fn log_memory_after_model_init(device: &Device) {
    if let Some(memory) = crate::device_memory::read(device) {
        use crate::device_memory::gib;
        tracing::info!(
            "GPU memory after model init: peak allocated {:.2} GiB, peak reserved {:.2} GiB",
            gib(memory.peak_in_use),
            gib(memory.peak_reserved)
        );
        crate::device_memory::reset_peaks(device);
    }
}

/// The learning rate at each step: the optimizer's, times the schedule's multiplier.
struct LearningRate {
    base: f64,
    /// No `lr_scheduler` node means a constant learning rate.
    schedule: Option<CosineWithWarmup>,
}

impl LearningRate {
    fn build(cfg: &TopLevel, base: f64, num_training_steps: usize) -> Result<Self> {
        let schedule = match cfg.node("lr_scheduler") {
            Ok(_) => {
                let args: CosineArgs = cfg.build("lr_scheduler", ComponentKind::LrScheduler)?;
                Some(CosineWithWarmup {
                    num_warmup_steps: args.num_warmup_steps,
                    num_training_steps,
                    num_cycles: args.num_cycles,
                })
            }
            Err(_) => None,
        };
        Ok(LearningRate { base, schedule })
    }

    fn at(&self, step: usize) -> f64 {
        self.base * self.schedule.as_ref().map_or(1.0, |s| s.multiplier(step))
    }
}

/// `enable_activation_checkpointing`, refused with adapter dropout (a recomputed layer would
/// draw another dropout mask than its forward did).
fn activation_checkpointing(cfg: &TopLevel, spec: &ModelSpec) -> Result<bool> {
    let on = cfg.get("enable_activation_checkpointing", false)?;
    if on && spec.lora.as_ref().is_some_and(|l| l.adapter.dropout > 0.0) {
        bail!(
            "enable_activation_checkpointing with lora_dropout > 0 is not supported (the \
             recomputed dropout mask would differ); set model.lora_dropout=0.0 or \
             enable_activation_checkpointing=False"
        );
    }
    Ok(on)
}

/// Creates `output_dir` and writes the config into it as written (its `${...}` references
/// unresolved), as torchtune does.
fn write_run_config(config: &Config, checkpointer: &HfCheckpointer, resume: bool) -> Result<()> {
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
        config.to_yaml_string_as_written().as_bytes(),
    )
}

/// Loads the adapter and optimizer state saved in `dir` (checked with [`check_resumable`]) and
/// returns the state to go on from.
fn restore(
    dir: &Path,
    saved: RecipeState,
    now: RecipeState,
    model: &TransformerDecoder,
    optimizer: &mut AdamW,
    device: &Device,
) -> Result<RecipeState> {
    let state_file = |name: &str| {
        let path = dir.join("recipe_state").join(name);
        candle_core::safetensors::load(&path, device).with_context(|| {
            format!(
                "cannot read {} ({}); resume from another checkpoint \
                 (checkpointer.recipe_checkpoint=<epoch_N or step_N>), or start afresh with \
                 resume_from_checkpoint=False",
                path.display(),
                if path.exists() { "damaged" } else { "missing" }
            )
        })
    };
    model.load_adapter(&state_file("adapter_torchtune.safetensors")?)?;
    optimizer.load_moments(&state_file("optimizer.safetensors")?)?;
    optimizer.step = saved.optimizer_step;
    tracing::info!(
        "resuming from {} (epoch {}, step {})",
        dir.display(),
        saved.epochs_run,
        saved.global_step
    );
    let mut state = RecipeState {
        epochs_run: saved.epochs_run,
        global_step: saved.global_step,
        batches_in_epoch: saved.batches_in_epoch,
        optimizer_step: saved.optimizer_step,
        ..now
    };
    // At an epoch's end the run may go on with other ranks or batch sizes: count the steps
    // taken as this run's epochs (as torchtune does), so the schedule ends with the run.
    if saved.batches_in_epoch == 0 {
        state.global_step = saved.epochs_run * now.steps_per_epoch.unwrap_or(0);
    }
    if state.epochs_run >= state.total_epochs {
        tracing::warn!(
            "{} already finished all {} epoch(s): nothing to train. Raise `epochs` to train \
             further",
            dir.display(),
            state.total_epochs
        );
    }
    Ok(state)
}

/// Whether `saved`'s run cut its epochs into the same batches as `now`: the same ranks, batch
/// size and epoch length (the sample order aside).
fn same_batches(saved: &RecipeState, now: &RecipeState) -> bool {
    let same = |saved: Option<usize>, now: Option<usize>| saved.is_none_or(|s| Some(s) == now);
    saved.world_size == now.world_size
        && same(saved.batch_size, now.batch_size)
        && same(saved.steps_per_epoch, now.steps_per_epoch)
}

/// Whether a run set up as `now` can go on from `saved`: the same accumulation, and mid-epoch
/// the same ranks, batch size, epoch length and sample order (the saved position counts
/// batches of those).
fn check_resumable(
    dir: &Path,
    saved: &RecipeState,
    now: &RecipeState,
    shuffle: bool,
) -> Result<()> {
    if saved.gradient_accumulation_steps != now.gradient_accumulation_steps {
        bail!(
            "{} was written with gradient_accumulation_steps {}; resume with the same value",
            dir.display(),
            saved.gradient_accumulation_steps
        );
    }
    if saved.batches_in_epoch == 0 {
        return Ok(());
    }
    if !same_batches(saved, now) {
        let shown = |n: Option<usize>| n.map_or("?".to_string(), |n| n.to_string());
        bail!(
            "{} stopped mid-epoch in a run of {} rank(s) with batch_size {} and {} steps per \
             epoch; resume it with the same (this run: {} rank(s), batch_size {}, {} steps per \
             epoch)",
            dir.display(),
            saved.world_size,
            shown(saved.batch_size),
            shown(saved.steps_per_epoch),
            now.world_size,
            shown(now.batch_size),
            shown(now.steps_per_epoch),
        );
    }
    // File order never changed; a shuffled order saved before tune-rs recorded it was not
    // torch's.
    let same_order = match saved.data_order.as_deref() {
        Some(saved_order) => Some(saved_order) == now.data_order.as_deref(),
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
    Ok(())
}

/// A fresh run's adapters: `checkpointer.adapter_checkpoint`'s, else each adapter's own
/// initialisation from the loaded weights.
fn warm_start(
    checkpointer: &HfCheckpointer,
    spec: &ModelSpec,
    model: &TransformerDecoder,
) -> Result<()> {
    if let Some(path) = &checkpointer.adapter_checkpoint {
        let adapter = HfCheckpointer::read_adapter(path, spec)?;
        model
            .load_adapter(&adapter)
            .with_context(|| format!("loading adapter_checkpoint {}", path.display()))?;
    } else {
        for (_, layer) in model.linears() {
            layer.on_weights_loaded()?;
        }
    }
    Ok(())
}

fn progress_bar(total_steps: usize, done: usize, group: &ProcessGroup) -> indicatif::ProgressBar {
    let progress = if group.is_main() {
        crate::progress::bar(
            total_steps as u64,
            "{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}",
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_position(done as u64);
    progress
}

impl RunSummary {
    fn empty(checkpointer: &HfCheckpointer) -> Self {
        RunSummary {
            steps: Vec::new(),
            output_dir: checkpointer.output_dir.clone(),
            last_checkpoint: None,
        }
    }
}

/// Everything the loop works with once it is set up.
struct Trainer<'a> {
    settings: LoopSettings,
    steps_per_epoch: usize,
    /// Resumed from an epoch's end whose left-over micro-batches belong to the next step.
    replay_leftovers: bool,
    objective: &'a dyn Objective,
    model: TransformerDecoder,
    spec: ModelSpec,
    layout: SourceLayout,
    params: Vec<(String, Var)>,
    optimizer: AdamW,
    lr: LearningRate,
    checkpointer: &'a HfCheckpointer,
    logger: Option<Box<dyn MetricLogger>>,
    device: Device,
    group: &'a mut ProcessGroup,
    progress: indicatif::ProgressBar,
    summary: RunSummary,
}

/// One window's micro-batches on this rank, summed toward its optimizer step.
struct Window {
    grads: Option<Vec<Tensor>>,
    weight: f64,
    tokens: usize,
    loss: f64,
    /// The objective's extra numbers: the last micro-batch's, and their sums over the window.
    last_metrics: Metrics,
    metric_sums: Vec<f64>,
    micro_batches: usize,
    started: Instant,
}

impl Window {
    fn new() -> Self {
        Window {
            grads: None,
            weight: 0.0,
            tokens: 0,
            loss: 0.0,
            last_metrics: Vec::new(),
            metric_sums: Vec::new(),
            micro_batches: 0,
            started: Instant::now(),
        }
    }
}

/// What one optimizer step did, summed over the ranks.
struct StepOutcome {
    loss: f64,
    tokens: usize,
    grad_norm: Option<f64>,
    metrics: Metrics,
    /// The ranks agreed to stop (Ctrl-C or SIGTERM on any of them).
    stop: bool,
}

impl Trainer<'_> {
    fn run(mut self, mut state: RecipeState) -> Result<RunSummary> {
        let grad_accum = self.settings.gradient_accumulation_steps;
        let _listening = tune_core::recipe::listen_for_stop();
        // Set when the ranks agreed to stop at a step that ended an epoch: stop after its save.
        let mut stopping = false;
        // As torchtune's loop, the accumulation window runs on across an epoch's end: an epoch
        // whose batches are not a multiple of gradient_accumulation_steps (and which
        // max_steps_per_epoch does not cut short) leaves micro-batches for the next epoch's
        // first step.
        let mut window = Window::new();
        if self.replay_leftovers && state.epochs_run < self.settings.epochs {
            // Resumed at an epoch's end: the checkpoint holds the weights those left-over
            // micro-batches were computed with, not their gradients; compute them again.
            let epoch = state.epochs_run - 1;
            let batches = self.objective.sampler().batches_for_epoch(epoch as u64);
            let first_leftover = self.steps_per_epoch * grad_accum;
            for (idx, batch_indices) in batches.iter().enumerate().skip(first_leftover) {
                if self.in_epoch(idx) {
                    self.forward_backward(&mut window, batch_indices, &state, (epoch, idx))?;
                }
            }
        }
        for epoch in state.epochs_run..self.settings.epochs {
            let batches = self.objective.sampler().batches_for_epoch(epoch as u64);
            let first_batch = if epoch == state.epochs_run {
                state.batches_in_epoch
            } else {
                0
            };
            for (idx, batch_indices) in batches.iter().enumerate().skip(first_batch) {
                if !self.in_epoch(idx) {
                    break;
                }
                self.forward_backward(&mut window, batch_indices, &state, (epoch, idx))?;
                if !(idx + 1).is_multiple_of(grad_accum) {
                    continue;
                }
                let outcome = self.optimizer_step(&mut window, &mut state)?;
                state.batches_in_epoch = idx + 1;
                // As torchtune's timer, the window's runs across an epoch's end (and its save).
                self.log_step(&state, &outcome, window.started.elapsed().as_secs_f64())?;
                stopping = outcome.stop;
                // A mid-epoch checkpoint when asked for (the epoch's end saves anyway).
                let epoch_continues = (idx + 1) / grad_accum < self.steps_per_epoch;
                let every_n_due = self
                    .settings
                    .save_every_n_steps
                    .is_some_and(|every| every > 0 && state.global_step.is_multiple_of(every));
                if epoch_continues && (every_n_due || stopping) {
                    let dir = self.save(&format!("step_{}", state.global_step), false, &state)?;
                    if stopping {
                        return Ok(self.stop_early(format!(
                            "Stopped at step {} on request; saved {}. Continue with {}",
                            state.global_step,
                            dir.display(),
                            resume_overrides(&dir, &state)
                        )));
                    }
                }
                window = Window::new();
                if stopping {
                    // The epoch's end saves; its left-over micro-batches are computed on resuming.
                    break;
                }
            }
            state.epochs_run = epoch + 1;
            state.batches_in_epoch = 0;
            self.note_leftovers(&window, epoch);
            let merged = !self.settings.save_adapter_weights_only;
            let dir = self.save(&format!("epoch_{epoch}"), merged, &state)?;
            tracing::info!("saved {}", dir.display());
            if stopping && epoch + 1 < self.settings.epochs {
                return Ok(self.stop_early(format!(
                    "Stopped after epoch {epoch} on request. Continue with {}",
                    resume_overrides(&dir, &state)
                )));
            }
        }
        self.progress.finish_and_clear();
        if let Some(mut logger) = self.logger.take() {
            logger.close()?;
        }
        if let Some(gib) = peak_rss_gib() {
            tracing::info!("peak RSS {gib:.3} GiB");
        }
        Ok(self.summary)
    }

    /// Whether batch `idx` of an epoch is trained: torchtune stops an epoch only at
    /// `max_steps_per_epoch` windows, so batches past the last whole window are trained too
    /// (see `run`).
    fn in_epoch(&self, idx: usize) -> bool {
        let window = idx / self.settings.gradient_accumulation_steps;
        self.settings
            .max_steps_per_epoch
            .is_none_or(|max| window < max)
    }

    /// Says once where an epoch's left-over micro-batches go: into the next epoch's first
    /// step, or, after the last epoch, nowhere (as in torchtune).
    fn note_leftovers(&self, window: &Window, epoch: usize) {
        if window.micro_batches == 0 || !self.group.is_main() {
            return;
        }
        let why = format!(
            "epoch {epoch}'s batches are not a multiple of gradient_accumulation_steps {}",
            self.settings.gradient_accumulation_steps
        );
        if epoch + 1 < self.settings.epochs {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    "{why}: its last {} micro-batch(es) go into the next epoch's first step, as \
                     in torchtune",
                    window.micro_batches
                )
            });
        } else {
            tracing::info!(
                "{why}: its last {} micro-batch(es) made no optimizer step, as in torchtune",
                window.micro_batches
            );
        }
    }

    /// One micro-batch: forward, loss and backward, added to `window`.
    fn forward_backward(
        &self,
        window: &mut Window,
        batch_indices: &[usize],
        state: &RecipeState,
        (epoch, idx): (usize, usize),
    ) -> Result<()> {
        let step = state.global_step + 1;
        let out_of_memory = |what: &str, e: anyhow::Error| {
            crate::memory::explain_out_of_memory(
                e,
                || {
                    format!(
                        "in the {what} of step {step} (batch_size {})",
                        self.settings.batch_size
                    )
                },
                crate::memory::TRAINING_MEMORY_ADVICE,
            )
        };
        let MicroBatch {
            weighted_loss: loss,
            weight,
            tokens,
            metrics,
        } = self
            .objective
            .micro_batch(&self.model, batch_indices, &self.device)
            .map_err(|e| out_of_memory("forward", e))?;
        let loss_value: f32 = loss.to_dtype(DType::F32)?.to_scalar()?;
        if !loss_value.is_finite() && self.optimizer.step == 0 {
            // No update has run yet: the learning rate is not to blame.
            bail!(
                "the loss is {loss_value} at epoch {epoch}, batch {idx}, before any update: \
                 the starting weights give it. Check the checkpoint{} for NaN/inf weights, \
                 or run with dtype=fp32 if bf16 overflows",
                if self.checkpointer.adapter_checkpoint.is_some() {
                    " and checkpointer.adapter_checkpoint"
                } else {
                    ""
                }
            );
        }
        if !loss_value.is_finite() {
            bail!(
                "loss became {loss_value} at epoch {epoch}, batch {idx} (step {step}). Nothing \
                 was saved from this run after {}; lower the learning rate, enable \
                 clip_grad_norm, or check the data",
                self.summary
                    .last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "its start".into())
            );
        }
        // A micro-batch without label tokens (every label masked) adds nothing to learn
        // from: no backward, and its weight of 0 leaves the window's average alone.
        if weight > 0.0 {
            let store = loss
                .backward()
                .map_err(|e| out_of_memory("backward", e.into()))?;
            // The graph (every kept activation) goes with the loss tensor: free it now, not
            // after the all-reduce and the optimizer step.
            drop(loss);
            let grads = self
                .params
                .iter()
                .map(|(name, var)| {
                    tune_core::autograd::param_grad(&store, var)?
                        .with_context(|| format!("no gradient reached {name}"))
                })
                .collect::<Result<Vec<_>>>()?;
            drop(store);
            window.grads = Some(match window.grads.take() {
                None => grads,
                Some(acc) => acc
                    .iter()
                    .zip(&grads)
                    .map(|(a, g)| a.add(g))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            });
        }
        window.weight += weight;
        window.tokens += tokens;
        window.loss += loss_value as f64;
        window.metric_sums.resize(metrics.len(), 0.0);
        for (sum, (_, value)) in window.metric_sums.iter_mut().zip(&metrics) {
            *sum += value;
        }
        window.micro_batches += 1;
        window.last_metrics = metrics;
        Ok(())
    }

    /// The window's end: sum over ranks, scale, clip, and update the adapters.
    fn optimizer_step(
        &mut self,
        window: &mut Window,
        state: &mut RecipeState,
    ) -> Result<StepOutcome> {
        // Across ranks: sum the gradients, token counts and losses; agree on stopping.
        // Zeros when none of this rank's micro-batches had label tokens (the others may).
        let mut grads = match window.grads.take() {
            Some(grads) => grads,
            None => self
                .params
                .iter()
                .map(|(_, var)| var.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        self.group.all_reduce_tensors(&mut grads)?;
        let mut totals = [
            window.weight,
            window.tokens as f64,
            window.loss,
            tune_core::recipe::stop_requested() as u8 as f64,
        ];
        self.group.all_reduce_sum_f64(&mut totals)?;
        let (step_weight, step_tokens, step_loss, stop) =
            (totals[0], totals[1] as usize, totals[2], totals[3] > 0.0);
        if !step_loss.is_finite() {
            bail!(
                "the loss summed over ranks became {step_loss} at step {}; lower the learning \
                 rate, enable clip_grad_norm, or check the data",
                state.global_step + 1
            );
        }
        // One device logs the objective's numbers of the window's last micro-batch (as
        // torchtune's single-device recipes do); several ranks log their mean over the
        // window's micro-batches on all ranks (as its distributed recipes do).
        let nominal = (self.settings.gradient_accumulation_steps * self.group.world_size()) as f64;
        let fixed_divisor = self.objective.divides_by_accumulation_steps();
        let mut metrics = std::mem::take(&mut window.last_metrics);
        if self.group.world_size() > 1 && !metrics.is_empty() {
            let mut sums = std::mem::take(&mut window.metric_sums);
            sums.push(window.micro_batches as f64);
            self.group.all_reduce_sum_f64(&mut sums)?;
            let counted = sums.pop().unwrap_or(1.0).max(1.0);
            let count = if fixed_divisor { nominal } else { counted };
            for ((_, value), sum) in metrics.iter_mut().zip(&sums) {
                *value = sum / count;
            }
        }
        // Nothing to learn from (torchtune's loss is 0/0 = NaN here, and its update makes
        // every weight NaN): the step passes without an update, its loss and norm logged as NaN.
        let divisor = if fixed_divisor { nominal } else { step_weight };
        let grad_norm = if step_weight > 0.0 {
            let scale = 1.0f32 / divisor as f32;
            for g in grads.iter_mut() {
                *g = (&*g * scale as f64)?;
            }
            let norm = self
                .settings
                .clip_grad_norm
                .map(|max_norm| clip_grad_norm(&mut grads, max_norm))
                .transpose()?;
            self.optimizer.step(&grads, self.lr.at(state.global_step))?;
            norm
        } else {
            tracing::warn!(
                "step {}: its batches have no label tokens to learn from (every response \
                 masked, or cut off by tokenizer.max_seq_len); skipped without an update. \
                 Raise tokenizer.max_seq_len, set train_on_input, or check the data",
                state.global_step + 1
            );
            self.settings.clip_grad_norm.map(|_| f64::NAN)
        };
        state.global_step += 1;
        state.optimizer_step = self.optimizer.step;
        Ok(StepOutcome {
            loss: step_loss / divisor,
            tokens: step_tokens,
            grad_norm,
            metrics,
            stop,
        })
    }

    /// Logs the step every `log_every_n_steps` and moves the progress bar.
    fn log_step(&mut self, state: &RecipeState, outcome: &StepOutcome, seconds: f64) -> Result<()> {
        let lr = self.lr.at(state.global_step);
        // torchtune: all ranks' tokens over the window's time, per rank.
        let tps = outcome.tokens as f64 / (seconds.max(1e-9) * self.group.world_size() as f64);
        if state
            .global_step
            .is_multiple_of(self.settings.log_every_n_steps)
        {
            let mut metrics: Metrics = vec![
                ("loss".into(), outcome.loss),
                ("lr".into(), lr),
                ("tokens_per_second_per_gpu".into(), tps),
            ];
            if let Some(norm) = outcome.grad_norm {
                metrics.push(("grad_norm".into(), norm));
            }
            metrics.extend(outcome.metrics.iter().cloned());
            if self.settings.log_peak_memory_stats {
                metrics.extend(peak_memory_metrics(&self.device));
            }
            if let Some(logger) = self.logger.as_mut() {
                logger.log(state.global_step, &metrics)?;
            }
        }
        let progress = format!("loss {:.4} lr {lr:.2e} {tps:.0} tok/s", outcome.loss);
        // Without a terminal (output to a file, nohup) the bar is not drawn: say it in a line.
        if self.progress.is_hidden() && self.group.is_main() {
            let total = self.progress.length().unwrap_or_default();
            tracing::info!("step {}/{total}: {progress}", state.global_step);
        }
        self.progress.set_message(progress);
        self.progress.inc(1);
        self.summary.steps.push(StepLog {
            step: state.global_step,
            loss: outcome.loss,
            lr,
            tokens: outcome.tokens,
            tokens_per_second: tps,
        });
        Ok(())
    }

    /// Rank 0 writes the checkpoint `name`; the others wait for it, so a failed save stops them
    /// too.
    fn save(&mut self, name: &str, merged: bool, state: &RecipeState) -> Result<PathBuf> {
        let dir = if self.group.is_main() {
            self.checkpointer.save(
                name,
                &self.model,
                &self.spec,
                &self.layout,
                merged,
                state,
                &self.optimizer,
            )?
        } else {
            self.checkpointer.output_dir.join(name)
        };
        self.group.barrier()?;
        self.summary.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Ends the run early on request (its checkpoint is saved), saying so on rank 0.
    fn stop_early(self, message: String) -> RunSummary {
        self.progress.finish_and_clear();
        if self.group.is_main() {
            eprintln!("{message}");
        }
        tune_core::recipe::note_stopped_early();
        self.summary
    }
}

/// The overrides that continue from the checkpoint just saved in `dir` (at `saved`): a plain
/// resume picks the furthest-along checkpoint of output_dir, which may be an earlier run's, so
/// then it is named.
fn resume_overrides(dir: &Path, saved: &RecipeState) -> String {
    let plain = "resume_from_checkpoint=True".to_string();
    let (Some(output_dir), Some(name)) = (dir.parent(), dir.file_name()) else {
        return plain;
    };
    match newest_checkpoint(output_dir) {
        Ok(Some((newest, state))) if progress(&state) > progress(saved) => format!(
            "{plain} checkpointer.recipe_checkpoint={} ({} is further along, so a resume that \
             names no checkpoint would continue from it)",
            name.to_string_lossy(),
            newest.display()
        ),
        _ => plain,
    }
}

/// Scales `grads` so that their joint L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`); returns the norm before clipping.
fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let total = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>())
        .sum::<candle_core::Result<f32>>()?
        .sqrt();
    let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
    for g in grads.iter_mut() {
        *g = (&*g * coef as f64)?;
    }
    Ok(total as f64)
}

/// Peak memory: the process's largest RSS so far (torchtune logs nothing on the CPU), and on a
/// GPU torchtune's three pool peaks since the last log ("active" equals "allocated" here:
/// candle frees nothing that another stream still uses), which are then reset.
fn peak_memory_metrics(device: &Device) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(gib) = peak_rss_gib() {
        // The kernel's high-water mark lags the page counters a little and can read lower
        // than at an earlier log: a peak never goes down.
        static HIGHEST: std::sync::Mutex<f64> = std::sync::Mutex::new(0.0);
        let mut highest = HIGHEST.lock().unwrap_or_else(|e| e.into_inner());
        *highest = highest.max(gib);
        metrics.push(("peak_memory_rss".into(), *highest));
    }
    if let Some(memory) = crate::device_memory::read(device) {
        use crate::device_memory::gib;
        metrics.push(("peak_memory_active".into(), gib(memory.peak_in_use)));
        metrics.push(("peak_memory_alloc".into(), gib(memory.peak_in_use)));
        metrics.push(("peak_memory_reserved".into(), gib(memory.peak_reserved)));
        crate::device_memory::reset_peaks(device);
    }
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_checkpoint(dir: &Path, epochs_run: usize, global_step: usize) -> RecipeState {
        let state = RecipeState {
            epochs_run,
            global_step,
            batches_in_epoch: 0,
            seed: 0,
            total_epochs: 2,
            max_steps_per_epoch: None,
            gradient_accumulation_steps: 1,
            optimizer_step: global_step as u64,
            world_size: 1,
            batch_size: Some(4),
            steps_per_epoch: Some(30),
            data_order: Some(data_order(true).to_string()),
            quantize_base: Some(false),
        };
        std::fs::create_dir_all(dir.join("recipe_state")).unwrap();
        std::fs::write(
            dir.join("recipe_state/recipe_state.json"),
            serde_json::to_string(&state).unwrap(),
        )
        .unwrap();
        state
    }

    /// After a stop, the hint resumes the checkpoint just saved, even when an earlier run left
    /// one further along in the same output_dir (which a plain resume would pick).
    #[test]
    fn the_resume_hint_names_the_checkpoint_when_another_is_further_along() {
        let out = tempfile::tempdir().unwrap();
        let step = out.path().join("step_19");
        let saved = write_checkpoint(&step, 0, 19);
        assert_eq!(
            resume_overrides(&step, &saved),
            "resume_from_checkpoint=True"
        );

        // As far along (another name for the same point): no need to name it.
        write_checkpoint(&out.path().join("step_19_copy"), 0, 19);
        assert_eq!(
            resume_overrides(&step, &saved),
            "resume_from_checkpoint=True"
        );
        write_checkpoint(&out.path().join("epoch_0"), 1, 30);
        let hint = resume_overrides(&step, &saved);
        assert!(
            hint.starts_with("resume_from_checkpoint=True checkpointer.recipe_checkpoint=step_19 ")
                && hint.contains("epoch_0 is further along"),
            "{hint}"
        );
    }
}
