//! `tune ls`: the built-in recipes and their configs; `--components`: the registry.

use anyhow::Result;
use tune_core::registry;

/// List built-in recipes and configs (or, with --components, every registered component).
///
/// Example:
///   $ tune ls
///   RECIPE                                   CONFIG
///   lora_finetune_single_device              llama2/7B_lora_single_device
///                                            llama2/7B_qlora_single_device
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// List the registered `_component_`s (models, datasets, optimizers, ...) by kind, with
    /// where each comes from, instead of recipes.
    #[arg(long)]
    pub components: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.components {
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
    let line = |kind: &str, path: &str, origin: &str, aliases: &str| {
        let text = format!("{kind:<14} {path:<width$} {origin:<10} {aliases}");
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
