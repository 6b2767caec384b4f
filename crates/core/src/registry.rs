//! The `_component_` registry.
//!
//! A component is anything a config node can name with `_component_: dotted.path`. Each one
//! registers a [`Component`] with `inventory::submit!` in the file that implements it, so adding a
//! component never means editing a central list. Lookups accept torchtune's dotted paths (and a
//! few aliases), which is what lets a torchtune YAML run unchanged.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{OnceLock, RwLock};

use crate::args::Args;

/// What a component builds; recipes use this to say which config node expects what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentKind {
    Model,
    Adapter,
    Tokenizer,
    Dataset,
    Collator,
    Checkpointer,
    Optimizer,
    LrScheduler,
    Loss,
    MetricLogger,
    Profiler,
    Other,
}

impl ComponentKind {
    /// The kind a top-level config key holds (`lr_scheduler`, `collate_fn`, ...), if it names one.
    pub fn of_config_key(key: &str) -> Option<ComponentKind> {
        use ComponentKind::*;
        let kinds = [
            Model,
            Tokenizer,
            Dataset,
            Checkpointer,
            Optimizer,
            LrScheduler,
            Loss,
            MetricLogger,
            Profiler,
        ];
        match key {
            "collate_fn" => Some(Collator),
            _ => kinds.into_iter().find(|kind| kind.to_string() == key),
        }
    }
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ComponentKind::Model => "model",
            ComponentKind::Adapter => "adapter",
            ComponentKind::Tokenizer => "tokenizer",
            ComponentKind::Dataset => "dataset",
            ComponentKind::Collator => "collator",
            ComponentKind::Checkpointer => "checkpointer",
            ComponentKind::Optimizer => "optimizer",
            ComponentKind::LrScheduler => "lr_scheduler",
            ComponentKind::Loss => "loss",
            ComponentKind::MetricLogger => "metric_logger",
            ComponentKind::Profiler => "profiler",
            ComponentKind::Other => "other",
        };
        f.write_str(s)
    }
}

/// The type an argument must have. Checked by `tune validate` and by [`Args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Int,
    Float,
    Bool,
    Str,
    /// A list of strings (`[q_proj, v_proj]`).
    StrList,
    /// A string, or a list of strings (e.g. `data_files`, `checkpoint_files`).
    StrOrList,
    /// A list of two floats (`betas`).
    FloatList,
    /// Anything: a nested mapping, a list of mixed values.
    Any,
}

impl std::fmt::Display for ArgType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ArgType::Int => "int",
            ArgType::Float => "float",
            ArgType::Bool => "bool",
            ArgType::Str => "str",
            ArgType::StrList => "list[str]",
            ArgType::StrOrList => "str | list[str]",
            ArgType::FloatList => "list[float]",
            ArgType::Any => "any",
        };
        f.write_str(s)
    }
}

/// One keyword argument of a component.
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    pub name: &'static str,
    pub ty: ArgType,
    /// The default as a YAML literal (`"8"`, `"null"`, `"[q_proj, v_proj]"`); `None` means required.
    pub default: Option<&'static str>,
    /// May the value be null (Python's `Optional[...]`)?
    pub nullable: bool,
}

impl ArgSpec {
    pub const fn required(name: &'static str, ty: ArgType) -> Self {
        ArgSpec {
            name,
            ty,
            default: None,
            nullable: false,
        }
    }
    pub const fn optional(name: &'static str, ty: ArgType, default: &'static str) -> Self {
        ArgSpec {
            name,
            ty,
            default: Some(default),
            nullable: false,
        }
    }
    /// An optional argument whose default is null.
    pub const fn nullable(name: &'static str, ty: ArgType) -> Self {
        ArgSpec {
            name,
            ty,
            default: Some("null"),
            nullable: true,
        }
    }
    pub fn is_required(&self) -> bool {
        self.default.is_none()
    }
}

/// What a component's builder returns: the recipe that asked for it downcasts to the type it expects.
pub type Built = Box<dyn Any + Send>;

/// A registered component.
pub struct Component {
    /// torchtune's dotted path, e.g. `torchtune.models.llama2.lora_llama2_7b`.
    pub path: &'static str,
    /// Other names it answers to (short names like `lora_llama2_7b`, or tune-rs paths).
    pub aliases: &'static [&'static str],
    pub kind: ComponentKind,
    pub args: &'static [ArgSpec],
    /// Accepts keyword arguments beyond `args` (Python `**kwargs`), e.g. dataset loaders.
    pub extra_args: bool,
    pub about: &'static str,
    /// Where it came from: "built-in" or the plugin's library path.
    pub origin: &'static str,
    pub build: fn(&Args) -> anyhow::Result<Built>,
}

impl Component {
    pub fn arg(&self, name: &str) -> Option<&ArgSpec> {
        self.args.iter().find(|a| a.name == name)
    }

    /// Builds the component from a config node (its `_component_` key is ignored).
    pub fn build_from(&self, node: &serde_yaml::Value) -> anyhow::Result<Built> {
        let args = Args::new(self, node)?;
        (self.build)(&args)
    }
}

inventory::collect!(Component);

/// A torchtune component tune-rs knows of but does not provide, with why and what to use instead.
/// Registered like components (`inventory::submit!`) by the crate that provides the alternative;
/// naming one is an error that says so, rather than a guess at a similar name.
#[derive(Debug)]
pub struct Unavailable {
    pub path: &'static str,
    /// Other names it goes by (short names, older module paths).
    pub aliases: &'static [&'static str],
    pub why: &'static str,
}

