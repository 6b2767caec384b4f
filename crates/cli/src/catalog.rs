//! What `tune` ships: the built-in configs (embedded from `configs/`), the recipe each one is
//! made for, and the recipes' sources (for `tune cp <recipe>`).
//!
//! The config -> recipe table lives here, not in the recipes, so `tune ls`/`cp`/`cat` work
//! even for a recipe this binary was built without; `tune run` still needs the recipe
//! registered (`tune_core::recipe`).

use anyhow::{anyhow, Result};
use tune_core::registry::closest;
use tune_core::Config;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/builtin.rs"));
}

/// Each built-in config and the recipe it is made for, in `tune ls` order.
pub const CONFIG_RECIPES: &[(&str, &str)] = &[
    (
        "llama2/7B_lora_single_device",
        "lora_finetune_single_device",
    ),
    (
        "llama2/7B_qlora_single_device",
        "lora_finetune_single_device",
    ),
    (
        "llama2/13B_qlora_single_device",
        "lora_finetune_single_device",
    ),
    (
        "stories260K/lora_single_device",
        "lora_finetune_single_device",
    ),
    (
        "stories260K/qlora_single_device",
        "lora_finetune_single_device",
    ),
    (
        "stories260K/lora_text_completion",
        "lora_finetune_single_device",
    ),
    ("llama2/7B_lora", "lora_finetune_distributed"),
    ("llama2/13B_lora", "lora_finetune_distributed"),
    ("llama2/70B_lora", "lora_finetune_distributed"),
    ("llama2/7B_qlora", "lora_finetune_distributed"),
    ("llama2/70B_qlora", "lora_finetune_distributed"),
    ("stories260K/lora_distributed", "lora_finetune_distributed"),
    ("llama2/7B_lora_dpo_single_device", "lora_dpo_single_device"),
    (
        "stories260K/lora_dpo_single_device",
        "lora_dpo_single_device",
    ),
    ("llama2/7B_lora_dpo", "lora_dpo_distributed"),
    ("llama2/generation", "generate"),
    ("stories260K/generation", "generate"),
    ("llama2/7B_eval", "eleuther_eval"),
    ("stories260K/eval", "eleuther_eval"),
    ("eleuther_evaluation", "eleuther_eval"),
    ("generation", "generate"),
];

/// torchtune's own names for built-in configs kept here under `llama2/`: its docs run
/// `tune run eleuther_eval --config eleuther_evaluation` and `tune run generate --config generation`.
const CONFIG_ALIASES: &[(&str, &str)] = &[
    ("eleuther_evaluation", "llama2/7B_eval"),
    ("generation", "llama2/generation"),
];

/// Every built-in config name (the files', then torchtune's aliases).
pub fn config_names() -> Vec<&'static str> {
    embedded::CONFIGS
        .iter()
        .map(|(name, _)| *name)
        .chain(CONFIG_ALIASES.iter().map(|(alias, _)| *alias))
        .collect()
}

/// The YAML text of a built-in config (by its name or torchtune's alias).
pub fn config_text(name: &str) -> Option<&'static str> {
    let name = CONFIG_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, target)| *target);
    embedded::CONFIGS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// A built-in config, parsed.
pub fn builtin_config(name: &str) -> Option<Result<Config>> {
    config_text(name).map(|text| {
        Config::from_yaml_str(text).map_err(|e| anyhow!("built-in config {name}: {e:#}"))
    })
}

/// Recipes with their configs, in `tune ls` order: the table's recipes first, then any other
/// registered recipe (sorted). A registered recipe's own config list is merged in.
pub fn recipes() -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |recipe: &str, config: Option<&str>| {
        let pos = match out.iter().position(|(r, _)| r == recipe) {
            Some(pos) => pos,
            None => {
                out.push((recipe.to_string(), Vec::new()));
                out.len() - 1
            }
        };
        if let Some(config) = config {
            if !out[pos].1.iter().any(|c| c == config) {
                out[pos].1.push(config.to_string());
            }
        }
    };
    for (config, recipe) in CONFIG_RECIPES {
        add(recipe, Some(config));
    }
    for recipe in tune_core::recipe::all() {
        add(recipe.name(), None);
        for config in recipe.configs() {
            add(recipe.name(), Some(config));
        }
    }
    out
}

