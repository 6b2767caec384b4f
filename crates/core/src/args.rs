//! Typed access to a component's keyword arguments, checked against its [`ArgSpec`]s.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::registry::{closest, ArgType, Component, ComponentKind};

/// One problem with a component's arguments (several are reported at once by `tune validate`).
#[derive(Debug, Clone, PartialEq)]
pub struct ArgProblem(pub String);

impl std::fmt::Display for ArgProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The arguments of one config node, with the component's defaults filled in.
#[derive(Debug, Clone)]
pub struct Args {
    pub component: &'static str,
    values: BTreeMap<String, Value>,
}

fn short(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// Arguments of torchtune's components that its recipes pass themselves, with what they pass.
fn supplied_by_recipe(kind: ComponentKind, key: &str) -> Option<&'static str> {
    match (kind, key) {
        (ComponentKind::LrScheduler, "num_training_steps") => {
            Some("epochs x optimizer steps per epoch")
        }
        (ComponentKind::LrScheduler, "optimizer") => Some("the recipe's optimizer"),
        (ComponentKind::Optimizer, "params") => Some("the adapters' parameters"),
        (ComponentKind::Dataset, "tokenizer") => Some("the config's tokenizer"),
        _ => None,
    }
}

/// What is wrong with `key`, which `component` does not take.
fn unknown_key(component: &Component, name: &str, key: &str) -> String {
    if let Some(what) = supplied_by_recipe(component.kind, key) {
        return format!(
            "{name}.{key} is passed by the recipe ({what}), not set in the config; remove it"
        );
    }
    let hint = match closest(key, component.args.iter().map(|a| a.name), 1).first() {
        Some(h) => format!("; did you mean `{h}`?"),
        None => format!(
            "; its arguments are: {}",
            component
                .args
                .iter()
                .map(|a| a.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!("unknown key `{key}` for {name}{hint}")
}

/// Checks a node's keys and value types against the component's schema; returns every problem.
pub fn check(component: &Component, node: &Value) -> Vec<ArgProblem> {
    let mut problems = Vec::new();
    let empty = serde_yaml::Mapping::new();
    let map = node.as_mapping().unwrap_or(&empty);
    let name = short(component.path);
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            problems.push(ArgProblem(format!("{name}: non-string key {key:?}")));
            continue;
        };
        if key == "_component_" {
            continue;
        }
        match component.arg(key) {
            None if component.extra_args => {}
            None => problems.push(ArgProblem(unknown_key(component, name, key))),
            Some(spec) => {
                if let Err(why) = type_ok(
                    spec.ty,
                    spec.nullable || spec.default == Some("null"),
                    value,
                ) {
                    problems.push(ArgProblem(format!(
                        "{name}.{key}: expected {}, found {why}",
                        spec.ty
                    )));
                }
            }
        }
    }
    for spec in component.args.iter().filter(|a| a.is_required()) {
        if !map.contains_key(spec.name) {
            problems.push(ArgProblem(format!(
                "{name}: missing required argument `{}` ({})",
                spec.name, spec.ty
            )));
        }
    }
    problems
}

/// A YAML 1.1 scalar that YAML 1.2 (serde_yaml) reads as a string but PyYAML, and so torchtune,
/// reads as a bool or a number: `yes`/`no`/`on`/`off` (any of their three casings) and numbers
/// with `_` separators (`1_000`). `None` for anything else.
pub fn yaml11_scalar(value: &Value) -> Option<Value> {
    let Value::String(s) = value else {
        return None;
    };
    match s.as_str() {
        "yes" | "Yes" | "YES" | "on" | "On" | "ON" => return Some(Value::Bool(true)),
        "no" | "No" | "NO" | "off" | "Off" | "OFF" => return Some(Value::Bool(false)),
        _ => {}
    }
    let numeric = s.contains('_')
        && s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+')
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '_' | '.' | 'e' | 'E' | '-' | '+'));
    if !numeric {
        return None;
    }
    let plain = s.replace('_', "");
    if let Ok(i) = plain.parse::<i64>() {
        return Some(Value::Number(i.into()));
    }
    plain.parse::<f64>().ok().map(|f| Value::Number(f.into()))
}

