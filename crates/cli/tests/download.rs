//! `tune download` against a tiny stand-in for the Hugging Face Hub on 127.0.0.1 (the endpoint
//! comes from HF_ENDPOINT): the files land in --output-dir, --ignore-patterns filters them,
//! `original_repo_id.json` is written, a gated repo is explained, and a failure leaves nothing.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};

const FILES: &[(&str, &str)] = &[
    ("config.json", "{\"dim\": 64}\n"),
    ("model.safetensors", "not really safetensors"),
    ("sub/notes.txt", "hello from a subfolder\n"),
];

/// Serves the Hub's endpoints that hf-hub's sync API calls, one request per connection.
fn fake_hub() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = serve(stream);
        }
    });
    format!("http://{addr}")
}

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
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
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) =
        if path == "/api/models/org/tiny/revision/main" {
            let siblings: Vec<String> = FILES
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
        } else if let Some((i, (_, text))) = FILES
            .iter()
            .enumerate()
            .find(|(_, (f, _))| path == format!("/org/tiny/resolve/main/{f}"))
        {
            let start = range_start.unwrap_or(0).min(text.len());
            let body = text.as_bytes()[start..].to_vec();
            let headers = vec![
                "x-repo-commit: abc123".to_string(),
                format!("etag: \"etag{i}\""),
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
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing may be created"
    );
}
