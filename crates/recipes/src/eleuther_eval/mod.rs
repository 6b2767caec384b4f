//! `eleuther_eval`: torchtune 0.6.1's evaluation recipe, with TruthfulQA's multiple-choice tasks
//! computed as EleutherAI's lm-evaluation-harness computes them, without lm-eval or a network.
//!
//! For each question, the context is the 6-shot QA primer + `"\n\nQ: " + question + "\nA:"` and
//! every answer is scored as the continuation `" " + answer`: the sum of the log-probabilities of
//! its tokens (tokenized as lm-eval does: `[BOS] + encode(context + continuation)` minus the
//! context's tokens; inputs longer than `max_seq_length + 1` lose tokens from the left).
//! - `truthfulqa_mc1`: accuracy = 1 when the first (the only true) answer scores highest.
//! - `truthfulqa_mc2`: the normalised probability of the true answers, chosen by label.
//!
//! Scoring is batched with right padding (the model's causal mask makes padding harmless). With
//! `enable_kv_cache` (the default), the prefix every context shares (the primer) is run once, each
//! question once, and only the answers per choice, against the cached keys/values: the same
//! numbers, about ten times less work. Without it every input is run whole, as lm-eval does.
//!
//! Config keys (torchtune's): `model`, `checkpointer`, `tokenizer`, `tasks`, `limit`,
//! `max_seq_length`, `batch_size`, `enable_kv_cache`, `seed`, `device`, `dtype`, `output_dir`;
//! tune-rs adds `adapter_dir` (see [`crate::inference::load_for_inference`]), `truthfulqa_path`
//! (null: the bundled `assets/data/truthfulqa/mc_task_v1_2021.json`), `log_samples` and
//! `add_bos` (default True, as lm-eval's HF model; False tokenizes as torchtune 0.6.1's eval
//! wrapper does, without BOS).
//! Prints a results table and writes `output_dir/eval_results.json` (lm-eval's key names).

mod report;
mod requests;
mod scorer;
mod truthfulqa;

pub use requests::{encode_pair, mean_and_stderr, Encoded};
pub use scorer::{Score, Scorer};
pub use truthfulqa::{
    check_mc1_answer_first, context, continuation, load_truthfulqa, mc1, mc2, Question, Targets,
    Task, QA_PRIMER,
};

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::{ComponentKind, Config};
use tune_data::Llama2Tokenizer;

use requests::RequestPlan;
use truthfulqa::BUNDLED_TRUTHFULQA_NAME;

use crate::data::check_vocab;
use crate::inference::{check_adapter_source, load_for_inference, reject_quantizer};
use crate::settings::{parse_device, parse_dtype, seed_setting, TopLevel};

pub struct EleutherEval;

tune_core::inventory::submit! { RecipeEntry(&EleutherEval) }

impl Recipe for EleutherEval {
    fn name(&self) -> &'static str {
        "eleuther_eval"
    }

    fn configs(&self) -> &'static [&'static str] {
        &["llama2/7B_eval", "stories260K/eval"]
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        &[
            "output_dir",
            "model",
            "tokenizer",
            "checkpointer",
            "tasks",
            "limit",
            "max_seq_length",
            "batch_size",
            "enable_kv_cache",
            "seed",
            "device",
            "dtype",
            "quantizer",
            "adapter_dir",
            "truthfulqa_path",
            "log_samples",
            "add_bos",
            "log_level",
            "plugins",
        ]
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        // torchtune's eval configs carry `resume_from_checkpoint: False`, which its recipe does
        // not read either.
        &["resume_from_checkpoint", "cudnn_deterministic_mode"]
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        if options.is_distributed() {
            bail!("eleuther_eval runs on one device; drop --nnodes/--nproc_per_node");
        }
        if let Some(report) = evaluate(config, options)? {
            println!("{}", report.table());
            if let Some(path) = &report.results_file {
                tracing::info!("wrote {}", path.display());
            }
        }
        Ok(())
    }
}

// ---- Settings ---------------------------------------------------------------------------------

/// lm-eval's `limit`: a number of questions per task, or a fraction of them when below 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Count(usize),
    Fraction(f64),
}

impl Limit {
    fn parse(value: Option<f64>) -> Result<Option<Limit>> {
        match value {
            None => Ok(None),
            Some(x) if x > 0.0 && x < 1.0 => Ok(Some(Limit::Fraction(x))),
            Some(x) if x >= 1.0 && x.fract() == 0.0 => Ok(Some(Limit::Count(x as usize))),
            Some(x) => {
                bail!("limit must be a whole number of questions or a fraction in (0, 1), got {x}")
            }
        }
    }

