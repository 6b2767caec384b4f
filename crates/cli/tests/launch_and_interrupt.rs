//! `tune run` as a user runs it, with processes and signals: `--nproc_per_node 2
//! lora_finetune_distributed` starts two worker processes that train together on stories260K
//! (CPU); Ctrl-C saves a checkpoint that resumes to the uninterrupted result (one process or
//! two); Ctrl-C outside training quits at once; a failing rank fails the job.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn tune_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tune"));
    command
        .args(args)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        // A test that goes wrong fails in minutes instead of the default half hour.
        .env("TUNE_DIST_TIMEOUT_S", "120");
    command
}

/// Starting a run in the background with its output captured.
trait SpawnPiped {
    fn spawn_piped(&mut self) -> std::process::Child;
}

impl SpawnPiped for Command {
    fn spawn_piped(&mut self) -> std::process::Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn succeeded(o: &Output) {
    assert!(
        o.status.success(),
        "expected success\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `tune run --nproc_per_node 2 lora_finetune_distributed --config stories260K/lora_distributed`
/// with `output_dir` and the extra overrides.
fn distributed_args<'a>(output_dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--nproc_per_node",
        "2",
        "lora_finetune_distributed",
        "--config",
        "stories260K/lora_distributed",
        output_dir,
        "tokenizer.max_seq_len=96",
        "save_adapter_weights_only=True",
    ];
    args.extend_from_slice(extra);
    args
}

fn log_lines(output: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(output.join("logs")) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for entry in entries {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        lines.extend(text.lines().map(str::to_string));
    }
    lines
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("recipe_state/adapter_torchtune.safetensors")).unwrap()
}

#[test]
fn two_worker_processes_train_and_rank_zero_writes() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("out");
    let output_arg = format!("output_dir={}", output.display());
    let run = tune_command(&distributed_args(&output_arg, &["max_steps_per_epoch=3"]))
        .output()
        .unwrap();
    succeeded(&run);
    let stderr = text(&run.stderr);
    assert!(stderr.contains("rank 0 of 2"), "{stderr}");
    // Rank 1 keeps quiet below warnings: one voice for the job.
    assert!(!stderr.contains("rank 1 of 2"), "{stderr}");
    assert_eq!(stderr.matches("saved ").count(), 1, "{stderr}");

    let lines = log_lines(&output);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].starts_with("Step 3 | loss:"), "{lines:?}");
    assert!(output
        .join("epoch_0/adapter/adapter_model.safetensors")
        .is_file());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output.join("epoch_0/recipe_state/recipe_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);
    assert_eq!(state["global_step"], 3);
}

