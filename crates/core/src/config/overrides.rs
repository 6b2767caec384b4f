//! torchtune's command-line override grammar, with its silent failures turned into errors.
//!
//! - `a.b=value` sets a key, creating missing mappings on the way.
//! - `~a.b` deletes a key (it must exist in the config as loaded: deletions apply before any
//!   `a.b=value`, as torchtune's).
//! - `model=some.component`, where `model` is a component node, means
//!   `model._component_=some.component`.
//! - Values: `null`/`None`/`~` are null; `true`/`True`/`false`/`False` are bools; `8` is an int
//!   (but `00015`, with a leading zero, stays a string); `3e-4`, `1.0e-5`, `0.5` are floats;
//!   `[q_proj,v_proj]`, `['q_proj','v_proj']` and `["q_proj", "v_proj"]` are lists;
//!   `{a: 1}` is a mapping; `'...'` / `"..."` force a string; anything else is a string.
//!
//! What torchtune accepts silently but tune-rs rejects (each error says how to fix it):
//! - a list that arrives as a string (`"['q_proj','v_proj']"`, quoted for the shell twice), an
//!   empty list, list items holding quotes or brackets, and comma-separated strings or bare
//!   strings for a list-typed argument;
//! - a new top-level key that is really an argument of a component node (`lora_rank=32` when
//!   `model` takes `lora_rank`: torchtune adds an unused top-level key);
//! - a key that the component of its node does not take (`model.lora_rnak=32`), and a value of
//!   the wrong type for the argument.

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value};

use super::{child, component_name, is_component_node, kind_of, Config};
use crate::args;
use crate::registry::{self, ArgSpec, ArgType};

/// One parsed command-line override.
#[derive(Debug, Clone, PartialEq)]
pub enum Override {
    /// `key=value`: `raw` is the value as typed, `value` its parse.
    Set {
        key: String,
        raw: String,
        value: Value,
    },
    /// `~key`.
    Delete { key: String },
}

/// Parses one `key=value` or `~key` argument.
/// How deep an override's value may nest lists and mappings.
const MAX_NESTING: usize = 32;

pub fn parse_override(arg: &str) -> Result<Override> {
    if let Some(key) = arg.strip_prefix('~') {
        if key.contains('=') {
            bail!(
                "`~key` deletes a key and takes no value; drop the `={}`",
                key.split_once('=').unwrap().1
            );
        }
        check_key(key)?;
        return Ok(Override::Delete {
            key: key.to_string(),
        });
    }
    let Some((key, raw)) = arg.split_once('=') else {
        if arg.starts_with('-') {
            bail!("`{arg}` is not an override; `tune run` options go before the recipe name");
        }
        bail!(
            "overrides must be `key=value` (or `~key` to delete a key); if a list was split by the \
             shell, quote the whole override: 'key=[a, b]'"
        );
    };
    check_key(key)?;
    let value = parse_value(raw)?;
    Ok(Override::Set {
        key: key.to_string(),
        raw: raw.to_string(),
        value,
    })
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        bail!("the key is empty");
    }
    if key.starts_with('-') {
        bail!("`{key}` looks like an option; `tune run` options go before the recipe name, overrides are `key=value`");
    }
    if let Some(bad) = key
        .chars()
        .find(|c| c.is_whitespace() || "[]{}'\"$=,".contains(*c))
    {
        bail!("the key `{key}` contains {bad:?}; keys are dotted names like `model.lora_rank`");
    }
    if key.split('.').any(str::is_empty) {
        bail!("the key `{key}` has an empty segment; keys are dotted names like `model.lora_rank`");
    }
    Ok(())
}

/// Parses an override's value (the grammar is in the module docs).
pub fn parse_value(raw: &str) -> Result<Value> {
    let s = raw.trim();
    if s.is_empty() {
        bail!(
            "the value is empty; write `key=null` for null, or \"key=''\" for an empty string \
             (the outer quotes keep the shell from removing the inner ones)"
        );
    }
    // Lists are parsed recursively: bound the nesting before recursing.
    let mut depth = 0usize;
    for c in s.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_NESTING {
            bail!("the value nests lists or mappings more than {MAX_NESTING} deep");
        }
    }
    if s.starts_with('[') {
        return parse_list(s);
    }
    if s.starts_with('{') {
        let value: Value =
            serde_yaml::from_str(s).map_err(|e| anyhow!("`{s}` is not a valid mapping: {e}"))?;
        if !value.is_mapping() {
            bail!("`{s}` is not a mapping; write `{{key: value, ...}}`");
        }
        return Ok(value);
    }
    if let Some(first) = s.chars().next().filter(|c| *c == '\'' || *c == '"') {
        return unquote(s, first).map(Value::String);
    }
    Ok(scalar(s))
}

