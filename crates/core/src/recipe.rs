//! The `Recipe` trait: what `tune run <recipe>` dispatches to.

use crate::config::Config;

/// How `tune run` was invoked, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Resolve the config and build what needs no weights, print it, and exit.
    pub dry_run: bool,
    pub nnodes: usize,
    pub nproc_per_node: usize,
}

impl RunOptions {
    pub fn is_distributed(&self) -> bool {
        self.nnodes > 1 || self.nproc_per_node > 1
    }
}

/// A training/eval/generation recipe. Implementations register a [`RecipeEntry`].
pub trait Recipe: Sync {
    /// torchtune's recipe name, e.g. `lora_finetune_single_device`.
    fn name(&self) -> &'static str;
    /// Names of the built-in configs made for this recipe (e.g. `llama2/7B_lora_single_device`).
    fn configs(&self) -> &'static [&'static str];
    fn supports_distributed(&self) -> bool {
        false
    }
    /// Every top-level config key it reads, component nodes included (`model`, `output_dir`,
    /// `seed`, ...): an override may add one a config lacks without being taken for a misplaced
    /// argument, and any other key is reported by [`unread_top_level_keys`].
    fn top_level_keys(&self) -> &'static [&'static str] {
        &[]
    }
    /// torchtune keys it knowingly leaves unread (settings of torch's memory or determinism that
    /// have no counterpart here): torchtune's own configs carry them, so they pass silently.
    fn keys_without_effect(&self) -> &'static [&'static str] {
        &[]
    }
    fn run(&self, config: Config, options: &RunOptions) -> anyhow::Result<()>;
}

/// Registration record for a recipe: `inventory::submit! { RecipeEntry(&MyRecipe) }`.
pub struct RecipeEntry(pub &'static dyn Recipe);

inventory::collect!(RecipeEntry);

/// Every registered recipe, sorted by name.
pub fn all() -> Vec<&'static dyn Recipe> {
    let mut v: Vec<&'static dyn Recipe> = inventory::iter::<RecipeEntry>
        .into_iter()
        .map(|e| e.0)
        .collect();
    v.sort_by_key(|r| r.name());
    v
}

/// torchtune 0.6.1's recipes that tune-rs does not implement (it covers LoRA, QLoRA and DoRA
/// fine-tuning, LoRA DPO, generation and evaluation).
const TORCHTUNE_ONLY_RECIPES: &[&str] = &[
    "full_finetune_single_device",
    "full_finetune_distributed",
    "full_dpo_distributed",
    "ppo_full_finetune_single_device",
    "quantize",
    "qat_distributed",
    "qat_lora_finetune_distributed",
    "knowledge_distillation_single_device",
    "knowledge_distillation_distributed",
    "dev/generate_v2",
    "dev/generate_v2_distributed",
    "dev/lora_finetune_distributed_multi_dataset",
    "dev/early_exit_finetune_distributed",
];

pub fn lookup(name: &str) -> anyhow::Result<&'static dyn Recipe> {
    if TORCHTUNE_ONLY_RECIPES.contains(&name) {
        anyhow::bail!("{name} is a torchtune recipe that tune-rs does not implement; `tune ls` lists the ones it does");
    }
    if name.ends_with(".py") {
        anyhow::bail!(
            "{name}: tune-rs runs its built-in recipes, not Python recipe files; `tune ls` lists them"
        );
    }
    all().into_iter().find(|r| r.name() == name).ok_or_else(|| {
        let names: Vec<&str> = all().iter().map(|r| r.name()).collect();
        let close = crate::registry::closest(name, names.iter().copied(), 3);
        anyhow::anyhow!(
            "unknown recipe `{name}`{}; `tune ls` lists recipes",
            if close.is_empty() {
                String::new()
            } else {
                format!(" (did you mean {}?)", close.join(", "))
            }
        )
    })
}

