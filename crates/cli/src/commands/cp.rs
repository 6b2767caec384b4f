//! `tune cp`: copy a built-in config (or a recipe's source) to a local path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::catalog;

/// Copy a built-in config (or a recipe's Rust source) to a local path.
///
/// Examples:
///   $ tune cp llama2/7B_lora_single_device .
///   Copied file to ./7B_lora_single_device.yaml
///   $ tune cp llama2/7B_lora ./new_dir/my_custom_lora.yaml --make-parents
///   Copied file to ./new_dir/my_custom_lora.yaml
///
/// Need to see all possible recipes/configs to copy? Try running `tune ls`.
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    override_usage = "tune cp <recipe|config> <destination> [OPTIONS]"
)]
pub struct Args {
    /// Recipe or config to copy; `tune ls` lists them.
    pub file: String,
    /// Where to copy it: a file path (the suffix becomes .yaml/.rs), or an existing directory
    /// (the file keeps its name).
    pub destination: PathBuf,
    /// Do not overwrite the destination if it already exists.
    #[arg(short = 'n', long)]
    pub no_clobber: bool,
    /// Create the destination's parent directories if they do not exist (otherwise a missing
    /// parent directory is an error).
    #[arg(long)]
    pub make_parents: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let (text, file_name, suffix) = source(&args.file)?;
    let dest = destination(&args.destination, &file_name, suffix);
    if args.no_clobber && dest.exists() {
        let shown = std::path::absolute(&dest).unwrap_or(dest.clone());
        println!(
            "File already exists at {}, not overwriting.",
            shown.display()
        );
        return Ok(());
    }
    if args.make_parents {
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
    }
    match std::fs::write(&dest, text) {
        Ok(()) => {
            println!("Copied file to {}", dest.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "Cannot create regular file: '{}'. No such file or directory. If the specified \
             destination's parent directory does not exist and you would like to create it \
             on-the-fly, use the --make-parents flag.",
            dest.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", dest.display())),
    }
}

/// The text to copy, its default file name (without suffix) and its suffix.
fn source(name: &str) -> Result<(String, String, &'static str)> {
    let base = |path: &str| path.rsplit('/').next().unwrap_or(path).to_string();
    if let Some(text) = catalog::config_text(name) {
        return Ok((text.to_string(), base(name), "yaml"));
    }
    if catalog::is_recipe(name) {
        return match catalog::recipe_source(name) {
            Some((path, text)) => Ok((
                text,
                base(path.trim_end_matches("/mod.rs").trim_end_matches(".rs")),
                "rs",
            )),
            None => {
                let why = if tune_core::recipe::lookup(name).is_ok() {
                    "is compiled into tune and its source is not bundled with this binary"
                } else {
                    "is not built into this binary"
                };
                bail!(
                    "recipe `{name}` {why}; copy one of its configs instead ({})",
                    catalog::configs_of(name).join(", ")
                )
            }
        };
    }
    bail!(
        "Invalid file name: {name}. Try `tune ls` to see all available files to copy.{}",
        catalog::did_you_mean(name)
    )
}

/// `.` or an existing directory receives the file under its own name; any other path gets the
/// proper suffix. (torchtune keeps the name only for `.`: given an existing directory `dir` it
/// writes `dir.yaml` beside it.)
fn destination(dest: &Path, file_name: &str, suffix: &str) -> PathBuf {
    let text = dest.to_string_lossy();
    if dest.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        dest.join(format!("{file_name}.{suffix}"))
    } else if dest.extension().is_some_and(|e| e == suffix) {
        dest.to_path_buf()
    } else {
        dest.with_extension(suffix)
    }
}
