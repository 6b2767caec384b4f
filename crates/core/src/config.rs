//! YAML configs, torchtune's command-line override grammar and `${key}` interpolation.
//!
//! A [`Config`] is the YAML mapping a recipe reads. `tune run` builds one in three steps:
//! load the YAML ([`Config::load`]), apply the command-line overrides
//! ([`Config::apply_overrides`], grammar in [`overrides`]), then resolve `${a.b}` references
//! ([`Config::resolve_interpolations`], rules in [`interpolate`]).
//!
//! Paths are dotted (`checkpointer.output_dir`); a numeric segment indexes a list
//! (`checkpointer.checkpoint_files.0`).

pub mod interpolate;
pub mod overrides;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};

pub use overrides::{parse_override, parse_value, Override};

/// A config: a YAML mapping from top-level keys to values and component nodes.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: Value,
    /// The config before its `${...}` references were resolved: what a run saves, as torchtune
    /// does, so that the saved file reused with another `output_dir` follows it.
    as_written: Option<Value>,
}

/// Two configs are equal when they say the same (however they came to).
impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root
    }
}

/// How many levels of `<<` merges (a block merging a block that merges another) are applied.
const MAX_MERGE_DEPTH: usize = 16;

fn has_merge_key(value: &Value) -> bool {
    match value {
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| k.as_str() == Some("<<") || has_merge_key(v)),
        Value::Sequence(items) => items.iter().any(has_merge_key),
        _ => false,
    }
}

/// The YAML parser places a duplicate key at its mapping's first key; name the lines of that
/// mapping (same indentation, until the block ends) that hold the key instead.
fn duplicate_key_lines(text: &str, e: &serde_yaml::Error) -> Option<anyhow::Error> {
    let message = e.to_string();
    // `duplicate entry with key "k" at ...`, after the mapping's path when nested.
    let (_, rest) = message.split_once("duplicate entry with key \"")?;
    let key = rest.split('"').next()?;
    let start = e.location()?;
    let indent = start.column().saturating_sub(1);
    let mut lines = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .skip(start.line().saturating_sub(1))
    {
        let content = line.trim_start();
        let depth = line.len() - content.len();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if depth < indent {
            break; // the mapping's block has ended
        }
        let holds_key = content
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'));
        if depth == indent && holds_key {
            lines.push((i + 1).to_string());
        }
    }
    (lines.len() > 1).then(|| {
        anyhow::anyhow!(
            "the key `{key}` is given more than once in one mapping (lines {}); keep one",
            lines.join(", ")
        )
    })
}

