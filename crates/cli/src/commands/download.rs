//! `tune download`: a snapshot of a Hugging Face Hub repo, written atomically.
//!
//! Files download into a hidden temporary directory next to the target and are moved into
//! place only when every file has arrived, so a failed download (no network, gated repo, full
//! disk) leaves no partial output directory behind. `original_repo_id.json` records the repo id
//! (PEFT's `base_model_name_or_path` when adapters are saved).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};

/// Download a model from the Hugging Face Hub.
///
/// Examples:
///   $ tune download meta-llama/Llama-2-7b-hf --output-dir /tmp/Llama-2-7b-hf --ignore-patterns "*.safetensors" --hf-token <HF_TOKEN>
///
/// The endpoint can be changed with HF_ENDPOINT (e.g. a mirror).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Name of the repository on the Hugging Face Hub, e.g. meta-llama/Llama-2-7b-hf.
    pub repo_id: String,
    /// Directory in which to save the model. Defaults to `/tmp/<model_name>`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Hugging Face API token. Needed for gated models like Llama2.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
    /// Files matching this glob pattern are not downloaded, e.g. '*.safetensors'. Repeat the
    /// option for several patterns.
    #[arg(long, value_name = "PATTERN")]
    pub ignore_patterns: Vec<String>,
    /// Where to download from: `huggingface` (torchtune's other source, `kaggle`, is not
    /// supported).
    #[arg(long, value_name = "SOURCE", default_value = "huggingface")]
    pub source: String,
}

/// The file recording which repo a checkpoint came from.
pub const REPO_ID_FILE: &str = "original_repo_id.json";

pub fn run(args: &Args) -> Result<()> {
    match args.source.as_str() {
        "huggingface" => {}
        "kaggle" => bail!(
            "--source kaggle is not supported: tune-rs downloads from the Hugging Face Hub (the \
             Llama-2 models are there, e.g. meta-llama/Llama-2-7b-hf); drop --source"
        ),
        other => bail!("--source {other:?}: expected huggingface"),
    }
    let repo_id = args.repo_id.trim();
    if repo_id.is_empty() || repo_id.split('/').count() > 2 || repo_id.split('/').any(str::is_empty)
    {
        bail!("`{repo_id}` is not a repo id; write it as <owner>/<name>, e.g. meta-llama/Llama-2-7b-hf");
    }
    let output_dir = match &args.output_dir {
        Some(dir) => dir.clone(),
        None => Path::new("/tmp").join(repo_id.rsplit('/').next().unwrap_or(repo_id)),
    };
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    println!(
        "Ignoring files matching the following patterns: {:?}",
        args.ignore_patterns
    );

    // Ask for the file list before creating anything, so an unreachable hub leaves no trace.
    let builder = ApiBuilder::new()
        .with_endpoint(endpoint.clone())
        .with_token(args.hf_token.clone().filter(|t| !t.is_empty()))
        .with_progress(std::io::stderr().is_terminal());
    let api = builder
        .build()
        .context("cannot set up the Hugging Face client")?;
    let info = api
        .model(repo_id.to_string())
        .info()
        .map_err(|e| explain(e, repo_id, &endpoint, args))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| !args.ignore_patterns.iter().any(|p| glob_match(p, f)))
        .collect();
    // The Hub's listing names the files; a name that leaves the output folder is refused
    // before anything is written.
    if let Some(bad) = files.iter().find(|f| !stays_inside(f)) {
        bail!(
            "{repo_id} lists a file named {bad:?}, which would be written outside the output \
             folder; nothing was downloaded (is the endpoint a real Hugging Face Hub?)"
        );
    }

    let parent = match output_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".tune-download-")
        .tempdir_in(&parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    let cache = staging.path().join("cache");
    let snapshot = staging.path().join("snapshot");

    // A second client whose cache lives in the staging directory, on the target's filesystem,
    // so finished files can be renamed into place instead of copied.
    let api = ApiBuilder::new()
        .with_endpoint(endpoint.clone())
        .with_token(args.hf_token.clone().filter(|t| !t.is_empty()))
        .with_progress(std::io::stderr().is_terminal())
        .with_cache_dir(cache)
        .build()?;
    let repo = api.model(repo_id.to_string());
    for file in &files {
        tracing::info!("downloading {file}");
        let cached = repo
            .download(file)
            .map_err(|e| explain(e, repo_id, &endpoint, args))?;
        let blob = cached
            .canonicalize()
            .with_context(|| format!("downloaded {file} is missing"))?;
        let dest = snapshot.join(file);
        std::fs::create_dir_all(dest.parent().expect("a file has a parent"))?;
        std::fs::rename(&blob, &dest).with_context(|| format!("cannot move {file} into place"))?;
    }
    std::fs::create_dir_all(&snapshot)?;
    let record = serde_json::to_string_pretty(&serde_json::json!({ "repo_id": repo_id }))?;
    std::fs::write(snapshot.join(REPO_ID_FILE), record + "\n")?;

    let written = move_into_place(&snapshot, &output_dir)?;
    println!("Successfully downloaded model repo and wrote to the following locations:");
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Turns hf-hub's errors into what to do about them.
fn explain(e: ApiError, repo_id: &str, endpoint: &str, args: &Args) -> anyhow::Error {
    if let ApiError::RequestError(inner) = &e {
        match inner.as_ref() {
            ureq::Error::Status(401 | 403, _) if args.hf_token.is_some() => {
                return anyhow!(
                    "It looks like you are trying to access a gated repository ({repo_id}). Please \
                     ensure you have access to the repository (request it on its Hub page)."
                )
            }
            ureq::Error::Status(401 | 403, _) => {
                return anyhow!(
                    "It looks like you are trying to access a gated repository ({repo_id}). Please \
                     ensure you have access to the repository and have provided the proper Hugging \
                     Face API token using the option `--hf-token` or the HF_TOKEN environment variable."
                )
            }
            ureq::Error::Status(404, _) => {
                return anyhow!(
                    "Repository '{repo_id}' not found on the Hugging Face Hub (check the name; a \
                     private repo also needs --hf-token)."
                )
            }
            ureq::Error::Transport(t) => {
                return anyhow!(
                    "cannot reach the Hugging Face Hub at {endpoint} to download {repo_id}: {t}. \
                     Check the network connection (or HF_ENDPOINT); nothing was written."
                )
            }
            _ => {}
        }
    }
    anyhow!("Failed to download {repo_id}: {e}; nothing was written.")
}

/// Moves the finished snapshot to `output_dir` (merging into it if it exists) and returns the
/// top-level paths written.
fn move_into_place(snapshot: &Path, output_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written: Vec<PathBuf> = std::fs::read_dir(snapshot)?
        .map(|e| e.map(|e| output_dir.join(e.file_name())))
        .collect::<std::io::Result<_>>()?;
    written.sort();
    if !output_dir.exists() {
        std::fs::rename(snapshot, output_dir)
            .with_context(|| format!("cannot move the download to {}", output_dir.display()))?;
        return Ok(written);
    }
    if !output_dir.is_dir() {
        bail!(
            "{} exists and is not a directory; choose another --output-dir",
            output_dir.display()
        );
    }
    merge(snapshot, output_dir)?;
    Ok(written)
}

fn merge(from: &Path, into: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = into.join(entry.file_name());
        if entry.file_type()?.is_dir() && target.is_dir() {
            merge(&entry.path(), &target)?;
        } else {
            if target.is_dir() {
                std::fs::remove_dir_all(&target)?;
            }
            std::fs::rename(entry.path(), &target)
                .with_context(|| format!("cannot move the download to {}", target.display()))?;
        }
    }
    Ok(())
}