#[test]
fn dpo_runs_in_two_worker_processes() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("out");
    let output_arg = format!("output_dir={}", output.display());
    let run = tune_command(&[
        "run",
        "--nproc_per_node",
        "2",
        "lora_dpo_distributed",
        "--config",
        "stories260K/lora_dpo_single_device",
        &output_arg,
        "tokenizer.max_seq_len=96",
        "batch_size=2",
        "max_steps_per_epoch=2",
        "save_adapter_weights_only=True",
    ])
    .output()
    .unwrap();
    succeeded(&run);
    let lines = log_lines(&output);
    assert_eq!(lines.len(), 2, "{lines:?}");
    // The policy starts as the reference: ln 2 and no reward.
    assert!(
        lines[0].starts_with("Step 1 | loss:0.693147") && lines[0].contains("rewards/margins:0.0 "),
        "{lines:?}"
    );
    assert!(output
        .join("epoch_0/adapter/adapter_model.safetensors")
        .is_file());
    // The single-device recipe refuses to be launched on several processes.
    let refused = tune_command(&[
        "run",
        "--nproc_per_node",
        "2",
        "lora_dpo_single_device",
        "--config",
        "stories260K/lora_dpo_single_device",
        &output_arg,
    ])
    .output()
    .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("lora_dpo_distributed"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn ctrl_c_saves_and_the_resumed_run_ends_where_an_uninterrupted_one_does() {
    let steps = "max_steps_per_epoch=40";
    let straight = tempfile::tempdir().unwrap();
    let straight_arg = format!("output_dir={}", straight.path().display());
    succeeded(
        &tune_command(&distributed_args(&straight_arg, &[steps]))
            .output()
            .unwrap(),
    );

    let work = tempfile::tempdir().unwrap();
    let output_arg = format!("output_dir={}", work.path().display());
    let child = tune_command(&distributed_args(&output_arg, &[steps])).spawn_piped();
    let interrupted = interrupt_when(child, || log_lines(work.path()).len() >= 2);
    let stderr = text(&interrupted.stderr);
    // Saved, but not finished: a job script's `&&` must not go on.
    assert_eq!(interrupted.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("Stopped at step") && stderr.contains("Interrupted: the ranks stopped"),
        "{stderr}"
    );
    let stopped_at = log_lines(work.path()).len();
    assert!(stopped_at < 40, "stopped at step {stopped_at}");
    let step_dir = work.path().join(format!("step_{stopped_at}"));
    assert!(step_dir.join("recipe_state/recipe_state.json").is_file());
    assert!(!work.path().join("epoch_0").exists());

    let resume = tune_command(&distributed_args(
        &output_arg,
        &[steps, "resume_from_checkpoint=True"],
    ))
    .output()
    .unwrap();
    succeeded(&resume);
    assert_eq!(log_lines(work.path()).len(), 40);
    // Same data order, same sums in the same order: the same bits.
    assert!(
        adapter_bytes(&work.path().join("epoch_0"))
            == adapter_bytes(&straight.path().join("epoch_0")),
        "the resumed adapter differs from the uninterrupted one"
    );
}

#[test]
fn a_failing_rank_fails_the_job_with_its_error() {
    let work = tempfile::tempdir().unwrap();
    let output_arg = format!("output_dir={}", work.path().display());
    let run = tune_command(&distributed_args(
        &output_arg,
        &["dataset.data_files=/nonexistent/train.json"],
    ))
    .output()
    .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = text(&run.stderr);
    assert!(stderr.contains("Error (rank "), "{stderr}");
    assert!(stderr.contains("/nonexistent/train.json"), "{stderr}");
    assert!(
        stderr.contains("failed (exit status: 1) and the job stopped"),
        "{stderr}"
    );
}

/// Two `tune run --nnodes 2 --nproc_per_node 1` launchers on this machine, as on two machines,
/// each with its own launcher options (given the free port), training together; returns their
/// outputs once both succeeded and rank 0 logged and saved.
fn two_nodes(launcher: impl Fn(usize, &str) -> Vec<String>) -> [Output; 2] {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let work = tempfile::tempdir().unwrap();
    let output_arg = format!("output_dir={}", work.path().display());
    let node = |node: usize| {
        let options = launcher(node, &port);
        let mut args = vec!["run", "--nnodes", "2", "--nproc_per_node", "1"];
        args.extend(options.iter().map(String::as_str));
        args.extend_from_slice(&distributed_args(&output_arg, &["max_steps_per_epoch=2"])[3..]);
        tune_command(&args).spawn_piped()
    };
    let (first, second) = (node(0), node(1));
    let outputs = [
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    ];
    outputs.iter().for_each(succeeded);
    assert_eq!(log_lines(work.path()).len(), 2);
    assert!(work.path().join("epoch_0/recipe_state").is_dir());
    outputs
}

#[test]
fn two_nodes_meet_at_the_master_address() {
    let [first, _] = two_nodes(|node, port| {
        vec![
            "--node_rank".into(),
            node.to_string(),
            "--master_addr".into(),
            "127.0.0.1".into(),
            "--master_port".into(),
            port.to_string(),
        ]
    });
    assert!(text(&first.stderr).contains("rank 0 of 2"));
}

#[test]
fn two_nodes_meet_at_a_c10d_rendezvous_without_node_ranks() {
    // torchrun's multi-node form: the same command on every node, node ranks handed out at the
    // endpoint (the launcher on its host is node 0; here both "nodes" are this machine).
    let outputs = two_nodes(|_, port| {
        [
            "--rdzv_id",
            "job-42",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("127.0.0.1:{port}")])
        .collect()
    });
    let said = |what: &str| {
        outputs
            .iter()
            .filter(|o| text(&o.stderr).contains(what))
            .count()
    };
    assert_eq!(said("made this node 0 of 2"), 1);
    assert_eq!(said("made this node 1 of 2"), 1);
}

