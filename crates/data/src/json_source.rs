//! Local data files, as Hugging Face `load_dataset("json" | "text" | "parquet", data_files=...,
//! split=...)` reads them. A JSON file is a JSON array of objects, JSON Lines (one object per
//! line), an object with the rows under `field`, or an object of equal-length columns; a text
//! file gives one row `{"text": ...}` per line (or per paragraph, or one for the whole file); a
//! Parquet file gives its rows, nested lists and structs as JSON arrays and objects. Splits select rows with
//! the `datasets` slicing syntax: `train`, `train[:100]`, `train[10:-10]`, `train[:10%]`,
//! `train[:50%]+train[-10%:]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// One row and where it came from (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub file: PathBuf,
    /// 0-based position of the row in its file.
    pub index: usize,
    /// 1-based line, for JSON Lines and CSV files.
    pub line: Option<usize>,
    pub columns: Map<String, Value>,
}

impl Row {
    /// "file.json row 3" / "file.jsonl line 4".
    pub fn location(&self) -> String {
        match self.line {
            Some(line) => format!("{} line {line}", self.file.display()),
            None => format!("{} row {}", self.file.display(), self.index),
        }
    }
}

/// `data_files`: a file or list of files (the `train` split), or a mapping split -> file(s).
#[derive(Debug, Clone, PartialEq)]
pub enum DataFiles {
    Train(Vec<PathBuf>),
    Splits(BTreeMap<String, Vec<PathBuf>>),
}

impl DataFiles {
    /// From a config value: a string, a list of strings, or a mapping of split names to either.
    pub fn from_config(value: &serde_yaml::Value) -> Result<Self> {
        fn list(v: &serde_yaml::Value) -> Result<Vec<PathBuf>> {
            match v {
                serde_yaml::Value::String(s) => Ok(vec![PathBuf::from(s)]),
                serde_yaml::Value::Sequence(items) => items
                    .iter()
                    .map(|i| i.as_str().map(PathBuf::from).ok_or_else(|| anyhow!("data_files entries must be paths")))
                    .collect(),
                _ => bail!("data_files must be a path, a list of paths, or a mapping of split name to paths"),
            }
        }
        match value {
            serde_yaml::Value::Mapping(m) => {
                let mut splits = BTreeMap::new();
                for (k, v) in m {
                    let k = k
                        .as_str()
                        .ok_or_else(|| anyhow!("data_files split names must be strings"))?;
                    splits.insert(k.to_string(), list(v)?);
                }
                Ok(DataFiles::Splits(splits))
            }
            other => Ok(DataFiles::Train(list(other)?)),
        }
    }

    /// These files with relative paths taken from `dir` (a `data_dir`).
    pub fn relative_to(self, dir: &Path) -> Self {
        let join = |f: PathBuf| if f.is_absolute() { f } else { dir.join(f) };
        self.try_map(|files| Ok(files.into_iter().map(join).collect()))
            .expect("joining paths cannot fail")
    }

    /// Every entry that is a glob pattern (`data/*.jsonl`, `**/train*.json`) replaced by the
    /// matching names among `candidates` (local paths when `None`), each pattern's matches
    /// sorted, as Hugging Face resolves `data_files`. A pattern that matches nothing is an error.
    pub fn expand_patterns(self, candidates: Option<&[String]>) -> Result<Self> {
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        self.try_map(|files| {
            let mut out = Vec::new();
            for file in files {
                let text = file.to_string_lossy().into_owned();
                if !text.contains(['*', '?', '[']) {
                    out.push(file);
                    continue;
                }
                let text = hugging_face_pattern(&text);
                let mut matches: Vec<PathBuf> = match candidates {
                    None => glob::glob_with(&text, options)
                        .with_context(|| format!("data_files pattern {text:?}"))?
                        .filter_map(std::result::Result::ok)
                        .filter(|p| p.is_file())
                        .collect(),
                    Some(names) => {
                        let pattern = glob::Pattern::new(&text)
                            .with_context(|| format!("data_files pattern {text:?}"))?;
                        names
                            .iter()
                            .filter(|n| pattern.matches_with(n, options))
                            .map(PathBuf::from)
                            .collect()
                    }
                };
                matches.retain(|m| !ignored_match(&text, &m.to_string_lossy()));
                if matches.is_empty() {
                    bail!("data_files pattern {text:?} matches no file");
                }
                matches.sort();
                out.extend(matches);
            }
            Ok(out)
        })
    }