/// `fnmatch`-style matching, as huggingface_hub applies `ignore_patterns`: `*` matches any run
/// of characters (including `/`), `?` one character, `[abc]`/`[!abc]`/`[a-z]` a set.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches_from(&p, &n)
}

fn matches_from(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| matches_from(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && matches_from(&p[1..], &n[1..]),
        Some('[') => match (n.first(), p.iter().position(|c| *c == ']')) {
            (Some(c), Some(close)) if close > 1 => {
                let set = &p[1..close];
                let (negated, set) = match set.first() {
                    Some('!') => (true, &set[1..]),
                    _ => (false, set),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= *c && *c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == *c;
                        i += 1;
                    }
                }
                hit != negated && matches_from(&p[close + 1..], &n[1..])
            }
            (Some(c), _) => *c == '[' && matches_from(&p[1..], &n[1..]),
            (None, _) => false,
        },
        Some(c) => n.first() == Some(c) && matches_from(&p[1..], &n[1..]),
    }
}

/// Whether a repository file name is a relative path that stays below the folder it goes in.
fn stays_inside(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::{glob_match, stays_inside};

    /// Only relative names below the output folder are written.
    #[test]
    fn file_names_must_stay_inside_the_output_folder() {
        for inside in ["config.json", "original/tokenizer.model", "./a/b.bin"] {
            assert!(stays_inside(inside), "{inside}");
        }
        for outside in ["", "/tmp/x.txt", "../escape.txt", "a/../../b", "a/../b"] {
            assert!(!stays_inside(outside), "{outside}");
        }
    }

    #[test]
    fn fnmatch_patterns() {
        assert!(glob_match(
            "*.safetensors",
            "model-00001-of-00002.safetensors"
        ));
        assert!(glob_match("*.safetensors", "sub/dir/model.safetensors"));
        assert!(!glob_match("*.safetensors", "model.safetensors.index.json"));
        assert!(glob_match("original/*", "original/consolidated.00.pth"));
        assert!(glob_match("model-0000?-of-*", "model-00001-of-00002.bin"));
        assert!(glob_match("*.[bp]in", "pytorch_model.bin"));
        assert!(!glob_match("*.[!b]in", "pytorch_model.bin"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("tokenizer.json", "tokenizer.model"));
    }
}