impl Config {
    /// Parses a config from YAML text. The document must be a mapping (or empty).
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let mut root: Value = serde_yaml::from_str(text)
            .map_err(|e| duplicate_key_lines(text, &e).unwrap_or_else(|| e.into()))
            .context("config is not valid YAML")?;
        // `<<: *defaults` merge keys, which OmegaConf (PyYAML) applies and torchtune configs use
        // to share blocks. One pass leaves the `<<` of a merged block that merges another: repeat.
        for _ in 0..MAX_MERGE_DEPTH {
            if !has_merge_key(&root) {
                break;
            }
            root.apply_merge()
                .context("config has a `<<` merge key that is not a mapping or list of mappings")?;
        }
        let root = match root {
            Value::Null => Value::Mapping(Mapping::new()),
            Value::Mapping(_) => root,
            other => bail!(
                "a config must be a YAML mapping of `key: value` lines, but this document is {}",
                kind_of(&other)
            ),
        };
        Ok(Config {
            root,
            as_written: None,
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_yaml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The value at a dotted path (`checkpointer.output_dir`).
    pub fn get(&self, dotted: &str) -> Option<&Value> {
        let mut node = &self.root;
        for part in dotted.split('.') {
            node = child(node, part)?;
        }
        Some(node)
    }

    /// Mutable access to the value at a dotted path.
    pub fn get_mut(&mut self, dotted: &str) -> Option<&mut Value> {
        self.edited();
        let mut node = &mut self.root;
        for part in dotted.split('.') {
            node = child_mut(node, part)?;
        }
        Some(node)
    }

    /// Sets the value at a dotted path, creating missing (or null) intermediate mappings.
    /// Fails when the path runs through a scalar or past the end of a list.
    pub fn set(&mut self, dotted: &str, value: Value) -> Result<()> {
        let parts: Vec<&str> = dotted.split('.').collect();
        let (last, parents) = parts.split_last().expect("split yields at least one part");
        self.edited();
        let mut node = &mut self.root;
        for (i, part) in parents.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let here = parts[..i].join(".");
            node = match node {
                Value::Mapping(map) => map
                    .entry(Value::String(part.to_string()))
                    .or_insert(Value::Null),
                Value::Sequence(seq) => {
                    let idx = list_index(part, seq.len())
                        .with_context(|| format!("cannot set `{dotted}`"))?;
                    &mut seq[idx]
                }
                other => bail!(
                    "cannot set `{dotted}`: `{here}` is {}, not a mapping",
                    kind_of(other)
                ),
            };
        }
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        match node {
            Value::Mapping(map) => {
                map.insert(Value::String(last.to_string()), value);
            }
            Value::Sequence(seq) => {
                let idx = list_index(last, seq.len())
                    .with_context(|| format!("cannot set `{dotted}`"))?;
                seq[idx] = value;
            }
            other => bail!(
                "cannot set `{dotted}`: `{}` is {}, not a mapping",
                parents.join("."),
                kind_of(other)
            ),
        }
        Ok(())
    }

    /// Removes the value at a dotted path; returns it, or `None` when there was none.
    pub fn remove(&mut self, dotted: &str) -> Option<Value> {
        self.edited();
        let (parent, last) = match dotted.rsplit_once('.') {
            Some((parent, last)) => (self.get_mut(parent)?, last),
            None => (&mut self.root, dotted),
        };
        match parent {
            Value::Mapping(map) => map.remove(last),
            Value::Sequence(seq) => {
                let idx: usize = last.parse().ok()?;
                (idx < seq.len()).then(|| seq.remove(idx))
            }
            _ => None,
        }
    }

    /// Every node that names a `_component_`, with its dotted path, in document order
    /// (parents before the component nodes nested inside them).
    pub fn component_nodes(&self) -> Vec<(String, &Value)> {
        let mut out = Vec::new();
        collect_components(&self.root, String::new(), &mut out);
        out
    }

    /// The top-level keys, in document order.
    pub fn keys(&self) -> Vec<String> {
        match &self.root {
            Value::Mapping(map) => map
                .keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The config as YAML text.
    pub fn to_yaml_string(&self) -> String {
        serde_yaml::to_string(&self.root).unwrap_or_default()
    }

    /// The YAML of the config as written, its `${...}` references unresolved (torchtune's
    /// `torchtune_config.yaml`).
    pub fn to_yaml_string_as_written(&self) -> String {
        serde_yaml::to_string(self.as_written.as_ref().unwrap_or(&self.root)).unwrap_or_default()
    }

    /// Applies command-line overrides in order (grammar: [`overrides`]). Every bad override is
    /// reported in one error.
    pub fn apply_overrides(&mut self, overrides: &[String]) -> Result<()> {
        self.edited();
        overrides::apply(self, overrides)
    }

    /// A change after the references were resolved is not in the written form: from then on
    /// the resolved config is what a run saves.
    fn edited(&mut self) {
        self.as_written = None;
    }

    /// Replaces every `${a.b}` reference with the value it names (rules: [`interpolate`]).
    pub fn resolve_interpolations(&mut self) -> Result<()> {
        let resolved = interpolate::resolve(&self.root)?;
        let written = std::mem::replace(&mut self.root, resolved);
        self.as_written.get_or_insert(written);
        Ok(())
    }
}

/// Does this node name a component (a mapping with a `_component_` key)?
pub fn is_component_node(value: &Value) -> bool {
    value
        .as_mapping()
        .is_some_and(|m| m.contains_key("_component_"))
}

/// The `_component_` name of a component node, if it is a string.
pub fn component_name(value: &Value) -> Option<&str> {
    value.as_mapping()?.get("_component_")?.as_str()
}

fn collect_components<'a>(node: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match node {
        Value::Mapping(map) => {
            if map.contains_key("_component_") {
                out.push((path.clone(), node));
            }
            for (k, v) in map {
                if let Some(k) = k.as_str() {
                    collect_components(v, join(k), out);
                }
            }
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter().enumerate() {
                collect_components(v, join(&i.to_string()), out);
            }
        }
        _ => {}
    }
}

/// One step down a path: a mapping key, or a list index.
pub(crate) fn child<'a>(node: &'a Value, part: &str) -> Option<&'a Value> {
    match node {
        Value::Mapping(map) => map.get(part),
        Value::Sequence(seq) => seq.get(part.parse::<usize>().ok()?),
        _ => None,
    }
}

fn child_mut<'a>(node: &'a mut Value, part: &str) -> Option<&'a mut Value> {
    match node {
        Value::Mapping(map) => map.get_mut(part),
        Value::Sequence(seq) => seq.get_mut(part.parse::<usize>().ok()?),
        _ => None,
    }
}

fn list_index(part: &str, len: usize) -> Result<usize> {
    match part.parse::<usize>() {
        Ok(i) if i < len => Ok(i),
        Ok(i) => bail!("index {i} is past the end of a list of {len} items"),
        Err(_) => bail!("`{part}` is not a list index (the node is a list)"),
    }
}

/// A short description of a value ("the number 42", "a list of 2 items"), for error messages.
pub fn kind_of(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the bool {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(s) => format!("a list of {} items", s.len()),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}
