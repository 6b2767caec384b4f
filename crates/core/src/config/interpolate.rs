//! `${key}` interpolation, as OmegaConf resolves it in torchtune configs.
//!
//! - `${output_dir}`, `${a.b}`, `${a.0}`: absolute dotted paths from the config's root.
//! - `${.sibling}`, `${..uncle}`: relative to the mapping that holds the string (one dot is that
//!   mapping, each further dot one level up).
//! - A string that is exactly one reference takes the referenced value with its type (an int
//!   stays an int, a mapping is copied). Inside a longer string (`${output_dir}/logs`) the value
//!   is written as text, the way Python prints it (`True`, `None`).
//! - References chain (`a: ${b}`, `b: ${c}/x`) and nest (`${model.${which}}`).
//! - `${oc.env:VAR}` and `${oc.env:VAR,default}` read environment variables.
//! - `\${` is a literal `${`.
//!
//! Unknown keys and cycles are errors that name the key holding the reference.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value};

use super::child;
use crate::registry::closest;

/// Returns `root` with every interpolation resolved.
pub fn resolve(root: &Value) -> Result<Value> {
    let mut resolver = Resolver {
        root,
        done: HashMap::new(),
        stack: Vec::new(),
    };
    resolver.at(&[])
}

/// Does this string hold a `${...}` reference (an escaped `\${` counts: it must be unescaped)?
pub fn has_reference(s: &str) -> bool {
    s.contains("${")
}

struct Resolver<'a> {
    root: &'a Value,
    /// Resolved values by path, so each is resolved once.
    done: HashMap<Vec<String>, Value>,
    /// Paths being resolved, outermost first (a repeat is a cycle).
    stack: Vec<Vec<String>>,
}

enum Piece<'s> {
    Text(&'s str),
    Ref(&'s str),
}

fn lookup<'v>(root: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(root, |node, part| child(node, part))
}

fn dotted(path: &[String]) -> String {
    if path.is_empty() {
        "<root>".to_string()
    } else {
        path.join(".")
    }
}

impl Resolver<'_> {
    /// The fully resolved value at `path` (which must exist).
    fn at(&mut self, path: &[String]) -> Result<Value> {
        if let Some(v) = self.done.get(path) {
            return Ok(v.clone());
        }
        if let Some(pos) = self.stack.iter().position(|p| p == path) {
            let mut cycle: Vec<String> = self.stack[pos..].iter().map(|p| dotted(p)).collect();
            cycle.push(dotted(path));
            bail!("interpolation cycle: {}", cycle.join(" -> "));
        }
        let raw = lookup(self.root, path).ok_or_else(|| anyhow!("no key `{}`", dotted(path)))?;
        self.stack.push(path.to_vec());
        let result = self.value(raw, path);
        self.stack.pop();
        let value = result?;
        self.done.insert(path.to_vec(), value.clone());
        Ok(value)
    }

    fn value(&mut self, raw: &Value, path: &[String]) -> Result<Value> {
        let sub = |key: String| {
            let mut p = path.to_vec();
            p.push(key);
            p
        };
        Ok(match raw {
            Value::String(s) if has_reference(s) => self
                .string(s, path)
                .with_context(|| format!("in `{}`", dotted(path)))?,
            Value::Mapping(map) => {
                let mut out = Mapping::new();
                for (k, v) in map {
                    let resolved = match k.as_str() {
                        Some(key) => self.at(&sub(key.to_string()))?,
                        None => v.clone(),
                    };
                    out.insert(k.clone(), resolved);
                }
                Value::Mapping(out)
            }
            Value::Sequence(seq) => {
                let mut out = Vec::with_capacity(seq.len());
                for i in 0..seq.len() {
                    out.push(self.at(&sub(i.to_string()))?);
                }
                Value::Sequence(out)
            }
            other => other.clone(),
        })
    }

    /// Resolves the references in one string held at `path`.
    fn string(&mut self, s: &str, path: &[String]) -> Result<Value> {
        let pieces = split(s)?;
        if let [Piece::Ref(expr)] = pieces.as_slice() {
            return self.reference(expr, path);
        }
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Ref(expr) => {
                    let value = self.reference(expr, path)?;
                    out.push_str(
                        &as_text(&value).with_context(|| format!("`${{{expr}}}` inside {s:?}"))?,
                    );
                }
            }
        }
        Ok(Value::String(out))
    }

    /// The value one `${expr}` stands for.
    fn reference(&mut self, expr: &str, path: &[String]) -> Result<Value> {
        let key = if has_reference(expr) {
            let inner = self.string(expr, path)?;
            as_text(&inner)?
        } else {
            expr.to_string()
        };
        let key = key.trim();
        if let Some(spec) = key.strip_prefix("oc.env:") {
            return env(spec);
        }
        if let Some((resolver, _)) = key.split_once(':') {
            bail!("`${{{key}}}`: the resolver `{resolver}` is not supported (only `oc.env`)");
        }
        let target = target_path(key, path)?;
        if lookup(self.root, &target).is_none() {
            return Err(unknown_key(self.root, key, &target));
        }
        self.at(&target)
    }
}