#[test]
fn launcher_options_are_checked_before_anything_starts() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--nnodes", "2", "--nproc_per_node", "1"],
            "--master_addr HOST --master_port",
        ),
        (
            &["--nproc_per_node", "2", "--rdzv_endpoint", "localhost"],
            "expected HOST:PORT",
        ),
        // A static rendezvous (torchrun's default) has no one to hand out node ranks.
        (
            &[
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_id",
                "101",
                "--rdzv_endpoint",
                "127.0.0.1:29500",
            ],
            "needs --node_rank on each node",
        ),
        // Every machine can listen on 0.0.0.0, so every node would host the rendezvous.
        (
            &[
                "--nnodes",
                "2",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                "0.0.0.0:29500",
            ],
            "must be one machine's address",
        ),
        // Rank 0 would listen anyway; the other ranks would fail after starting.
        (
            &[
                "--nproc_per_node",
                "2",
                "--rdzv_endpoint",
                "nosuchhost.invalid:29500",
            ],
            "cannot resolve `nosuchhost.invalid`",
        ),
    ];
    for (launcher, expected) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(launcher);
        args.extend([
            "lora_finetune_distributed",
            "--config",
            "stories260K/lora_distributed",
        ]);
        let run = tune_command(&args).output().unwrap();
        assert_eq!(run.status.code(), Some(1), "{launcher:?}");
        let stderr = text(&run.stderr);
        assert!(stderr.contains(expected), "{launcher:?}: {stderr}");
    }
    // torchrun's counted forms are refused by the argument parser, with what to give instead.
    let run = tune_command(&[
        "run",
        "--nproc_per_node",
        "gpu",
        "lora_finetune_distributed",
        "--config",
        "stories260K/lora_distributed",
    ])
    .output()
    .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(
        text(&run.stderr).contains("give the number of processes"),
        "{}",
        text(&run.stderr)
    );
}

/// A port another program holds is named before any rank starts (rank 0 found it only after
/// every rank had started, and the job took the 15 s grace period to stop).
#[test]
fn a_taken_port_is_named_before_the_ranks_start() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let run = tune_command(&[
        "run",
        "--nproc_per_node",
        "2",
        "--master_port",
        &port,
        "lora_finetune_distributed",
        "--config",
        "stories260K/lora_distributed",
    ])
    .output()
    .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("is the port in use") && !stderr.contains("started ranks"),
        "{stderr}"
    );
    drop(holder);
}