/// An unquoted scalar: null, bool, int, float, or a string.
fn scalar(s: &str) -> Value {
    match s {
        "null" | "Null" | "NULL" | "None" | "~" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if is_int(s) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Number(i.into());
        }
    }
    if let Some(f) = parse_float(s) {
        return Value::Number(f.into());
    }
    Value::String(s.to_string())
}

/// `8`, `-3`, `+12`; not `00015` (kept a string, as torchtune forces for `max_filename`).
fn is_int(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

/// `3e-4`, `1.0e-5`, `0.5`, `.5`, `2.`, `inf`, `.nan`; `None` for anything else.
fn parse_float(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let negative = s.starts_with('-');
    match body.to_ascii_lowercase().as_str() {
        "inf" | ".inf" => {
            return Some(if negative {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            })
        }
        "nan" | ".nan" if body.len() == s.len() => return Some(f64::NAN),
        _ => {}
    }
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok =
        digits(int_part) && digits(frac_part) && !(int_part.is_empty() && frac_part.is_empty());
    let exponent_ok = match exponent {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && digits(e)
        }
    };
    let is_float = mantissa.contains('.') || exponent.is_some();
    if mantissa_ok && exponent_ok && is_float {
        s.parse().ok()
    } else {
        None
    }
}

fn unquote(s: &str, quote: char) -> Result<String> {
    let inner = s
        .strip_prefix(quote)
        .and_then(|r| r.strip_suffix(quote))
        .filter(|_| s.len() >= 2)
        .ok_or_else(|| anyhow!("unterminated quote in `{s}`; close it with {quote}"))?;
    if quote == '\'' {
        return Ok(inner.replace("''", "'"));
    }
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Ok(out)
}

fn parse_list(s: &str) -> Result<Value> {
    let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        bail!(
            "the list `{s}` has no closing `]`; if the shell split it at a space, quote the whole \
             override: 'key=[a, b]'"
        );
    };
    let mut items = split_items(inner).with_context(|| format!("in the list `{s}`"))?;
    if items.last().is_some_and(|i| i.trim().is_empty()) && items.len() > 1 {
        items.pop(); // a trailing comma, as YAML allows
    }
    if items.len() == 1 && items[0].trim().is_empty() {
        return Ok(Value::Sequence(Vec::new()));
    }
    let mut out = Vec::new();
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            bail!("the list `{s}` has an empty item (two commas in a row?)");
        }
        out.push(parse_value(item).with_context(|| format!("in the list `{s}`"))?);
    }
    Ok(Value::Sequence(out))
}

/// Splits a list's inside at top-level commas, outside quotes and nested brackets.
fn split_items(inner: &str) -> Result<Vec<&str>> {
    let mut items = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0);
    for (i, c) in inner.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            bail!("unbalanced `]`");
        }
    }
    if let Some(q) = quote {
        bail!("unterminated quote {q}");
    }
    if depth != 0 {
        bail!("unbalanced `[`");
    }
    items.push(&inner[start..]);
    Ok(items)
}

/// Applies overrides in order; every bad one is reported in a single error.
/// The config is changed only when every override is good.
pub(crate) fn apply(config: &mut Config, overrides: &[String]) -> Result<()> {
    let mut updated = config.clone();
    let mut new_top_level: Vec<(&String, String, String)> = Vec::new();
    // As torchtune: every `~key` deletes from the config as loaded, before any `key=value`
    // applies (so `k=1 ~k` ends with k=1, whatever the order on the command line).
    let (deletions, settings): (Vec<&String>, Vec<&String>) =
        overrides.iter().partition(|arg| arg.starts_with('~'));
    let mut problems: Vec<String> = deletions
        .into_iter()
        .chain(settings)
        .filter_map(|arg| match apply_one(&mut updated, arg) {
            Ok(Some((key, raw))) => {
                new_top_level.push((arg, key, raw));
                None
            }
            Ok(None) => None,
            Err(e) => Some(format!("`{arg}`: {e:#}")),
        })
        .collect();
    // After every override: a later one may refer to a new key through `${key}`.
    for (arg, key, raw) in new_top_level {
        if let Err(e) = check_new_top_level_key(&updated, &key, &raw) {
            problems.push(format!("`{arg}`: {e:#}"));
        }
    }
    match problems.as_slice() {
        [] => {
            *config = updated;
            Ok(())
        }
        [one] => bail!("invalid override {one}"),
        many => bail!(
            "{} invalid overrides:\n  - {}",
            many.len(),
            many.join("\n  - ")
        ),
    }
}

