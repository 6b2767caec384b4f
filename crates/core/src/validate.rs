//! Checks a whole config against the registry and reports every problem at once.
//!
//! Where torchtune's `tune validate` only binds each top-level `_component_` node's keyword
//! arguments to the function's signature, this checks every component node (nested ones too),
//! names the closest registered component for an unknown `_component_`, suggests the closest
//! argument for a misspelled key, checks each value's type, and reports a broken `${...}`
//! interpolation.

use serde_yaml::Value;

use crate::args;
use crate::config::Config;
use crate::registry;

/// Every problem in `config`, each prefixed with the dotted path of its node; empty when the
/// config is well-formed.
pub fn validate(config: &Config) -> Vec<String> {
    // Interpolations are resolved first, so `${...}` values are checked with their real types.
    let mut resolved = config.clone();
    match resolved.resolve_interpolations() {
        Ok(()) => validate_resolved(&resolved),
        Err(e) => {
            let mut problems = vec![format!("{e:#}")];
            problems.extend(validate_resolved(config));
            problems
        }
    }
}

/// [`validate`] for a config whose interpolations are already resolved: resolving again would
/// read an escaped `\${...}`, now a literal `${...}`, as a reference.
pub fn validate_resolved(resolved: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if !resolved.root.is_mapping() {
        problems.push("the config is not a mapping of `key: value` lines".to_string());
        return problems;
    }
    for (path, node) in resolved.component_nodes() {
        let at = if path.is_empty() {
            "<root>".to_string()
        } else {
            path
        };
        problems.extend(check_node(&at, node));
    }
    // Top-level keys: any name is allowed, but a near miss of one a recipe reads is a typo.
    for (key, meant) in crate::recipe::misspelt_top_level_keys(resolved) {
        problems.push(format!(
            "`{key}` is read by no recipe (did you mean `{meant}`?)"
        ));
    }
    problems
}

/// Problems with one component node at `at`.
fn check_node(at: &str, node: &Value) -> Vec<String> {
    let name = match node.get("_component_") {
        Some(Value::String(name)) => name,
        Some(other) => {
            return vec![format!(
            "{at}._component_ must be a dotted name like torchtune.models.llama2.lora_llama2_7b, \
                 not {}",
            crate::config::kind_of(other)
        )]
        }
        None => return Vec::new(),
    };
    // A top-level node's key says which kind of component it needs.
    let kind = crate::registry::ComponentKind::of_config_key(at);
    match registry::lookup_as(name, kind) {
        Err(e) => vec![format!("{at}: {e}")],
        Ok(component) => args::check(component, node)
            .into_iter()
            .map(|p| format!("{at}: {p}"))
            .collect(),
    }
}
