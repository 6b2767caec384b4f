//! The Hugging Face Hub parts of `tune`, against a tiny stand-in for the Hub on 127.0.0.1 (the
//! endpoint comes from HF_ENDPOINT):
//! - `tune download`: the files land in --output-dir, --ignore-patterns filters them,
//!   `original_repo_id.json` is written, a gated repo is explained, and a failure leaves nothing;
//! - a Hub dataset in a training run: its card's config (`name`) says which files to read, and
//!   only the wanted split's files are downloaded.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const FILES: &[(&str, &str)] = &[
    ("config.json", "{\"dim\": 64}\n"),
    ("model.safetensors", "not really safetensors"),
    ("sub/notes.txt", "hello from a subfolder\n"),
];

/// A dataset laid out as Hugging Face's Parquet conversion lays out wikitext: one folder per
/// config, named in the card, beside a top-level file no config reads.
const WIKI_FILES: &[(&str, &str)] = &[
    (
        "README.md",
        "---\nconfigs:\n- config_name: wikitext-103-v1\n  data_files:\n  - split: train\n    \
         path: wikitext-103-v1/train-*\n  - split: test\n    path: wikitext-103-v1/test-*\n\
         - config_name: wikitext-2-v1\n  data_files:\n  - split: train\n    path: \
         wikitext-2-v1/train-*\n---\n# wikitext\n",
    ),
    (
        "wikitext-103-v1/train-00000-of-00001.jsonl",
        "{\"page\": \"Once upon a time there was a little girl named Lily.\"}\n\
         {\"page\": \"She liked to play in the park with her friends.\"}\n",
    ),
    (
        "wikitext-103-v1/test-00000-of-00001.jsonl",
        "{\"page\": \"never downloaded\"}\n",
    ),
    (
        "wikitext-2-v1/train-00000-of-00001.jsonl",
        "{\"page\": \"a smaller config\"}\n",
    ),
    ("train.jsonl", "{\"page\": \"outside every config\"}\n"),
];

/// A repository's files: (name, content).
type Files = &'static [(&'static str, &'static str)];

/// The stand-in's repositories: (API kind, id, URL prefix of its files, files).
const REPOS: &[(&str, &str, &str, Files)] = &[
    ("models", "org/tiny", "/org/tiny", FILES),
    ("datasets", "org/wiki", "/datasets/org/wiki", WIKI_FILES),
];

/// The stand-in Hub's address and the paths requested of it so far.
struct FakeHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

/// Serves the Hub's endpoints that hf-hub's sync API calls, one request per connection.
fn fake_hub() -> String {
    serve_hub().endpoint
}

fn serve_hub() -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = serve(stream, &log);
        }
    });
    FakeHub {
        endpoint: format!("http://{addr}"),
        requests,
    }
}

fn serve(mut stream: TcpStream, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(path.clone());
    let mut range_start = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_start = v
                .trim()
                .split('-')
                .next()
                .and_then(|s| s.parse::<usize>().ok());
        }
    }
    let listing = REPOS
        .iter()
        .find(|(kind, id, _, _)| path == format!("/api/{kind}/{id}/revision/main"));
    let file = REPOS.iter().find_map(|(_, _, prefix, files)| {
        files
            .iter()
            .enumerate()
            .find(|(_, (f, _))| path == format!("{prefix}/resolve/main/{f}"))
    });
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) =
        if let Some((_, _, _, files)) = listing {
            let siblings: Vec<String> = files
                .iter()
                .map(|(f, _)| format!("{{\"rfilename\": \"{f}\"}}"))
                .collect();
            let body = format!(
                "{{\"sha\": \"abc123\", \"siblings\": [{}]}}",
                siblings.join(", ")
            );
            (
                "200 OK",
                vec!["Content-Type: application/json".into()],
                body.into_bytes(),
            )
        } else if path.starts_with("/api/models/org/gated/") {
            ("401 Unauthorized", vec![], b"gated".to_vec())
        } else if let Some((i, (_, text))) = file {
            let start = range_start.unwrap_or(0).min(text.len());
            let body = text.as_bytes()[start..].to_vec();
            let headers = vec![
                "x-repo-commit: abc123".to_string(),
                format!("etag: \"etag{i}-{}\"", text.len()),
                format!(
                    "content-range: bytes {start}-{}/{}",
                    text.len().saturating_sub(1),
                    text.len()
                ),
            ];
            ("206 Partial Content", headers, body)
        } else {
            ("404 Not Found", vec![], b"not found".to_vec())
        };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    )?;
    for h in headers {
        write!(stream, "{h}\r\n")?;
    }
    stream.write_all(b"\r\n")?;
    stream.write_all(&body)?;
    stream.flush()
}