/// Applies one override; returns `(key, raw value)` when it added a new top-level key, which
/// [`check_new_top_level_key`] checks once every override is in.
fn apply_one(config: &mut Config, arg: &str) -> Result<Option<(String, String)>> {
    match parse_override(arg)? {
        Override::Delete { key } => {
            if let Some(parent) = key.strip_suffix("._component_") {
                bail!("a node's `_component_` cannot be removed alone; delete the whole node with `~{parent}`");
            }
            config
                .remove(&key)
                .ok_or_else(|| no_such_key(config, &key))?;
            // As torchtune: a mapping left empty goes too.
            let mut path = key.as_str();
            while let Some((parent, _)) = path.rsplit_once('.') {
                if !config
                    .get(parent)
                    .is_some_and(|v| v.as_mapping().is_some_and(|m| m.is_empty()))
                {
                    break;
                }
                config.remove(parent);
                path = parent;
            }
            Ok(None)
        }
        Override::Set { key, raw, value } => {
            let key = component_shorthand(config, key, &value)?;
            let new_top_level = !key.contains('.') && config.get(&key).is_none();
            let (spec, type_problem) = check_component_key(config, &key, &value)?;
            check_surprising(&key, &value, spec, config.get(&key))?;
            if let Some(problem) = type_problem {
                bail!(problem);
            }
            config
                .set(&key, value)
                .map_err(|e| match scalar_on_the_way(config, &key) {
                    // Deletions apply first, so deleting it makes room (torchtune's OmegaConf
                    // would replace it silently).
                    Some(scalar) => e.context(format!(
                    "to replace `{scalar}` with a mapping, delete it as well: `~{scalar} {key}=...`"
                )),
                    None => e,
                })?;
            Ok(new_top_level.then_some((key, raw)))
        }
    }
}

/// The mapping-path prefix of `key` that holds a scalar (a string, a number), when the path
/// runs through one without passing a list.
fn scalar_on_the_way(config: &Config, key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    for end in 1..parts.len() {
        let prefix = parts[..end].join(".");
        match config.get(&prefix)? {
            Value::Mapping(_) => continue,
            Value::Sequence(_) | Value::Null => return None,
            _ => return Some(prefix),
        }
    }
    None
}

fn no_such_key(config: &Config, key: &str) -> anyhow::Error {
    let (parent, last) = key.rsplit_once('.').unwrap_or(("", key));
    let siblings = if parent.is_empty() {
        Some(&config.root)
    } else {
        config.get(parent)
    };
    let names: Vec<String> = siblings
        .and_then(Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let hint = registry::closest(last, names.iter().map(String::as_str), 1);
    match hint.first() {
        Some(h) if parent.is_empty() => {
            anyhow!("there is no key `{key}` to delete; did you mean `~{h}`?")
        }
        Some(h) => anyhow!("there is no key `{key}` to delete; did you mean `~{parent}.{h}`?"),
        None => anyhow!("there is no key `{key}` to delete (`tune cat` shows the config's keys)"),
    }
}

/// `model=some.component` on a component node means `model._component_=some.component`.
fn component_shorthand(config: &Config, key: String, value: &Value) -> Result<String> {
    match config.get(&key) {
        Some(node) if is_component_node(node) => {
            if value.is_string() {
                Ok(format!("{key}._component_"))
            } else {
                bail!(
                    "`{key}` is a component node: `{key}=<dotted.name>` replaces its _component_, \
                     `{key}.<arg>=<value>` sets an argument, and `~{key}` deletes the node; it cannot \
                     become {}",
                    kind_of(value)
                )
            }
        }
        _ => Ok(key),
    }
}

/// A new top-level key that some component node takes as an argument is almost surely meant for
/// that node (torchtune would add it at the top level, where nothing reads it), unless a recipe
/// reads it there (`output_dir`, `resume_from_checkpoint`) or the config refers to it (`${key}`).
fn check_new_top_level_key(config: &Config, key: &str, raw: &str) -> Result<()> {
    let read_by_a_recipe = crate::recipe::all()
        .iter()
        .any(|r| r.top_level_keys().contains(&key));
    if read_by_a_recipe || refers_to(&config.root, key) {
        return Ok(());
    }
    let mut candidates = Vec::new();
    let mut owners = Vec::new();
    for (path, node) in config.component_nodes() {
        let Some(component) = component_name(node).and_then(|n| registry::lookup(n).ok()) else {
            continue;
        };
        if !path.is_empty() && component.arg(key).is_some() {
            candidates.push(format!("{path}.{key}={raw}"));
            owners.push(component.path);
        }
    }
    if candidates.is_empty() {
        return Ok(());
    }
    bail!(
        "unknown top-level key `{key}` (torchtune would silently ignore it); did you mean {}? \
         (`{key}` is an argument of {})",
        candidates.join(" or "),
        owners.join(", ")
    )
}

/// Walks the key's path; where it enters a component node, checks the next segment against the
/// component's arguments: an unknown one is an error. Returns the spec of the argument the key
/// sets, if it sets one, and any problem with the value's type (reported after the more specific
/// checks of [`check_surprising`]).
fn check_component_key(
    config: &Config,
    key: &str,
    value: &Value,
) -> Result<(Option<&'static ArgSpec>, Option<String>)> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = Some(&config.root);
    let mut spec = None;
    let mut type_problem = None;
    for (i, part) in parts.iter().enumerate() {
        let Some(here) = node else { break };
        let is_last = i + 1 == parts.len();
        if *part != "_component_" {
            if let Some(component) = component_name(here).and_then(|n| registry::lookup(n).ok()) {
                // The value's type is checked only where it is final (no `${...}` left in it).
                let type_check = is_last && !has_interpolation(value);
                let mut mini = Mapping::new();
                let checked_value = if type_check {
                    value.clone()
                } else {
                    Value::Null
                };
                mini.insert(Value::String(part.to_string()), checked_value);
                let problems: Vec<String> = args::check(component, &Value::Mapping(mini))
                    .into_iter()
                    .map(|p| p.0)
                    .filter(|p| !p.contains("missing required argument"))
                    .filter(|p| type_check || p.starts_with("unknown key"))
                    .collect();
                let at = parts[..i].join(".");
                match problems.first() {
                    Some(p) if p.starts_with("unknown key") => bail!("{at}: {p}"),
                    Some(p) => type_problem = Some(format!("{at}: {p}")),
                    None => {}
                }
                if is_last {
                    spec = component.arg(part);
                }
            }
        }
        node = child(here, part);
    }
    Ok((spec, type_problem))
}

/// Whether any string under `value` interpolates `key` (`${key}` or `${key.sub}`).
pub(crate) fn refers_to(value: &Value, key: &str) -> bool {
    match value {
        Value::String(s) => s.match_indices("${").any(|(i, _)| {
            let Some(after) = s[i + 2..].trim_start().strip_prefix(key) else {
                return false;
            };
            after.trim_start().starts_with(['}', '.'])
        }),
        Value::Sequence(items) => items.iter().any(|v| refers_to(v, key)),
        Value::Mapping(m) => m.values().any(|v| refers_to(v, key)),
        _ => false,
    }
}

fn has_interpolation(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains("${"),
        Value::Sequence(s) => s.iter().any(has_interpolation),
        Value::Mapping(m) => m.values().any(has_interpolation),
        _ => false,
    }
}