inventory::collect!(Unavailable);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown _component_ `{name}`{}", suggestion_text(.suggestions))]
    Unknown {
        name: String,
        suggestions: Vec<String>,
    },
    #[error("`{name}` is not available in tune-rs: {why}")]
    Unavailable { name: String, why: &'static str },
    #[error(
        "component `{name}` is already registered (by {existing}); a plugin may not replace it"
    )]
    Duplicate { name: String, existing: String },
}

fn suggestion_text(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        "; run `tune ls --components` to list them".to_string()
    } else {
        format!("; closest registered names: {}", suggestions.join(", "))
    }
}

/// Components registered at run time (plugins). Built-ins come from `inventory`.
fn dynamic() -> &'static RwLock<Vec<&'static Component>> {
    static DYNAMIC: OnceLock<RwLock<Vec<&'static Component>>> = OnceLock::new();
    DYNAMIC.get_or_init(|| RwLock::new(Vec::new()))
}

/// Every registered component, built-ins first.
pub fn all() -> Vec<&'static Component> {
    let mut out: Vec<&'static Component> = inventory::iter::<Component>.into_iter().collect();
    out.extend(dynamic().read().expect("registry lock").iter().copied());
    out
}

/// Registers a component at run time (used by the plugin loader). Names must be new.
pub fn register_dynamic(component: Component) -> Result<&'static Component, RegistryError> {
    for name in std::iter::once(component.path).chain(component.aliases.iter().copied()) {
        if let Some(existing) = find(name) {
            return Err(RegistryError::Duplicate {
                name: name.to_string(),
                existing: existing.origin.to_string(),
            });
        }
    }
    let leaked: &'static Component = Box::leak(Box::new(component));
    dynamic().write().expect("registry lock").push(leaked);
    Ok(leaked)
}

fn find(name: &str) -> Option<&'static Component> {
    all()
        .into_iter()
        .find(|c| c.path == name || c.aliases.contains(&name))
}

/// Looks a component up by dotted path or alias. A name registered as [`Unavailable`] says why
/// and what to use instead; other unknown names list the closest registered ones.
pub fn lookup(name: &str) -> Result<&'static Component, RegistryError> {
    lookup_as(name, None)
}

/// [`lookup`] for a node that needs a `kind` component: an unknown name is compared with those
/// only (a scheduler's typo is not answered with optimizers).
pub fn lookup_as(
    name: &str,
    kind: Option<ComponentKind>,
) -> Result<&'static Component, RegistryError> {
    if let Some(component) = find(name) {
        return Ok(component);
    }
    if let Some(unavailable) = inventory::iter::<Unavailable>
        .into_iter()
        .find(|u| u.path == name || u.aliases.contains(&name))
    {
        return Err(RegistryError::Unavailable {
            name: name.to_string(),
            why: unavailable.why,
        });
    }
    let candidates: Vec<&str> = all()
        .into_iter()
        .filter(|c| kind.is_none_or(|kind| c.kind == kind))
        .flat_map(|c| std::iter::once(c.path).chain(c.aliases.iter().copied()))
        .collect();
    Err(RegistryError::Unknown {
        name: name.to_string(),
        suggestions: closest(name, candidates.into_iter(), 3),
    })
}

/// Builds the component `name` from `node` as the `T` a `kind` component builds: lookup, kind
/// check, build and downcast in one place. The error keeps its cause's type: a [`RegistryError`]
/// when the name is unknown, [`WrongType`] when the component builds another type, so callers can
/// add the hint that fits.
pub fn build_as<T: 'static>(
    name: &str,
    kind: ComponentKind,
    node: &serde_yaml::Value,
) -> anyhow::Result<T> {
    let component = lookup_as(name, Some(kind))?;
    if component.kind != kind {
        anyhow::bail!(
            "`{name}` is a {} component; this node needs a {kind} component",
            component.kind
        );
    }
    match component.build_from(node)?.downcast::<T>() {
        Ok(value) => Ok(*value),
        Err(_) => Err(WrongType {
            name: name.to_string(),
            kind,
        }
        .into()),
    }
}

/// A component of the right kind that builds a type the caller cannot use (say, DPO's loss in
/// an SFT recipe).
#[derive(Debug, thiserror::Error)]
#[error("`{name}` is a {kind} component this recipe cannot use")]
pub struct WrongType {
    pub name: String,
    pub kind: ComponentKind,
}

/// Components grouped by kind, sorted by path (for `tune ls --components`).
pub fn by_kind() -> BTreeMap<ComponentKind, Vec<&'static Component>> {
    let mut map: BTreeMap<ComponentKind, Vec<&'static Component>> = BTreeMap::new();
    for c in all() {
        map.entry(c.kind).or_default().push(c);
    }
    for v in map.values_mut() {
        v.sort_by_key(|c| c.path);
    }
    map
}

/// The `limit` candidates closest to `name`, best first. Compares both the full dotted path and
/// its last segment, so `lora_llama_7b` finds `torchtune.models.llama2.lora_llama2_7b`.
pub fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
    limit: usize,
) -> Vec<String> {
    let last = |s: &str| s.rsplit('.').next().unwrap_or(s).to_string();
    let mut scored: Vec<(f64, String)> = candidates
        .map(|c| {
            let full = strsim::jaro_winkler(name, c);
            let tail = strsim::jaro_winkler(&last(name), &last(c));
            (full.max(tail), c.to_string())
        })
        .filter(|(score, _)| *score > 0.75)
        .collect();
    scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let mut out: Vec<String> = Vec::new();
    for (_, c) in scored {
        if !out.contains(&c) {
            out.push(c);
        }
        if out.len() == limit {
            break;
        }
    }
    out
}
