//! `tune ls`: the built-in recipes and their configs; `--components`: the registry;
//! `--adapters`: the adapters, built-in and from plugins.

use std::path::PathBuf;

use anyhow::Result;
use tune_core::registry;
use tune_core::ComponentKind;

/// List built-in recipes and configs (or, with --components, every registered component; with
/// --adapters, every adapter `model.adapter` can name, built-in or from a plugin).
///
/// Example:
///   $ tune ls
///   RECIPE                                   CONFIG
///   lora_finetune_single_device              llama2/7B_lora_single_device
///                                            llama2/7B_qlora_single_device
///   $ tune ls --adapters --plugin plugins/ia3/target/release/libtune_ia3.so
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// List the registered `_component_`s (models, datasets, optimizers, ...) by kind, with
    /// where each comes from, instead of recipes.
    #[arg(long)]
    pub components: bool,
    /// List the adapters (`model.adapter: <name>`) with where each comes from: built-in, or the
    /// plugin library that registered it.
    #[arg(long, conflicts_with = "components")]
    pub adapters: bool,
    /// Load an adapter plugin first (repeatable); the directories in TUNE_PLUGIN_PATH are loaded
    /// too. Only with --adapters or --components.
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.adapters || args.components {
        crate::commands::run::load_plugins(&args.plugins, None)?;
    } else if !args.plugins.is_empty() {
        anyhow::bail!("--plugin only matters with --adapters or --components");
    }
    if args.adapters {
        print!("{}", adapters_table());
    } else if args.components {
        print!("{}", components_table());
    } else {
        print!("{}", recipes_table());
    }
    Ok(())
}

fn row(left: &str, right: &str) -> String {
    format!("{left:<40} {right:<40}").trim_end().to_string() + "\n"
}

/// torchtune's table: the recipe name on its first config's row only; `<>` for no configs.
pub fn recipes_table() -> String {
    let mut out = row("RECIPE", "CONFIG");
    for (recipe, configs) in crate::catalog::recipes() {
        if configs.is_empty() {
            out += &row(&recipe, "<>");
        }
        for (i, config) in configs.iter().enumerate() {
            out += &row(if i == 0 { &recipe } else { "" }, config);
        }
    }
    out
}

/// Every adapter by name, with its origin and description.
pub fn adapters_table() -> String {
    let by_kind = registry::by_kind();
    let adapters = by_kind
        .get(&ComponentKind::Adapter)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let name_width = adapters
        .iter()
        .map(|c| c.path.len())
        .max()
        .unwrap_or(0)
        .max("ADAPTER".len());
    let origin_width = adapters
        .iter()
        .map(|c| c.origin.len())
        .max()
        .unwrap_or(0)
        .max("ORIGIN".len());
    let line = |name: &str, origin: &str, about: &str| {
        let text = format!("{name:<name_width$}  {origin:<origin_width$}  {about}");
        text.trim_end().to_string() + "\n"
    };
    let mut out = line("ADAPTER", "ORIGIN", "ABOUT");
    for c in adapters {
        out += &line(c.path, c.origin, c.about);
    }
    out
}

/// Components grouped by kind (the kind on its first row), with origin and aliases.
pub fn components_table() -> String {
    let by_kind = registry::by_kind();
    if by_kind.is_empty() {
        return "No components are registered.\n".to_string();
    }
    let width = by_kind
        .values()
        .flatten()
        .map(|c| c.path.len())
        .max()
        .unwrap_or(0);
    // Plugin origins are library paths: as wide as the longest, so aliases stay aligned.
    let origin_width = by_kind
        .values()
        .flatten()
        .map(|c| c.origin.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let line = |kind: &str, path: &str, origin: &str, aliases: &str| {
        let text = format!("{kind:<14} {path:<width$} {origin:<origin_width$} {aliases}");
        text.trim_end().to_string() + "\n"
    };
    let mut out = line("KIND", "COMPONENT", "ORIGIN", "ALIASES");
    for (kind, components) in by_kind {
        for (i, c) in components.iter().enumerate() {
            let kind = if i == 0 {
                kind.to_string()
            } else {
                String::new()
            };
            out += &line(&kind, c.path, c.origin, &c.aliases.join(", "));
        }
    }
    out
}