    /// The same files with those of splits other than `wanted` left out (their names stay, so
    /// asking for one still says it exists).
    pub fn only_splits(self, wanted: &[String]) -> Self {
        match self {
            DataFiles::Train(files) => DataFiles::Train(files),
            DataFiles::Splits(map) => DataFiles::Splits(
                map.into_iter()
                    .map(|(split, files)| match wanted.contains(&split) {
                        true => (split, files),
                        false => (split, Vec::new()),
                    })
                    .collect(),
            ),
        }
    }

    /// Every file list transformed by `f`.
    pub fn try_map(self, mut f: impl FnMut(Vec<PathBuf>) -> Result<Vec<PathBuf>>) -> Result<Self> {
        Ok(match self {
            DataFiles::Train(files) => DataFiles::Train(f(files)?),
            DataFiles::Splits(map) => DataFiles::Splits(
                map.into_iter()
                    .map(|(k, v)| Ok((k, f(v)?)))
                    .collect::<Result<_>>()?,
            ),
        })
    }

    /// Every file, all splits.
    pub fn all(&self) -> Vec<&PathBuf> {
        match self {
            DataFiles::Train(files) => files.iter().collect(),
            DataFiles::Splits(map) => map.values().flatten().collect(),
        }
    }

    /// The files of split `name`.
    pub fn split(&self, name: &str) -> Result<&[PathBuf]> {
        match self {
            DataFiles::Train(files) if name == "train" => Ok(files),
            DataFiles::Train(_) => bail!(
                "split {name:?} does not exist: data_files given as a path or list form the single split \"train\" \
                 (use split: train, or a slice such as train[:90%]; or give data_files as a mapping {{{name}: path}})"
            ),
            DataFiles::Splits(map) => map.get(name).map(Vec::as_slice).ok_or_else(|| {
                anyhow!(
                    "split {name:?} does not exist; the data files make the splits: {}",
                    map.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
        }
    }
}

/// Files Hugging Face's data-file patterns never pick: hidden or `__` paths and its own metadata.
pub fn skipped_by_hugging_face(name: &str) -> bool {
    name.split('/')
        .any(|part| part.starts_with('.') || part.starts_with("__"))
        || matches!(
            name.rsplit('/').next().unwrap_or(name),
            "README.md"
                | "config.json"
                | "dataset_info.json"
                | "dataset_infos.json"
                | "dataset_dict.json"
                | "dummy_data.zip"
        )
}

/// A pattern as Hugging Face (fsspec) reads it: `**` inside a name is `*`, and a trailing `**`
/// is every file below (the glob crate's alone would match only folders).
fn hugging_face_pattern(pattern: &str) -> String {
    let parts: Vec<String> = pattern
        .split('/')
        .map(|part| match part {
            "**" => part.to_string(),
            _ => part.replace("**", "*"),
        })
        .collect();
    let mut out = parts.join("/");
    if parts.last().is_some_and(|last| last == "**") {
        out.push_str("/*");
    }
    out
}

/// Whether a file a pattern matched is one Hugging Face leaves out: only the part of its name
/// below the pattern's fixed folders counts (a hidden folder the pattern names is fine).
fn ignored_match(pattern: &str, matched: &str) -> bool {
    let fixed = pattern
        .split('/')
        .take_while(|part| !part.contains(['*', '?', '[']))
        .count();
    let below: Vec<&str> = matched.split('/').skip(fixed).collect();
    !below.is_empty() && skipped_by_hugging_face(&below.join("/"))
}

/// Reads a data file as text: a missing file points at `data_files`, bytes that are not UTF-8 are
/// named by line and byte offset.
fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read data file {}: check `data_files` (relative paths are from the current \
             directory)",
            path.display()
        )
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..valid];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!(
            "data file {} is not UTF-8: line {line} (byte {valid}) holds bytes that are not; \
             convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            path.display()
        )
    })
}