/// Splits a string into literal text and `${...}` references (matching nested braces).
fn split(s: &str) -> Result<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    let (mut i, mut text_start) = (0, 0);
    let bytes = s.as_bytes();
    while i < bytes.len() {
        if bytes[i..].starts_with(b"\\${") {
            pieces.push(Piece::Text(&s[text_start..i]));
            pieces.push(Piece::Text("${"));
            i += 3;
            text_start = i;
        } else if bytes[i..].starts_with(b"${") {
            pieces.push(Piece::Text(&s[text_start..i]));
            let (mut depth, mut j) = (1, i + 2);
            while j < bytes.len() && depth > 0 {
                if bytes[j..].starts_with(b"${") {
                    depth += 1;
                    j += 2;
                } else {
                    if bytes[j] == b'}' {
                        depth -= 1;
                    }
                    j += 1;
                }
            }
            if depth > 0 {
                bail!("unterminated `${{` in {s:?}; close it with `}}`");
            }
            let expr = &s[i + 2..j - 1];
            if expr.trim().is_empty() {
                bail!("empty reference `${{}}` in {s:?}");
            }
            pieces.push(Piece::Ref(expr));
            i = j;
            text_start = i;
        } else {
            i += 1;
        }
    }
    pieces.push(Piece::Text(&s[text_start..]));
    pieces.retain(|p| !matches!(p, Piece::Text("")));
    Ok(pieces)
}

/// The absolute path a key names; relative keys start from the mapping holding the string.
fn target_path(key: &str, holder: &[String]) -> Result<Vec<String>> {
    let dots = key.len() - key.trim_start_matches('.').len();
    let rest = &key[dots..];
    let mut path: Vec<String> = if dots == 0 {
        Vec::new()
    } else {
        let base = holder.len().saturating_sub(1);
        let up = dots - 1;
        if up > base {
            bail!("`${{{key}}}` climbs above the config's root");
        }
        holder[..base - up].to_vec()
    };
    if rest.is_empty() {
        bail!("`${{{key}}}` names no key");
    }
    for part in rest.split('.') {
        if part.is_empty() {
            bail!("`${{{key}}}` has an empty segment");
        }
        path.push(part.to_string());
    }
    Ok(path)
}

fn unknown_key(root: &Value, key: &str, target: &[String]) -> anyhow::Error {
    let (parent, last) = target.split_at(target.len() - 1);
    let names: Vec<String> = lookup(root, parent)
        .and_then(Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let hint = closest(&last[0], names.iter().map(String::as_str), 1);
    match hint.first() {
        Some(h) => {
            let mut fixed = parent.to_vec();
            fixed.push(h.clone());
            anyhow!(
                "`${{{key}}}` names no key in the config; did you mean `${{{}}}`?",
                fixed.join(".")
            )
        }
        None => anyhow!(
            "`${{{key}}}` names no key in the config (`{}` does not exist)",
            target.join(".")
        ),
    }
}

fn env(spec: &str) -> Result<Value> {
    let (name, default) = match spec.split_once(',') {
        Some((n, d)) => (n.trim(), Some(d.trim())),
        None => (spec.trim(), None),
    };
    match (std::env::var(name), default) {
        (Ok(v), _) => Ok(Value::String(v)),
        (Err(_), Some("null" | "None")) => Ok(Value::Null),
        (Err(_), Some(d)) => Ok(Value::String(d.trim_matches(['\'', '"']).to_string())),
        (Err(_), None) => bail!("`${{oc.env:{name}}}`: environment variable {name} is not set (give a default with `${{oc.env:{name},default}}`)"),
    }
}

/// Python's `repr` of a float: the shortest digits that read back, in scientific notation when
/// the exponent is below -4 or at least 16 (`1e-05`, `3e-4` as `0.0003`, `100.0`).
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits: "1e-5", "-3.25e2".
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    if !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let fixed = format!("{f}");
    if fixed.contains('.') {
        fixed
    } else {
        format!("{fixed}.0")
    }
}

/// A scalar written into a longer string, as Python would print it.
fn as_text(value: &Value) -> Result<String> {
    Ok(match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
            Some(f) => python_float_repr(f),
            None => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => {
            bail!("a list or mapping cannot be written inside a string")
        }
    })
}