/// Is `name` a recipe (listed in the table or registered)?
pub fn is_recipe(name: &str) -> bool {
    recipes().iter().any(|(r, _)| r == name)
}

/// The configs made for a recipe.
pub fn configs_of(recipe: &str) -> Vec<String> {
    recipes()
        .into_iter()
        .find(|(r, _)| r == recipe)
        .map(|(_, c)| c)
        .unwrap_or_default()
}

/// A recipe's bundled Rust source: (file name, text), to read top to bottom as torchtune's
/// recipe file. Recipes live in `crates/recipes/src/<name>.rs` or `<name>/mod.rs`; appended
/// after it are the folder's other files, and the shared parts it runs: the training loop, the
/// inference loading, the preference losses, another recipe's objective.
pub fn recipe_source(recipe: &str) -> Option<(&'static str, String)> {
    let candidates = [
        format!("{recipe}.rs"),
        format!("{recipe}/mod.rs"),
        format!("recipes/{recipe}.rs"),
    ];
    let sources = embedded::RECIPE_SOURCES;
    let (path, text) = sources
        .iter()
        .find(|(path, _)| candidates.iter().any(|c| c == path))
        .copied()?;
    let folder = path.strip_suffix("mod.rs");
    let shared_modules: Vec<String> = ["training_loop", "inference", "rlhf_loss"]
        .into_iter()
        .map(str::to_string)
        .chain(recipes().into_iter().map(|(r, _)| r))
        .filter(|module| module != recipe)
        .collect();
    // The recipe's own files, then every shared part that a file already taken refers to.
    let mut taken: Vec<(&str, &str)> = vec![(path, text)];
    taken.extend(
        sources
            .iter()
            .filter(|(p, _)| *p != path && folder.is_some_and(|f| p.starts_with(f))),
    );
    let mut scanned = 0;
    while let Some(&(_, current)) = taken.get(scanned) {
        scanned += 1;
        for module in &shared_modules {
            let file = format!("{module}.rs");
            if taken.iter().any(|(p, _)| *p == file)
                || !current.contains(&format!("crate::{module}::"))
            {
                continue;
            }
            if let Some(part) = sources.iter().find(|(p, _)| *p == file) {
                taken.push(*part);
            }
        }
    }
    let mut whole = text.to_string();
    for &(part_path, part_text) in &taken[1..] {
        // Inner doc comments are only allowed at a file's top.
        let part_text = part_text.replace("\n//!", "\n//");
        let part_text = match part_text.strip_prefix("//!") {
            Some(rest) => format!("//{rest}"),
            None => part_text,
        };
        whole.push_str(&format!(
            "\n// ---- crates/recipes/src/{part_path} ----\n\n{part_text}"
        ));
    }
    Some((path, whole))
}

/// Names close to `name` among recipes and built-in configs, for "did you mean" hints.
pub fn close_names(name: &str) -> Vec<String> {
    let mut names: Vec<String> = config_names().into_iter().map(str::to_string).collect();
    names.extend(recipes().into_iter().map(|(r, _)| r));
    closest(name, names.iter().map(String::as_str), 3)
}

/// ", did you mean a, b?" or "" — appended to "unknown name" errors.
pub fn did_you_mean(name: &str) -> String {
    let close = close_names(name);
    if close.is_empty() {
        String::new()
    } else {
        format!(" Did you mean {}?", close.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_config_has_a_recipe_and_every_table_entry_a_file() {
        let names = config_names();
        for name in &names {
            assert!(
                CONFIG_RECIPES.iter().any(|(c, _)| c == name),
                "{name} has no recipe in CONFIG_RECIPES"
            );
        }
        for (config, _) in CONFIG_RECIPES {
            assert!(
                names.contains(config),
                "{config} is in CONFIG_RECIPES but not in configs/"
            );
        }
    }

    #[test]
    fn every_embedded_config_parses() {
        for name in config_names() {
            builtin_config(name).unwrap().unwrap();
        }
    }

    #[test]
    fn close_names_find_typos() {
        assert!(close_names("llama2/7B_lora_singel_device")
            .contains(&"llama2/7B_lora_single_device".to_string()));
        assert!(close_names("lora_finetune_single")
            .contains(&"lora_finetune_single_device".to_string()));
    }
}