/// Reads every row of one file. `field` picks the rows out of a top-level object.
pub fn read_rows(path: &Path, field: Option<&str>) -> Result<Vec<Row>> {
    let text = read_utf8(path)?;
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let trimmed = body.trim_start();
    let row = |index, line, value: Value| -> Result<Row> {
        match value {
            Value::Object(columns) => Ok(Row { file: path.to_path_buf(), index, line, columns }),
            // A list of strings is one `text` column, as Hugging Face's JSON loader reads it.
            Value::String(text) => {
                let columns = Map::from_iter([("text".to_string(), Value::String(text))]);
                Ok(Row { file: path.to_path_buf(), index, line, columns })
            }
            other => bail!(
                "{}: row {index} is {}, not an object of columns (expected rows like {{\"instruction\": ..., \"output\": ...}})",
                path.display(),
                kind(&other)
            ),
        }
    };
    let whole: Option<Value> = if trimmed.starts_with('[') || field.is_some() {
        Some(
            serde_json::from_str(trimmed)
                .with_context(|| format!("{} is not valid JSON", path.display()))?,
        )
    } else {
        serde_json::from_str(trimmed).ok()
    };
    let whole = match (whole, field) {
        (Some(Value::Object(mut obj)), Some(field)) => {
            Some(obj.remove(field).ok_or_else(|| {
                anyhow!(
                    "{}: no top-level key {field:?} (the `field` argument); keys: {}",
                    path.display(),
                    obj.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?)
        }
        (_, Some(field)) => bail!(
            "{}: `field: {field}` needs a top-level JSON object",
            path.display()
        ),
        (w, None) => w,
    };
    match whole {
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| row(i, None, v))
            .collect(),
        // Rows kept under one key (`{"data": [{...}, ...]}`): Hugging Face would read a single
        // column of objects, which no dataset builder takes; `field` names the key.
        Some(Value::Object(obj))
            if obj.len() == 1
                && obj
                    .values()
                    .all(|v| v.as_array().is_some_and(|a| a.iter().all(Value::is_object)))
                && trimmed.trim_end().contains('\n') =>
        {
            let key = obj.keys().next().expect("one key");
            bail!(
                "{}: the rows are under the top-level key {key:?}; add `field: {key}` to the \
                 dataset node (dataset.field={key}) to read them",
                path.display()
            )
        }
        // An object of equal-length columns; on a single line it is one JSON Lines row whose
        // values happen to be lists (a conversation), as Hugging Face's reader takes it.
        Some(Value::Object(obj))
            if !obj.is_empty()
                && obj.values().all(Value::is_array)
                && trimmed.trim_end().contains('\n') =>
        {
            columns_to_rows(path, obj)
        }
        // A single object on one line is a one-row JSON Lines file.
        Some(Value::Object(obj)) => Ok(vec![row(0, Some(1), Value::Object(obj))?]),
        Some(other) => bail!(
            "{}: expected a JSON array of rows, found {}",
            path.display(),
            kind(&other)
        ),
        None => {
            let mut rows = Vec::new();
            for (n, line) in body.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(line).with_context(|| {
                    format!(
                        "{} line {}: malformed JSON (a data file must be a JSON array of objects, or JSON Lines with one object per line)",
                        path.display(),
                        n + 1
                    )
                })?;
                let index = rows.len();
                rows.push(row(index, Some(n + 1), value)?);
            }
            Ok(rows)
        }
    }
}

/// Cells that pandas' `read_csv` (which Hugging Face's csv builder uses) reads as missing: they
/// become null, as in the Arrow table torchtune receives.
const CSV_MISSING: &[&str] = &[
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// The rows of a CSV file with a header row, as `load_dataset("csv")` reads them through pandas:
/// one column per header name (a repeated name becomes `name.1`, `name.2`, an empty one
/// `Unnamed: i`), missing cells and the cells of a short row null, blank lines skipped. Cells
/// stay text (pandas would turn a column of numbers into numbers, which torchtune's text
/// datasets cannot use).
pub fn read_csv_rows(path: &Path) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| {
            format!(
                "cannot read data file {}: check `data_files` (relative paths are from the current directory)",
                path.display()
            )
        })?;
    let header = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header row", path.display()))?
        .clone();
    let names = csv_column_names(&header);
    let mut rows = Vec::new();
    let mut last_start: Option<csv::Position> = None;
    for record in reader.records() {
        let record = record.with_context(|| format!("{}: cannot read a row", path.display()))?;
        last_start = record.position().cloned();
        let line = record.position().map(|p| p.line() as usize);
        // pandas skips lines of nothing but whitespace.
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        if record.len() > names.len() {
            bail!(
                "{}: expected {} fields in line {}, saw {}: a row longer than the header (pandas \
                 would refuse it, or shift the columns if it is the first); fix that row",
                path.display(),
                names.len(),
                line.unwrap_or(0),
                record.len()
            );
        }
        let cell = |i: usize| match record.get(i) {
            Some(text) if !CSV_MISSING.contains(&text) => Value::String(text.to_string()),
            _ => Value::Null,
        };
        let columns = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), cell(i)))
            .collect();
        rows.push(Row {
            file: path.to_path_buf(),
            index: rows.len(),
            line,
            columns,
        });
    }
    // A quote never closed swallows the rest of the file into one cell (pandas refuses it:
    // "EOF inside string"); only the last record can hold one.
    if let Some(start) = last_start {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        if ends_inside_quotes(&bytes[(start.byte() as usize).min(bytes.len())..]) {
            bail!(
                "{}: the quoted field that starts in line {} is never closed, so the rest of the \
                 file would be one cell; add the closing quote",
                path.display(),
                start.line()
            );
        }
    }
    Ok(rows)
}

