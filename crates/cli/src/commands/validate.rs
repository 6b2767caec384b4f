//! `tune validate`: check a config against the component registry.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tune_core::Config;

use crate::catalog;

/// Validate a config: every `_component_` exists, and every node's keys and value types match
/// its component's arguments. Prints every problem at once.
///
/// Example:
///   $ tune validate my_config.yaml
///   Config is well-formed!
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Path to the config to validate (or the name of a built-in config).
    pub config: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let shown = args.config.display().to_string();
    let config = load(args)?;
    let mut problems = tune_core::validate::validate(&config);
    // What `tune run` checks next: the plugins the config loads, then the adapters it names.
    match crate::commands::run::load_plugins(&[], Some(&config)) {
        Ok(()) => problems.extend(unknown_adapters(&config)),
        Err(e) => problems.push(format!("plugins: {e:#}")),
    }
    // Then the model builder's own checks (a negative rank, an unknown module to adapt), which
    // go past the argument types; once the node's types are right.
    if !problems.iter().any(|p| p.starts_with("model")) {
        problems.extend(model_problem(&config));
    }
    if problems.is_empty() {
        println!("Config is well-formed!");
        return Ok(());
    }
    let count = match problems.len() {
        1 => "1 problem".to_string(),
        n => format!("{n} problems"),
    };
    bail!("{shown} has {count}:\n  - {}", problems.join("\n  - "))
}

/// Each model node's `adapter` that names no registered adapter (built-in or from a plugin).
fn unknown_adapters(config: &Config) -> Vec<String> {
    let mut resolved = config.clone();
    if resolved.resolve_interpolations().is_err() {
        return Vec::new(); // already reported
    }
    resolved
        .component_nodes()
        .into_iter()
        .filter_map(|(path, node)| {
            let name = node.get("adapter")?.as_str()?;
            let error = tune_adapters::factory(name).err()?;
            Some(format!("{path}.adapter: {error:#}"))
        })
        .collect()
}

/// What building the `model` node's spec (no weights) says of it.
fn model_problem(config: &Config) -> Option<String> {
    let mut resolved = config.clone();
    resolved.resolve_interpolations().ok()?;
    let node = resolved.root.get("model")?;
    node.get("_component_")?;
    let error = tune_models::builders::model_spec_from_node(node).err()?;
    Some(format!("model: {error:#}"))
}

fn load(args: &Args) -> Result<Config> {
    let path = &args.config;
    if path.exists() {
        return Config::load(path);
    }
    let name = path.to_string_lossy();
    match catalog::builtin_config(&name) {
        Some(config) => config,
        None => bail!(
            "no config file {name} (and no built-in config of that name).{}",
            catalog::did_you_mean(&name)
        ),
    }
    .with_context(|| format!("cannot validate {name}"))
}
