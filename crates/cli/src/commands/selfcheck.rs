//! `tune selfcheck`: run the golden-fixture parity checks on any device and print JSON. This is how
//! a CUDA build is verified on a GPU machine that has no Rust toolchain.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tune_recipes::selfcheck;
use tune_recipes::settings::{parse_device, parse_dtype};

/// Check this build against torchtune's golden numbers (tests/fixtures).
///
/// Examples:
///   $ tune selfcheck lora-step --device cuda --dtype bf16
///   $ tune selfcheck trajectory --device cpu --dtype fp32
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Which check: `lora-step` (one LoRA forward/backward + 5 AdamW steps), `qlora-step`
    /// (QLoRA and LoRA loss/gradients against torchtune + torchao) or `trajectory` (torchtune's
    /// 10-step recipe run).
    #[arg(value_parser = ["lora-step", "qlora-step", "trajectory"])]
    pub check: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// The repository root holding assets/ and tests/fixtures/.
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    check_repo(&args.repo)?;
    let result = match args.check.as_str() {
        "lora-step" => {
            let device = parse_device(&args.device)?;
            let dtype = parse_dtype(&args.dtype, &device)?;
            selfcheck::lora_step(&args.repo, &device, dtype)?
        }
        "qlora-step" => {
            let device = parse_device(&args.device)?;
            let dtype = parse_dtype(&args.dtype, &device)?;
            selfcheck::qlora_step(&args.repo, &device, dtype)?
        }
        _ => {
            let work = tempfile::tempdir()?;
            selfcheck::trajectory(&args.repo, work.path(), &args.device, &args.dtype)?
        }
    };
    let mut result = result;
    let failed = selfcheck::failures(&result);
    result["pass"] = failed.is_empty().into();
    result["failed"] = failed.clone().into();
    println!("{}", serde_json::to_string_pretty(&result)?);
    if !failed.is_empty() {
        anyhow::bail!(
            "selfcheck {} outside tolerance: {}",
            args.check,
            failed.join("; ")
        );
    }
    Ok(())
}

/// The checks read the bundled model and torchtune's fixtures from the repository: a wrong
/// `--repo` (or a run from another folder) is named as such, not as a missing config key.
fn check_repo(repo: &Path) -> Result<()> {
    let needed = ["assets/stories260K", "tests/fixtures"];
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|dir| !repo.join(dir).is_dir())
        .collect();
    if !missing.is_empty() {
        let shown = std::path::absolute(repo).unwrap_or_else(|_| repo.to_path_buf());
        anyhow::bail!(
            "{} is not a tune-rs repository (it lacks {}): run selfcheck from the repository \
             root, or pass --repo with its path",
            shown.display(),
            missing.join(" and ")
        );
    }
    Ok(())
}