/// Whether CSV text ends inside a quoted field (a quote opens one only at a field's start,
/// and `""` inside it is an escaped quote, as csv-core reads them).
fn ends_inside_quotes(text: &[u8]) -> bool {
    let (mut in_quotes, mut at_field_start) = (false, true);
    let mut i = 0;
    while i < text.len() {
        let byte = text[i];
        if in_quotes {
            if byte == b'"' {
                if text.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    in_quotes = false;
                }
            }
        } else if byte == b'"' && at_field_start {
            in_quotes = true;
        }
        at_field_start = !in_quotes && matches!(byte, b',' | b'\n' | b'\r');
        i += 1;
    }
    in_quotes
}

/// pandas' column names for a header row: `Unnamed: i` for an empty one, and `name.1`,
/// `name.2`, ... for repeats (skipping names already taken).
fn csv_column_names(header: &csv::StringRecord) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (i, raw) in header.iter().enumerate() {
        let base = if raw.is_empty() {
            format!("Unnamed: {i}")
        } else {
            raw.to_string()
        };
        let mut name = base.clone();
        let mut n = 0;
        while names.contains(&name) {
            n += 1;
            name = format!("{base}.{n}");
        }
        names.push(name);
    }
    names
}

/// Reads every row of a Parquet file (the format of most Hugging Face Hub datasets).
pub fn read_parquet_rows(path: &Path) -> Result<Vec<Row>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot read data file {}: check `data_files` (relative paths are from the current directory)",
            path.display()
        )
    })?;
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
    let mut rows = Vec::new();
    for (index, row) in reader.into_iter().enumerate() {
        let row = row.with_context(|| {
            format!(
                "{} row {index}: cannot decode (tune-rs reads uncompressed, Snappy, gzip, Zstandard and LZ4 Parquet)",
                path.display()
            )
        })?;
        match row.to_json_value() {
            Value::Object(mut columns) => {
                // The crate writes binary columns as base64 text; Hugging Face hands them over
                // as bytes. Keep them bytes (a list of numbers), so using one as text is the
                // "is not text" error rather than training on base64.
                for (name, field) in row.get_column_iter() {
                    if let parquet::record::Field::Bytes(bytes) = field {
                        let numbers = bytes.data().iter().map(|&b| Value::from(b)).collect();
                        columns.insert(name.clone(), Value::Array(numbers));
                    }
                }
                rows.push(Row {
                    file: path.to_path_buf(),
                    index,
                    line: None,
                    columns,
                })
            }
            other => bail!(
                "{} row {index} is {}, not a record",
                path.display(),
                kind(&other)
            ),
        }
    }
    Ok(rows)
}

