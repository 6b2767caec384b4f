//! YAML configs, torchtune's command-line override grammar and `${key}` interpolation.
//! (Placeholder API: being completed.)

use std::path::Path;

use anyhow::{Context, Result};
use serde_yaml::Value;

/// A resolved config: a YAML mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub root: Value,
}

impl Config {
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let root: Value = serde_yaml::from_str(text).context("config is not valid YAML")?;
        Ok(Config { root })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_yaml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The value at a dotted path (`checkpointer.output_dir`).
    pub fn get(&self, dotted: &str) -> Option<&Value> {
        let mut node = &self.root;
        for part in dotted.split('.') {
            node = node.as_mapping()?.get(part)?;
        }
        Some(node)
    }

    pub fn to_yaml_string(&self) -> String {
        serde_yaml::to_string(&self.root).unwrap_or_default()
    }
}