/// Values that parse but cannot be what the user meant.
/// `current` is the value the key has now, if any.
fn check_surprising(
    key: &str,
    value: &Value,
    spec: Option<&ArgSpec>,
    current: Option<&Value>,
) -> Result<()> {
    let ty = spec.map(|s| s.ty);
    // A list written as a quoted string (torchtune issue #1486) where a list belongs; elsewhere
    // (a prompt) brackets are text.
    let list_expected = matches!(
        ty,
        Some(ArgType::StrList | ArgType::FloatList | ArgType::StrOrList | ArgType::Any)
    ) || current.is_some_and(Value::is_sequence);
    match value {
        Value::String(s) if list_expected && looks_like_list(s) => bail!(
            "`{key}` would get the string {s:?}, not a list: the brackets were quoted. \
             Write {key}=[a,b] (for the shell, quote the whole override: '{key}=[a, b]')"
        ),
        Value::String(s) if matches!(ty, Some(ArgType::StrList | ArgType::FloatList)) => bail!(
            "`{key}` takes a list, but got the string {s:?}; write {key}=[{}]",
            // A Python tuple, `(0.9,0.999)`, is written as a list here.
            s.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split(',')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Value::String(s) if ty == Some(ArgType::StrOrList) && s.contains(',') => bail!(
            "`{key}` got the string {s:?}, which holds commas; for several values write {key}=[{}]",
            s.split(',').map(str::trim).collect::<Vec<_>>().join(",")
        ),
        Value::Sequence(items) if items.is_empty() => bail!(
            "`{key}=[]` is an empty list, which is almost never intended; list the items{}, or \
             delete the key with ~{key}",
            if key.ends_with("lora_attn_modules") {
                format!(", e.g. {key}=[q_proj,v_proj]")
            } else {
                String::new()
            }
        ),
        Value::Sequence(items) => {
            for item in items {
                if let Value::String(s) = item {
                    if s.contains(['[', ']', '\'', '"']) {
                        bail!(
                            "item {s:?} of `{key}` holds quotes or brackets: the list was quoted \
                             more than once; write {key}=[a,b] or {key}=['a','b']"
                        );
                    }
                    if ty == Some(ArgType::StrList) && s.contains(',') {
                        bail!("item {s:?} of `{key}` holds a comma; write {key}=[a,b]");
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn looks_like_list(s: &str) -> bool {
    let t = s.trim();
    t.starts_with('[') && t.ends_with(']')
}