/// How `source: text` cuts a file into rows (Hugging Face's `sample_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextSampleBy {
    /// One row per line, empty lines included, line breaks removed.
    Line,
    /// One row per line with its line break kept (`keep_linebreaks: True`; the last line has
    /// none when the file does not end with one).
    LineKeepingBreaks,
    /// One row per block of text between blank lines (`"\n\n"`); empty blocks are skipped.
    Paragraph,
    /// The whole file as one row.
    Document,
}

impl TextSampleBy {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "line" => TextSampleBy::Line,
            "paragraph" => TextSampleBy::Paragraph,
            "document" => TextSampleBy::Document,
            other => bail!("unknown sample_by {other:?}; use line, paragraph or document"),
        })
    }
}

/// Reads a text file as rows `{"text": ...}`, as Hugging Face's `text` loader does: lines end
/// at `\n`, `\r\n` or `\r` only (universal-newline reading, then `readlines`), so form feeds and
/// Unicode separators stay inside their line. Deliberately unlike it, a leading UTF-8 byte-order
/// mark is dropped rather than trained on.
pub fn read_text_rows(path: &Path, sample_by: TextSampleBy) -> Result<Vec<Row>> {
    let text = read_utf8(path)?;
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let body = body.replace("\r\n", "\n").replace('\r', "\n");
    let pieces: Vec<&str> = match sample_by {
        TextSampleBy::Line => lines(&body),
        TextSampleBy::LineKeepingBreaks => body.split_inclusive('\n').collect(),
        TextSampleBy::Paragraph => body.split("\n\n").filter(|p| !p.is_empty()).collect(),
        TextSampleBy::Document => vec![body.as_str()],
    };
    Ok(pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| {
            let mut columns = Map::new();
            columns.insert("text".to_string(), Value::String(piece.to_string()));
            Row {
                file: path.to_path_buf(),
                index,
                line: matches!(
                    sample_by,
                    TextSampleBy::Line | TextSampleBy::LineKeepingBreaks
                )
                .then_some(index + 1),
                columns,
            }
        })
        .collect())
}

/// The lines of `text` (whose `\r` are already `\n`), without their ends; a final `\n` ends the
/// last line rather than starting an empty one.
fn lines(text: &str) -> Vec<&str> {
    if text.is_empty() {
        return Vec::new();
    }
    text.strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect()
}