fn download(endpoint: &str, cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tune"))
        .arg("download")
        .args(args)
        .current_dir(cwd)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tune-download-"))
        .collect()
}

#[test]
fn downloads_a_snapshot_with_ignore_patterns() {
    let hub = fake_hub();
    let dir = tempfile::tempdir().unwrap();
    let o = download(
        &hub,
        dir.path(),
        &[
            "org/tiny",
            "--output-dir",
            "models/tiny",
            "--ignore-patterns",
            "*.safetensors",
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    let out = dir.path().join("models/tiny");
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        FILES[0].1
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sub/notes.txt")).unwrap(),
        FILES[2].1
    );
    assert!(
        !out.join("model.safetensors").exists(),
        "ignored by pattern"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("original_repo_id.json")).unwrap())
            .unwrap();
    assert_eq!(record, serde_json::json!({"repo_id": "org/tiny"}));
    assert!(leftovers(&dir.path().join("models")).is_empty());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("Successfully downloaded model repo"),
        "{stdout}"
    );

    // Again, into the existing directory: files are merged, others kept.
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let o = download(
        &hub,
        dir.path(),
        &["org/tiny", "--output-dir", "models/tiny"],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("model.safetensors")).unwrap(),
        FILES[1].1
    );
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "keep"
    );
    assert!(leftovers(&dir.path().join("models")).is_empty());
}

#[test]
fn gated_and_missing_repos_are_explained_and_leave_nothing() {
    let hub = fake_hub();
    let dir = tempfile::tempdir().unwrap();
    let o = download(
        &hub,
        dir.path(),
        &["org/gated", "--output-dir", "out/gated"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("gated repository") && err.contains("--hf-token"),
        "{err}"
    );
    let o = download(
        &hub,
        dir.path(),
        &["org/nothing", "--output-dir", "out/nothing"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Repository 'org/nothing' not found"), "{err}");
    // torchtune's other source is refused before anything is fetched.
    let o = download(&hub, dir.path(), &["org/tiny", "--source", "kaggle"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--source kaggle is not supported"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing may be created"
    );
}

/// `wikitext_dataset` over a Hub dataset: the card's config names the files (not the top-level
/// `train.jsonl` that file-name splitting would also take), and the test split's file is never
/// downloaded. A config the card lacks is named with the ones it has.
#[test]
fn a_hub_datasets_card_config_picks_the_files_a_run_downloads() {
    let hub = serve_hub();
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tune"))
            .args([
                "run",
                "lora_finetune_single_device",
                "--config",
                "stories260K/lora_text_completion",
                "dataset._component_=torchtune.datasets.wikitext_dataset",
                "dataset.source=org/wiki",
                "~dataset.data_files",
                "~dataset.split_across_pack",
                "tokenizer.max_seq_len=32",
                "max_steps_per_epoch=1",
                "epochs=1",
                "batch_size=1",
                &format!("output_dir={}", out.display()),
            ])
            .args(extra)
            .current_dir(&repo)
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", dir.path().join("hf"))
            .env_remove("HF_TOKEN")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(!show(&o).contains("ignoring"), "{}", show(&o));
    let requests = hub.requests.lock().unwrap().clone();
    let fetched = |file: &str| requests.iter().any(|r| r.ends_with(file));
    assert!(fetched("/README.md"), "{requests:?}");
    assert!(
        fetched("wikitext-103-v1/train-00000-of-00001.jsonl"),
        "{requests:?}"
    );
    for never in [
        "test-00000-of-00001.jsonl",
        "main/train.jsonl",
        "wikitext-2-v1/train",
    ] {
        assert!(!fetched(never), "{never} fetched: {requests:?}");
    }
    let log = std::fs::read_dir(out.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(log.contains("Step 1 | loss:"), "{log}");

    let o = run(&["dataset.subset=wikitext-2-raw-v1"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no config \"wikitext-2-raw-v1\"")
            && err.contains("wikitext-103-v1, wikitext-2-v1"),
        "{err}"
    );
}