/// The top-level keys of `config` that `recipe` neither reads nor knowingly ignores, in document
/// order; keys other values refer to (`${key}`) count as read. A key that looks like a typo of
/// one the recipe reads ([`is_typo_of`]) is an error naming both (torchtune would run on without
/// the setting). The rest are for the caller to announce.
pub fn unread_top_level_keys(config: &Config, recipe: &dyn Recipe) -> anyhow::Result<Vec<String>> {
    let read = recipe.top_level_keys();
    let unread: Vec<String> = config
        .keys()
        .into_iter()
        .filter(|key| {
            !read.contains(&key.as_str())
                && !recipe.keys_without_effect().contains(&key.as_str())
                && !crate::config::overrides::refers_to(&config.root, key)
        })
        .collect();
    let typos: Vec<String> = unread
        .iter()
        .filter_map(|key| {
            let meant = read.iter().find(|known| is_typo_of(key, known))?;
            Some(format!("`{key}` (did you mean `{meant}`?)"))
        })
        .collect();
    if !typos.is_empty() {
        anyhow::bail!(
            "{} does not read {}; fix the name, or delete the key (`~key` on the command line)",
            recipe.name(),
            typos.join(", ")
        );
    }
    Ok(unread)
}

/// The top-level keys of `config` that no registered recipe reads but that look like a typo of
/// one that some recipe reads, each with what it likely meant (for `tune validate`, which does
/// not know the recipe; `tune run` checks against its own recipe's keys).
pub fn misspelt_top_level_keys(config: &Config) -> Vec<(String, &'static str)> {
    let recipes = all();
    let known: Vec<&'static str> = recipes
        .iter()
        .flat_map(|r| r.top_level_keys().iter().chain(r.keys_without_effect()))
        .copied()
        .collect();
    config
        .keys()
        .into_iter()
        .filter(|key| {
            !known.contains(&key.as_str())
                && !crate::config::overrides::refers_to(&config.root, key)
        })
        .filter_map(|key| {
            let meant = known.iter().find(|k| is_typo_of(&key, k))?;
            Some((key, *meant))
        })
        .collect()
}

/// Is `key` a misspelling of `known`: at most two edits from it (one for keys under eight
/// characters, where two edits make another word), and not `known` with something appended
/// (`dataset_2`, `seed1`: a key parked beside the real one)?
fn is_typo_of(key: &str, known: &str) -> bool {
    let edits = strsim::damerau_levenshtein(key, known);
    let allowed = if known.len() < 8 { 1 } else { 2 };
    key.len() >= 4 && edits > 0 && edits <= allowed && !key.starts_with(known)
}

static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running recipe to save a checkpoint at the next step boundary and exit (Ctrl-C).
pub fn request_stop() {
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Clears a stop request (for a new run in the same process).
pub fn clear_stop() {
    STOP_REQUESTED.store(false, std::sync::atomic::Ordering::SeqCst);
    STOPPED_EARLY.store(false, std::sync::atomic::Ordering::SeqCst);
}

static STOPPED_EARLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that a recipe honoured a stop request before its run was done (it saved where it
/// was): the process should then exit as interrupted, not as finished.
pub fn note_stopped_early() {
    STOPPED_EARLY.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`note_stopped_early`] was called.
pub fn stopped_early() -> bool {
    STOPPED_EARLY.load(std::sync::atomic::Ordering::SeqCst)
}

static STOP_LISTENED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks that a running loop checks [`stop_requested`] (a training loop, while it trains); until
/// then an interrupt should end the process at once rather than wait for a step that never comes.
/// The returned guard unmarks it when dropped.
pub fn listen_for_stop() -> StopListener {
    STOP_LISTENED.store(true, std::sync::atomic::Ordering::SeqCst);
    StopListener(())
}

/// Whether a loop is listening for [`request_stop`] now.
pub fn stop_is_listened() -> bool {
    STOP_LISTENED.load(std::sync::atomic::Ordering::SeqCst)
}

/// See [`listen_for_stop`].
pub struct StopListener(());

impl Drop for StopListener {
    fn drop(&mut self) {
        STOP_LISTENED.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::is_typo_of;

    #[test]
    fn typos_are_near_misses_not_parked_keys() {
        assert!(is_typo_of(
            "gradient_accumulaton_steps",
            "gradient_accumulation_steps"
        ));
        assert!(is_typo_of("max_step_per_epoch", "max_steps_per_epoch"));
        assert!(is_typo_of("shufle", "shuffle"));
        assert!(is_typo_of("epoch", "epochs"));
        // Parked beside the real key, or another word two edits away from a short one.
        for (key, known) in [
            ("dataset_2", "dataset"),
            ("dataset_b", "dataset"),
            ("seed1", "seed"),
            ("model2", "model"),
            ("datasets", "dataset"),
            ("dtypes", "dtype"),
            ("dataset_val", "dataset"),
        ] {
            assert!(!is_typo_of(key, known), "{key} vs {known}");
        }
    }
}