fn columns_to_rows(path: &Path, obj: Map<String, Value>) -> Result<Vec<Row>> {
    let len = obj
        .values()
        .next()
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if let Some((k, _)) = obj
        .iter()
        .find(|(_, v)| v.as_array().map_or(0, Vec::len) != len)
    {
        bail!(
            "{}: column {k:?} has a different length than the others",
            path.display()
        );
    }
    let mut rows: Vec<Row> = (0..len)
        .map(|index| Row {
            file: path.to_path_buf(),
            index,
            line: None,
            columns: Map::new(),
        })
        .collect();
    for (k, v) in obj {
        if let Value::Array(items) = v {
            for (row, item) in rows.iter_mut().zip(items) {
                row.columns.insert(k.clone(), item);
            }
        }
    }
    Ok(rows)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One `name[from:to]` part of a split expression.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSlice {
    pub name: String,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub percent: bool,
    /// `(pct1_dropremainder)`: each percent is `len / 100` rows (rounded down), as in Hugging
    /// Face, instead of the closest row to the exact fraction.
    pub pct1_dropremainder: bool,
}

/// Parses a split expression (`train`, `train[:100]`, `train[10%:20%]`, `a+b[:5]`).
pub fn parse_split(spec: &str) -> Result<Vec<SplitSlice>> {
    let bad = |why: &str| {
        anyhow!("split {spec:?} is not valid ({why}); use e.g. train, train[:100], train[10:-10], train[:10%] or train[:50%]+train[-10%:]")
    };
    let mut out = Vec::new();
    for part in spec.split('+') {
        let part = part.trim();
        // A rounding suffix: `train[:10%](pct1_dropremainder)` or `(closest)`, the default.
        let (part, rounding) = match part.strip_suffix(')').and_then(|p| p.rsplit_once('(')) {
            Some((part, rounding)) => (part, Some(rounding)),
            None => (part, None),
        };
        let pct1_dropremainder = match rounding {
            None | Some("closest") => false,
            Some("pct1_dropremainder") => true,
            Some(_) => return Err(bad("rounding must be closest or pct1_dropremainder")),
        };
        let (name, slice) = match part.find('[') {
            None => (part, None),
            Some(i) => {
                let inner = part[i + 1..]
                    .strip_suffix(']')
                    .ok_or_else(|| bad("missing `]`"))?;
                (&part[..i], Some(inner))
            }
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(bad("bad split name"));
        }
        let mut s = SplitSlice {
            name: name.to_string(),
            from: None,
            to: None,
            percent: false,
            pct1_dropremainder,
        };
        if let Some(inner) = slice {
            let (a, b) = inner
                .split_once(':')
                .ok_or_else(|| bad("a slice needs `:`"))?;
            let mut units = Vec::new();
            let mut bound = |t: &str| -> Result<Option<i64>> {
                let t = t.trim();
                if t.is_empty() {
                    return Ok(None);
                }
                let (num, pct) = match t.strip_suffix('%') {
                    Some(n) => (n, true),
                    None => (t, false),
                };
                units.push(pct);
                let v: i64 = num
                    .parse()
                    .map_err(|_| bad("bounds must be integers or percentages"))?;
                if pct && !(-100..=100).contains(&v) {
                    return Err(bad("percentages must be between -100% and 100%"));
                }
                Ok(Some(v))
            };
            s.from = bound(a)?;
            s.to = bound(b)?;
            if units.windows(2).any(|w| w[0] != w[1]) {
                return Err(bad("both bounds must use the same unit"));
            }
            s.percent = units.first().copied().unwrap_or(false);
        }
        if rounding.is_some() && !s.percent {
            return Err(bad("a rounding applies to percent slices only"));
        }
        out.push(s);
    }
    Ok(out)
}

impl SplitSlice {
    /// The row range this slice selects out of `n` rows (Hugging Face `datasets` semantics:
    /// negative bounds count from the end, percentages round to the closest row, ties to even).
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        let n_i = n as i64;
        let abs = |v: i64| -> i64 {
            match (self.percent, self.pct1_dropremainder) {
                (true, true) => v * (n_i / 100),
                (true, false) => ((v as f64) * (n as f64) / 100.0).round_ties_even() as i64,
                (false, _) => v,
            }
        };
        let resolve = |v: Option<i64>, default: i64| -> usize {
            let v = v.map_or(default, abs);
            let v = if v < 0 { (n_i + v).max(0) } else { v.min(n_i) };
            v as usize
        };
        let from = resolve(self.from, 0);
        let to = resolve(self.to, n_i);
        from..to.max(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that are not UTF-8 are named by line, for JSON and text files alike.
    #[test]
    fn a_file_that_is_not_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        std::fs::write(&path, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
        let e = format!("{:#}", read_rows(&path, None).unwrap_err());
        assert!(e.contains("is not UTF-8: line 2 (byte 28)"), "{e}");
        let e = format!(
            "{:#}",
            read_text_rows(&path, TextSampleBy::Line).unwrap_err()
        );
        assert!(e.contains("line 2"), "{e}");
        let wrapped = dir.path().join("wrapped.json");
        std::fs::write(
            &wrapped,
            "{\"data\": [\n  {\"text\": \"a\"},\n  {\"text\": \"b\"}\n]}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_rows(&wrapped, None).unwrap_err());
        assert!(e.contains("add `field: data`"), "{e}");
        assert_eq!(read_rows(&wrapped, Some("data")).unwrap().len(), 2);
        let e = format!(
            "{:#}",
            read_rows(&dir.path().join("missing.json"), None).unwrap_err()
        );
        assert!(e.contains("check `data_files`"), "{e}");
    }

    fn rows(spec: &str, n: usize) -> Vec<(usize, usize)> {
        let slices = parse_split(spec).unwrap();
        slices
            .iter()
            .map(|s| s.range(n))
            .map(|r| (r.start, r.end))
            .collect()
    }

    #[test]
    fn split_slices_follow_datasets() {
        assert_eq!(rows("train", 10), [(0, 10)]);
        assert_eq!(rows("train[:3]", 10), [(0, 3)]);
        assert_eq!(rows("train[2:]", 10), [(2, 10)]);
        assert_eq!(rows("train[-3:]", 10), [(7, 10)]);
        assert_eq!(rows("train[:-3]", 10), [(0, 7)]);
        assert_eq!(rows("train[:100]", 10), [(0, 10)]);
        assert_eq!(rows("train[8:2]", 10), [(8, 8)]);
        assert_eq!(rows("train[:10%]", 7473), [(0, 747)]);
        // 25% of 10 = 2.5 rounds to even (2); 35% of 10 = 3.5 rounds to 4.
        assert_eq!(rows("train[:25%]", 10), [(0, 2)]);
        assert_eq!(rows("train[:35%]", 10), [(0, 4)]);
        assert_eq!(rows("train[:50%]+train[-10%:]", 10), [(0, 5), (9, 10)]);
        assert_eq!(parse_split("validation").unwrap()[0].name, "validation");
        // Rounding suffixes, checked against datasets 5.2's ReadInstruction.to_absolute.
        assert_eq!(rows("train[:33%](pct1_dropremainder)", 7473), [(0, 2442)]);
        assert_eq!(
            rows("train[-10%:](pct1_dropremainder)", 7473),
            [(6733, 7473)]
        );
        assert_eq!(
            rows("train[10%:20%](pct1_dropremainder)", 7473),
            [(740, 1480)]
        );
        assert_eq!(rows("train[:33%](closest)", 7473), [(0, 2466)]);
    }

    #[test]
    fn bad_splits_are_rejected() {
        for bad in [
            "train[:10",
            "train[5]",
            "train[:10%%]",
            "train[1:5%]",
            "train[:101%]",
            "[:5]",
            "train[a:b]",
            "train[:10](pct1_dropremainder)",
            "train[:10%](nearest)",
        ] {
            assert!(parse_split(bad).is_err(), "{bad}");
        }
    }
}