    fn apply(self, total: usize) -> usize {
        match self {
            Limit::Count(n) => n.min(total),
            Limit::Fraction(f) => ((total as f64 * f).ceil() as usize).min(total),
        }
    }
}

struct Settings {
    tasks: Vec<Task>,
    limit: Option<Limit>,
    max_seq_length: usize,
    batch_size: usize,
    reuse_context: bool,
    /// Whether each input starts with BOS: lm-eval's HF model adds it; torchtune 0.6.1's
    /// wrapper does not (its comment: about +1% on truthfulqa_mc2 after a LoRA finetune).
    add_bos: bool,
    log_samples: bool,
    truthfulqa_path: Option<PathBuf>,
    output_dir: Option<PathBuf>,
}

impl Settings {
    /// The settings as the `config` section of the results file, added to `run`.
    fn describe(&self, mut run: serde_json::Value, max_length: usize) -> serde_json::Value {
        let data_file = match &self.truthfulqa_path {
            Some(p) => p.display().to_string(),
            None => BUNDLED_TRUTHFULQA_NAME.to_string(),
        };
        let limit = self.limit.map(|l| match l {
            Limit::Count(n) => json!(n),
            Limit::Fraction(f) => json!(f),
        });
        run["tasks"] = json!(self.tasks.iter().map(|t| t.name()).collect::<Vec<_>>());
        run["data_file"] = json!(data_file);
        run["limit"] = json!(limit);
        run["max_length"] = json!(max_length);
        run["batch_size"] = json!(self.batch_size);
        run["enable_kv_cache"] = json!(self.reuse_context);
        run["add_bos"] = json!(self.add_bos);
        run
    }
}

fn read_settings(cfg: &TopLevel) -> Result<Settings> {
    let tasks: Vec<String> = match cfg.0.get("tasks") {
        Some(serde_yaml::Value::String(s)) => vec![s.clone()],
        _ => cfg
            .require("tasks")
            .context("set tasks, e.g. tasks=[truthfulqa_mc2]")?,
    };
    if tasks.is_empty() {
        bail!("tasks is empty; name at least one, e.g. tasks=[truthfulqa_mc2]");
    }
    let mut parsed = Vec::new();
    for name in &tasks {
        let task = Task::parse(name)?;
        if !parsed.contains(&task) {
            parsed.push(task);
        }
    }
    let batch_size: usize = cfg.get("batch_size", 8)?;
    if batch_size == 0 {
        bail!("batch_size must be at least 1");
    }
    let max_seq_length: usize = cfg.get("max_seq_length", 4096)?;
    if max_seq_length == 0 {
        bail!("max_seq_length must be at least 1 (tokens per scored input; lm-eval's default is 4096)");
    }
    let output_dir = match cfg.opt::<String>("output_dir")? {
        Some(dir) => Some(PathBuf::from(dir)),
        None => cfg
            .0
            .get("checkpointer.output_dir")
            .and_then(|v| v.as_str())
            .map(PathBuf::from),
    };
    Ok(Settings {
        tasks: parsed,
        limit: Limit::parse(cfg.opt("limit")?)?,
        max_seq_length,
        batch_size,
        reuse_context: cfg.get("enable_kv_cache", true)?,
        add_bos: cfg.get("add_bos", true)?,
        log_samples: cfg.get("log_samples", false)?,
        truthfulqa_path: cfg.opt::<String>("truthfulqa_path")?.map(PathBuf::from),
        output_dir,
    })
}

// ---- The recipe -------------------------------------------------------------------------------

/// Everything an evaluation produced.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub tasks: Vec<TaskResult>,
    /// Distinct (context, continuation) pairs scored (tasks share answers).
    pub requests: usize,
    pub tokens_scored: usize,
    pub seconds: f64,
    pub max_length: usize,
    pub results_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct TaskResult {
    pub task: Task,
    /// Mean of the per-question scores (lm-eval's `acc`).
    pub acc: f64,
    /// Standard error of the mean (`None` for one question).
    pub stderr: Option<f64>,
    pub questions: Vec<QuestionResult>,
    /// Questions in the data file, before `limit`.
    pub available: usize,
}

#[derive(Debug, Clone)]
pub struct QuestionResult {
    /// Position in the data file.
    pub index: usize,
    pub acc: f64,
    pub choices: Vec<ChoiceResult>,
}

#[derive(Debug, Clone)]
pub struct ChoiceResult {
    pub answer: String,
    pub label: u8,
    pub ll: f64,
    pub is_greedy: bool,
    pub continuation_ids: Vec<u32>,
}