/// serde's message for a value of the wrong type, with Rust's type names (`expected usize`)
/// said in words (`expected a whole number, 0 or more`). Only serde's own words change, never
/// the value quoted in the message.
pub fn in_words(error: &serde_yaml::Error) -> String {
    const TYPES: [(&str, &str); 11] = [
        ("usize", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number, 0 or more"),
        ("u16", "a whole number, 0 or more"),
        ("u8", "a whole number, 0 or more"),
        ("isize", "a whole number"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
        ("a boolean", "True or False"),
    ];
    const VALUES: [(&str, &str); 4] = [
        (
            "invalid type: floating point `",
            "invalid type: the number `",
        ),
        (
            "invalid value: floating point `",
            "invalid value: the number `",
        ),
        ("invalid type: integer `", "invalid type: the number `"),
        ("invalid value: integer `", "invalid value: the number `"),
    ];
    let text = error.to_string();
    let Some(at) = text.rfind(", expected ") else {
        return text;
    };
    let (found, expected) = (&text[..at], &text[at + ", expected ".len()..]);
    let found = VALUES
        .iter()
        .find_map(|(rust, words)| {
            found
                .strip_prefix(rust)
                .map(|rest| format!("{words}{rest}"))
        })
        .unwrap_or_else(|| found.to_string());
    let expected = TYPES
        .iter()
        .find(|(rust, _)| *rust == expected)
        .map_or(expected, |(_, words)| words);
    format!("{found}, expected {expected}")
}

/// `value` as `T`, reading YAML 1.1 booleans and numbers ([`yaml11_scalar`]) where `T` wants
/// one.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> serde_yaml::Result<T> {
    serde_yaml::from_value(value.clone()).or_else(|e| match yaml11_scalar(value) {
        Some(v) => serde_yaml::from_value(v).map_err(|_| e),
        None => Err(e),
    })
}

/// A component argument's value, with YAML 1.1 scalars read as the argument's type wants.
fn as_arg_type(ty: ArgType, value: &Value) -> Value {
    match (ty, yaml11_scalar(value)) {
        (ArgType::Bool, Some(v @ Value::Bool(_)))
        | (ArgType::Int | ArgType::Float, Some(v @ Value::Number(_))) => v,
        _ => value.clone(),
    }
}

fn type_ok(ty: ArgType, nullable: bool, value: &Value) -> Result<(), String> {
    let value = &as_arg_type(ty, value);
    let ok = match (ty, value) {
        (_, Value::Null) => nullable,
        (ArgType::Any, _) => true,
        (ArgType::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
        (ArgType::Float, Value::Number(_)) => true,
        (ArgType::Bool, Value::Bool(_)) => true,
        (ArgType::Str, Value::String(_)) => true,
        (ArgType::StrList, Value::Sequence(s)) => s.iter().all(|v| v.is_string()),
        (ArgType::StrOrList, Value::String(_)) => true,
        (ArgType::StrOrList, Value::Sequence(s)) => s.iter().all(|v| v.is_string()),
        (ArgType::FloatList, Value::Sequence(s)) => s.iter().all(|v| v.is_number()),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(crate::config::kind_of(value))
    }
}

impl Args {
    /// Builds the arguments of `node` for `component`, failing on the first schema problem.
    pub fn new(component: &Component, node: &Value) -> Result<Self> {
        let problems = check(component, node);
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| p.0.clone()).collect();
            bail!("{}", list.join("\n"));
        }
        let mut values = BTreeMap::new();
        for spec in component.args {
            if let Some(default) = spec.default {
                let v: Value = serde_yaml::from_str(default)
                    .with_context(|| format!("bad default for {}.{}", component.path, spec.name))?;
                values.insert(spec.name.to_string(), v);
            }
        }
        if let Some(map) = node.as_mapping() {
            for (k, v) in map {
                if let Some(k) = k.as_str() {
                    if k != "_component_" {
                        let v = match component.arg(k) {
                            Some(spec) => as_arg_type(spec.ty, v),
                            None => v.clone(),
                        };
                        values.insert(k.to_string(), v);
                    }
                }
            }
        }
        Ok(Args {
            component: component.path,
            values,
        })
    }

    /// Arguments from plain key/value pairs (tests, programmatic use); no schema check.
    pub fn from_pairs(component: &'static str, pairs: &[(&str, Value)]) -> Self {
        let values = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Args { component, values }
    }

    /// Sets argument `name` (a preset filling in the builder argument it fixes).
    pub fn set(&mut self, name: &str, value: Value) {
        self.values.insert(name.to_string(), value);
    }

    /// Removes argument `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.values.remove(name)
    }

    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    pub fn is_null(&self, name: &str) -> bool {
        matches!(self.values.get(name), None | Some(Value::Null))
    }

    /// The argument deserialised as `T`; an error names the component and key.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let value = self
            .values
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing argument `{name}`", short(self.component)))?;
        serde_yaml::from_value(value.clone()).map_err(|e| {
            anyhow!(
                "{}.{name}: {} (value: {})",
                short(self.component),
                in_words(&e),
                crate::config::kind_of(value)
            )
        })
    }

    /// `None` when the argument is absent or null.
    pub fn get_opt<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        if self.is_null(name) {
            Ok(None)
        } else {
            self.get(name).map(Some)
        }
    }

    /// A string or list of strings, always as a list.
    pub fn str_list(&self, name: &str) -> Result<Vec<String>> {
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(_) => self.get(name),
        }
    }

    /// Keys given beyond the schema (for `extra_args` components).
    pub fn extra(&self, known: &[&str]) -> Vec<(String, Value)> {
        self.values
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_1_1_scalars_read_as_pyyaml_reads_them() {
        let s = |t: &str| Value::String(t.to_string());
        assert_eq!(yaml11_scalar(&s("yes")), Some(Value::Bool(true)));
        assert_eq!(yaml11_scalar(&s("OFF")), Some(Value::Bool(false)));
        assert_eq!(yaml11_scalar(&s("1_000")), Some(Value::Number(1000.into())));
        assert_eq!(
            yaml11_scalar(&s("1_000.5")),
            Some(Value::Number(1000.5.into()))
        );
        for text in ["y", "maybe", "q_proj", "_1", "1_a", "YeS"] {
            assert_eq!(yaml11_scalar(&s(text)), None, "{text}");
        }
        assert!(from_value::<bool>(&s("yes")).unwrap());
        assert_eq!(from_value::<usize>(&s("1_000")).unwrap(), 1000);
        // Strings stay strings where strings are wanted.
        assert_eq!(from_value::<String>(&s("yes")).unwrap(), "yes");
        assert!(from_value::<bool>(&s("maybe")).is_err());
    }

    #[test]
    fn wrong_types_are_said_in_words() {
        let words = |e: serde_yaml::Error| in_words(&e);
        let negative = from_value::<usize>(&Value::Number((-5).into())).unwrap_err();
        assert_eq!(
            words(negative),
            "invalid value: the number `-5`, expected a whole number, 0 or more"
        );
        let fraction = from_value::<i64>(&Value::Number(1.5.into())).unwrap_err();
        assert!(words(fraction).ends_with("expected a whole number"));
        let text = from_value::<f64>(&Value::String("abc".into())).unwrap_err();
        assert!(words(text).ends_with("expected a number"));
        let flag = from_value::<bool>(&Value::String("maybe".into())).unwrap_err();
        assert!(words(flag).ends_with("expected True or False"));
        // The value quoted in the message is the user's, word for word.
        let quoted = from_value::<u8>(&Value::String("expected u8".into())).unwrap_err();
        assert_eq!(
            words(quoted),
            "invalid type: string \"expected u8\", expected a whole number, 0 or more"
        );
    }
}