#[cfg(target_os = "linux")]
#[test]
fn workers_whose_launcher_is_killed_save_and_stop() {
    // Several times: the launcher's death can reach a worker more than once, and must still
    // mean one request to save (not a second, quit-without-saving one).
    for attempt in 0..3 {
        let work = tempfile::tempdir().unwrap();
        let output_arg = format!("output_dir={}", work.path().display());
        let mut launcher =
            tune_command(&distributed_args(&output_arg, &["max_steps_per_epoch=400"]))
                .spawn_piped();
        let started = Instant::now();
        while log_lines(work.path()).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "never trained"
            );
            assert!(
                launcher.try_wait().unwrap().is_none(),
                "the run ended early"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        launcher.kill().unwrap(); // SIGKILL: the launcher cannot pass anything on
        launcher.wait().unwrap();
        let saved = || {
            std::fs::read_dir(work.path()).unwrap().any(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.starts_with("step_") || name.starts_with("epoch_")
            })
        };
        let waiting = Instant::now();
        while !saved() {
            assert!(
                waiting.elapsed() < Duration::from_secs(60),
                "attempt {attempt}: the orphaned workers saved nothing"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends SIGINT to `child` once `ready()` holds; returns its output.
fn interrupt_when(child: std::process::Child, ready: impl Fn() -> bool) -> Output {
    interrupt_times_when(child, 1, ready)
}

/// Sends SIGINT `times` times, 20 ms apart, once `ready()` holds; returns `child`'s output.
fn interrupt_times_when(
    mut child: std::process::Child,
    times: usize,
    ready: impl Fn() -> bool,
) -> Output {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(120), "never ready");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..times {
        let kill = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn ctrl_c_in_a_single_device_run_saves_a_step_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let output_arg = format!("output_dir={}", work.path().display());
    let child = tune_command(&[
        "run",
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
        &output_arg,
        "max_steps_per_epoch=400",
        "save_adapter_weights_only=True",
    ])
    .spawn_piped();
    // Twice within milliseconds, as when a wrapper (`timeout`, a job runner) forwards the
    // terminal's Ctrl-C that the run also got: one press, so the run still saves.
    let out = interrupt_times_when(child, 2, || log_lines(work.path()).len() >= 2);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("Interrupted: saving a checkpoint")
            && !stderr.contains("Interrupted again"),
        "{stderr}"
    );
    let steps = log_lines(work.path()).len();
    assert!(steps < 400, "{steps}");
    assert!(work
        .path()
        .join(format!("step_{steps}/recipe_state/recipe_state.json"))
        .is_file());
}

#[test]
fn ctrl_c_outside_training_quits_at_once() {
    let work = tempfile::tempdir().unwrap();
    let output_arg = format!("output_dir={}", work.path().display());
    // TruthfulQA mc2 over all 817 questions: minutes of evaluation, no checkpoint to save.
    let child = tune_command(&[
        "run",
        "eleuther_eval",
        "--config",
        "stories260K/eval",
        &output_arg,
    ])
    .spawn_piped();
    let started = Instant::now();
    let out = interrupt_when(child, || started.elapsed() > Duration::from_secs(2));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("saving a checkpoint"));
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A save that runs out of space (here: a file-size limit, which fails writes as a full disk
/// does) fails the run with an error that says so, leaves no partial files, and keeps the
/// checkpoint already in place byte for byte.
#[cfg(target_os = "linux")]
#[test]
fn a_save_that_runs_out_of_space_keeps_the_last_checkpoint() {
    use std::os::unix::process::CommandExt;
    let work = tempfile::tempdir().unwrap();
    let output_arg = format!("output_dir={}", work.path().display());
    let args = [
        "run",
        "lora_finetune_single_device",
        "--config",
        "stories260K/lora_single_device",
        &output_arg,
        "max_steps_per_epoch=2",
    ];
    succeeded(&tune_command(&args).output().unwrap());
    let epoch = work.path().join("epoch_0");
    let before: Vec<(PathBuf, Vec<u8>)> = files_under(&epoch);
    // The merged weights are the one file over the limit below.
    assert!(before.iter().any(|(_, bytes)| bytes.len() > 200_000));

    // The same run again, where no file may grow past 200 kB: the merged weights (1 MB) cannot
    // be written.
    let mut limited = tune_command(&args);
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs before exec.
    unsafe {
        limited.pre_exec(|| {
            // Without this the kernel kills the writer (SIGXFSZ) instead of failing the write.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 200_000,
                rlim_max: 200_000,
            };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let o = limited.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let stderr = text(&o.stderr);
    assert!(
        stderr.contains("saving checkpoint") && stderr.contains("is the disk full"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("File too large").count(), 1, "{stderr}");
    assert_eq!(files_under(&epoch), before, "the last checkpoint changed");
    let leftovers: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "left behind {leftovers:?}");
}

/// Every file under `dir` with its bytes, in name order.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}