/// Runs the recipe; `None` for a dry run.
pub fn evaluate(config: Config, options: &RunOptions) -> Result<Option<EvalReport>> {
    let cfg = TopLevel(&config);
    // Scoring draws nothing; the seed only initialises adapter weights that a checkpoint replaces.
    let seed = seed_setting(&cfg, 1)?.unwrap_or(1234);
    let settings = read_settings(&cfg)?;
    reject_quantizer(&cfg)?;

    // ---- Data and tokenizer (before the weights: bad input fails fast) ------------------------
    let questions = load_truthfulqa(settings.truthfulqa_path.as_deref())?;
    if settings.tasks.contains(&Task::TruthfulQaMc1) {
        let name = settings
            .truthfulqa_path
            .as_ref()
            .map_or(BUNDLED_TRUTHFULQA_NAME.to_string(), |p| {
                p.display().to_string()
            });
        check_mc1_answer_first(&questions, &name)?;
    }
    let n_questions = settings
        .limit
        .map_or(questions.len(), |l| l.apply(questions.len()));
    let tokenizer: Llama2Tokenizer = cfg.build("tokenizer", ComponentKind::Tokenizer)?;
    let plan = RequestPlan::new(&settings.tasks, &questions[..n_questions]);
    if options.dry_run {
        check_adapter_source(&cfg)?;
        println!("{}", config.to_yaml_string());
        let names: Vec<&str> = settings.tasks.iter().map(|t| t.name()).collect();
        println!(
            "tasks {names:?}: {n_questions} questions, {} distinct answers to score",
            plan.requests.len()
        );
        return Ok(None);
    }

    // The results must have somewhere to go before the scoring is spent.
    if let Some(dir) = &settings.output_dir {
        check_results_writable(dir)?;
    }

    // ---- Model (past the dry run: only now does the device matter) --------------------------
    let device = parse_device(&cfg.get("device", "cpu".to_string())?)?;
    let dtype = parse_dtype(&cfg.get("dtype", "fp32".to_string())?, &device)?;
    let loaded = load_for_inference(&cfg, dtype, &device, seed)?;
    check_vocab(&tokenizer, loaded.spec.transformer.vocab_size)?;
    let max_length = settings
        .max_seq_length
        .min(loaded.spec.transformer.max_seq_len);
    if max_length < settings.max_seq_length {
        tracing::info!(
            "max_seq_length {} is above the model's max_seq_len; using {max_length}",
            settings.max_seq_length
        );
    }

    // ---- Score -------------------------------------------------------------------------------
    let started = Instant::now();
    let encoded: Vec<Encoded> = plan
        .requests
        .iter()
        .map(|(ctx, cont)| encode_pair(&tokenizer, ctx, cont, settings.add_bos))
        .collect();
    let progress = progress_bar(encoded.len());
    let scorer = Scorer {
        model: &loaded.model,
        max_length,
        batch_size: settings.batch_size,
        progress: &progress,
    };
    let scores = scorer
        .score(&encoded, settings.reuse_context)
        .map_err(|e| {
            crate::memory::explain_out_of_memory(
                e,
                || format!("while scoring (batch_size {})", settings.batch_size),
                "Lower batch_size or max_seq_length",
            )
        })?;
    progress.finish_and_clear();

    // ---- Report ------------------------------------------------------------------------------
    let mut report = EvalReport {
        tasks: plan.results(&questions, &encoded, &scores),
        requests: encoded.len(),
        tokens_scored: encoded.iter().map(|e| e.continuation.len()).sum(),
        seconds: started.elapsed().as_secs_f64(),
        max_length,
        results_file: None,
    };
    if let Some(dir) = &settings.output_dir {
        let run = json!({
            "model": loaded.spec.builder,
            "checkpoint_dir": cfg.0.get("checkpointer.checkpoint_dir"),
            "adapter": loaded.adapter.as_ref().map(|p| p.display().to_string()),
            "device": cfg.get("device", "cpu".to_string())?,
            "dtype": cfg.get("dtype", "fp32".to_string())?,
            "seed": seed,
        });
        report.results_file = Some(report.write_json(
            dir,
            settings.describe(run, max_length),
            settings.log_samples,
        )?);
    }
    Ok(Some(report))
}

/// Fails when `output_dir` cannot hold `eval_results.json`: not creatable, or the name taken by
/// a folder.
fn check_results_writable(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create output_dir {}; set output_dir to a writable folder",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".tune-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "cannot write in output_dir {}; set output_dir to a writable folder",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    let results = dir.join("eval_results.json");
    if results.is_dir() {
        bail!(
            "{} is a folder, so the results cannot be written there; remove it or set another output_dir",
            results.display()
        );
    }
    Ok(())
}

fn progress_bar(len: usize) -> indicatif::ProgressBar {
    crate::progress::bar(
        len as u64,
        "Running loglikelihood requests {bar:30} {pos}/{len} [{elapsed}<{eta}]",
    )
}
