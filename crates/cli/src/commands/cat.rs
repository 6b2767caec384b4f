//! `tune cat`: print a built-in (or local) config.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};
use tune_core::Config;

use crate::catalog;

/// Print a config, to see which keys `tune run` can override.
///
/// Examples:
///   $ tune cat llama2/7B_lora_single_device
///   $ tune cat llama2/7B_lora_single_device --sort   # keys in sorted order
///   $ tune cat my_config.yaml
///
/// Then override any key: tune run lora_finetune_single_device --config llama2/7B_lora_single_device batch_size=4
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// A built-in config name (`tune ls` lists them) or a path to a YAML file.
    pub config_name: String,
    /// Print the keys in sorted order (comments are dropped).
    #[arg(long)]
    pub sort: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let name = args.config_name.as_str();
    let text = load_text(name)?;
    let config = Config::from_yaml_str(&text).with_context(|| format!("cannot parse {name}"))?;
    if args.sort {
        print!("{}", serde_yaml::to_string(&sorted(&config.root))?);
    } else {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

fn load_text(name: &str) -> Result<String> {
    if catalog::is_recipe(name) {
        bail!(
            "'{name}' is a recipe, not a config. Please use a config name; its configs are: {}",
            catalog::configs_of(name).join(", ")
        );
    }
    if let Some(text) = catalog::config_text(name) {
        return Ok(text.to_string());
    }
    let path = Path::new(name);
    let is_yaml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if !is_yaml {
        bail!(
            "Invalid config format: '{name}'. It is not a built-in config, and a config file must be \
             YAML (.yaml/.yml).{}",
            catalog::did_you_mean(name)
        );
    }
    if !path.exists() {
        bail!(
            "Config '{name}' not found.{}",
            catalog::did_you_mean(name.trim_end_matches(".yaml"))
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))
}

/// The value with every mapping's keys sorted.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Mapping(map) => {
            let mut entries: Vec<(&Value, &Value)> = map.iter().collect();
            entries.sort_by_key(|(k, _)| {
                k.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{k:?}"))
            });
            let mut out = Mapping::new();
            for (k, v) in entries {
                out.insert(k.clone(), sorted(v));
            }
            Value::Mapping(out)
        }
        Value::Sequence(seq) => Value::Sequence(seq.iter().map(sorted).collect()),
        other => other.clone(),
    }
}
