//! `tune run`: resolve a config (built-in name or path, overrides, interpolation) and hand it to
//! a registered recipe.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tune_core::recipe::RunOptions;
use tune_core::Config;

use crate::catalog;

/// Run a recipe with a config and command-line overrides.
///
/// Examples:
///   $ tune run lora_finetune_single_device --config stories260K/lora_single_device
///   $ tune run lora_finetune_single_device --config llama2/7B_lora_single_device \
///       model.lora_rank=16 model.lora_attn_modules=[q_proj,k_proj,v_proj] output_dir=./run1
///   $ tune run --nproc_per_node 2 lora_finetune_distributed --config llama2/7B_lora
///   $ tune run --plugin plugins/ia3/target/release/libtune_ia3.so lora_finetune_single_device \
///       --config stories260K/lora_single_device model.adapter=ia3 model.lora_attn_modules=[k_proj,v_proj]
///
/// Overrides: `a.b=value`; lists as [a,b], ['a','b'] or ["a", "b"]; `~a.b` deletes a key;
/// `model=<dotted.name>` swaps a component; null/None is null. `tune cat <config>` shows the keys.
///
/// Adapter plugins are loaded from the directories in TUNE_PLUGIN_PATH (colon-separated), then
/// the config's `plugins: [PATH, ...]`, then each --plugin; `tune ls --adapters` lists adapters.
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    override_usage = "tune run [--nnodes N] [--nproc_per_node M] [--dry-run] [--plugin PATH]... <RECIPE> --config <CONFIG> [OVERRIDES]..."
)]
pub struct Args {
    /// Number of nodes (machines) for a distributed run.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nnodes: usize,
    /// Number of processes per node for a distributed run.
    #[arg(
        long = "nproc_per_node",
        alias = "nproc-per-node",
        default_value_t = 1,
        value_name = "M"
    )]
    pub nproc_per_node: usize,
    /// Resolve the config and build what needs no weights, print it, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Load an adapter plugin (a shared library built against tune-plugin-api); repeatable.
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// The recipe to run (`tune ls` lists them).
    pub recipe: String,
    /// A built-in config name (looked up among the recipe's configs, then all built-in configs)
    /// or a path to a YAML file.
    #[arg(long)]
    pub config: String,
    /// Config overrides: `key=value`, `~key`.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let recipe = tune_core::recipe::lookup(&args.recipe).or_else(|e| {
        if catalog::is_recipe(&args.recipe) {
            bail!(
                "recipe `{}` is listed by `tune ls` but was not built into this binary",
                args.recipe
            )
        }
        Err(e)
    })?;
    if args.nnodes == 0 || args.nproc_per_node == 0 {
        bail!("--nnodes and --nproc_per_node must be at least 1");
    }
    let options = RunOptions {
        dry_run: args.dry_run,
        nnodes: args.nnodes,
        nproc_per_node: args.nproc_per_node,
    };
    if options.is_distributed() && !recipe.supports_distributed() {
        bail!(
            "recipe {} does not support distributed training (--nnodes {} --nproc_per_node {}); run \
             it without launcher options, or use lora_finetune_distributed",
            recipe.name(),
            args.nnodes,
            args.nproc_per_node
        );
    }

    let mut recipe_configs = catalog::configs_of(recipe.name());
    recipe_configs.extend(recipe.configs().iter().map(|c| c.to_string()));
    let mut config = load_config(&args.config, &recipe_configs)?;
    config.apply_overrides(&args.overrides)?;
    config
        .resolve_interpolations()
        .context("cannot resolve the config's ${...} references")?;

    let log_level = config
        .get("log_level")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    crate::logging::init(log_level.as_deref())?;
    // Before the checks: a config may name a plugin's adapter.
    load_plugins(&args.plugins, Some(&config))?;
    check(&config)?;

    tracing::info!(
        "Running {} with resolved config:\n\n{}",
        recipe.name(),
        config.to_yaml_string()
    );
    recipe
        .run(config, &options)
        .with_context(|| format!("recipe {} failed", recipe.name()))
}

/// The config named `name`: one of the recipe's configs, else any built-in config, else a file.
pub fn load_config(name: &str, recipe_configs: &[String]) -> Result<Config> {
    let builtin = recipe_configs
        .iter()
        .find(|c| *c == name)
        .map(String::as_str)
        .or_else(|| catalog::config_names().into_iter().find(|c| *c == name));
    if let Some(builtin) = builtin {
        return catalog::builtin_config(builtin).expect("listed config exists");
    }
    let path = Path::new(name);
    if path.exists() {
        return Config::load(path);
    }
    if let Some(Some(config)) = name.strip_suffix(".yaml").map(catalog::builtin_config) {
        return config;
    }
    bail!(
        "config `{name}` is neither a built-in config nor a file (`tune ls` lists the built-in \
         configs).{}",
        catalog::did_you_mean(name)
    )
}

/// Loads the adapter plugins in the directories of TUNE_PLUGIN_PATH, then those the config's
/// `plugins` key lists, then `cli` (`--plugin`). A file named twice is loaded once.
pub fn load_plugins(cli: &[PathBuf], config: Option<&Config>) -> Result<()> {
    let mut paths = tune_adapters::plugin::env_plugin_paths()?;
    if let Some(config) = config {
        paths.extend(tune_adapters::plugin::config_plugin_paths(&config.root)?);
    }
    paths.extend(cli.iter().cloned());
    for plugin in tune_adapters::plugin::load_all(&paths)? {
        tracing::info!(
            "loaded plugin {} {} ({}): adapters {}",
            plugin.name,
            plugin.version,
            plugin.path.display(),
            plugin.adapters.join(", ")
        );
    }
    Ok(())
}

/// `tune validate`'s checks, before anything is built: every problem at once.
fn check(config: &Config) -> Result<()> {
    let problems = tune_core::validate::validate(config);
    if !problems.is_empty() {
        bail!(
            "the config has {} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    Ok(())
}
