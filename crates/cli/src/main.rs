//! `tune`: torchtune's command line, for tune-rs.
//!
//! Verbs: `ls`, `cp`, `cat`, `validate`, `run`, `download`, plus `bench` and `selfcheck`
//! (one module each under
//! [`commands`]). Errors print as `Error: <what went wrong>: <why>` and exit with status 1.

mod catalog;
mod commands;
mod interrupt;
mod launcher;
mod logging;
mod rendezvous;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether RAYON_NUM_THREADS came from the user (the launcher then leaves it to each worker).
static RAYON_THREADS_FROM_USER: AtomicBool = AtomicBool::new(false);

/// Training allocates and frees many activation-sized buffers per step; glibc's malloc hands
/// large ones back to the kernel each time, so every step pays page faults to zero fresh pages.
/// mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// Fine-tune Llama2 with LoRA/QLoRA: torchtune's recipes, configs and command line, in Rust.
#[derive(Debug, Parser)]
#[command(name = "tune", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Ls(commands::ls::Args),
    Cp(commands::cp::Args),
    Cat(commands::cat::Args),
    Validate(commands::validate::Args),
    Run(commands::run::Args),
    Download(commands::download::Args),
    Bench(commands::bench::Args),
    Selfcheck(commands::selfcheck::Args),
}

fn main() -> ExitCode {
    // candle 0.11 reads the core count from /proc on every CPU matmul unless RAYON_NUM_THREADS is
    // set (7x slower generation on stories260K). Fix it once, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        RAYON_THREADS_FROM_USER.store(true, Ordering::SeqCst);
    } else {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    // Links the recipes crate, and through it every crate whose components register themselves.
    tune_recipes::link();
    // A bare `tune` is a request for help, as in torchtune: on stdout, exit status 0.
    if std::env::args_os().len() == 1 {
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        return ExitCode::SUCCESS;
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_with_hint(e));
    let result = match cli.command {
        Command::Ls(args) => logging::init(None).and_then(|()| commands::ls::run(&args)),
        Command::Cp(args) => logging::init(None).and_then(|()| commands::cp::run(&args)),
        Command::Cat(args) => logging::init(None).and_then(|()| commands::cat::run(&args)),
        Command::Validate(args) => {
            logging::init(None).and_then(|()| commands::validate::run(&args))
        }
        // `run` starts logging once the config (and its `log_level`) is known.
        Command::Run(args) => commands::run::run(&args),
        Command::Download(args) => {
            logging::init(None).and_then(|()| commands::download::run(&args))
        }
        Command::Bench(args) => logging::init(None).and_then(|()| commands::bench::run(&args)),
        Command::Selfcheck(args) => {
            logging::init(None).and_then(|()| commands::selfcheck::run(&args))
        }
    };
    match result {
        // Saved and stopped on Ctrl-C/SIGTERM before the run was done: not a finished run (a
        // job script's `&&` must not go on), so 130 as for any interrupted command.
        Ok(()) if tune_core::recipe::stopped_early() => ExitCode::from(130),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A Ctrl-C reaches every rank at once: a rank that first sees another one leave
            // would report that as its error. Its own interrupt follows within moments.
            let peer_lost = e
                .downcast_ref::<tune_recipes::distributed::PeerLost>()
                .is_some();
            if peer_lost && std::env::var_os(interrupt::LAUNCHER_PID_VAR).is_some() {
                std::thread::sleep(std::time::Duration::from_millis(200));
                if interrupt::count() > 0 {
                    return ExitCode::from(130);
                }
            }
            let line = match std::env::var("RANK") {
                Ok(rank) if std::env::var_os("WORLD_SIZE").is_some() => {
                    format!("Error (rank {rank}): {e:#}\n")
                }
                _ => format!("Error: {e:#}\n"),
            };
            // One write, so ranks sharing a terminal do not interleave inside a message.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}

/// Exits with clap's error; an unknown `--option` given to `tune run` is most likely a config
/// key written as a flag (torchtune's overrides are `key=value`), so that is said instead of
/// clap's `-- --option` tip, which would lead to a second error.
fn exit_with_hint(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument || e.get(ContextKind::SuggestedArg).is_some() {
        // Not an unknown flag, or clap knows the option meant (`--dry_run`: `--dry-run`).
        e.exit()
    }
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let is_run = args.get(1).map(String::as_str) == Some("run");
    if let (true, Some(ContextValue::String(flag))) = (is_run, e.get(ContextKind::InvalidArg)) {
        let key = flag.trim_start_matches('-');
        let key = key.split('=').next().unwrap_or(key);
        // Among the overrides (after --config), not a launcher option before the recipe.
        let position = |wanted: &dyn Fn(&str) -> bool| args.iter().position(|a| wanted(a));
        let after_config = match (
            position(&|a| a == "--config" || a.starts_with("--config=")),
            position(&|a| a == flag || a.starts_with(&format!("{flag}="))),
        ) {
            (Some(config), Some(at)) => at > config,
            _ => false,
        };
        if after_config && flag.starts_with("--") && !key.is_empty() {
            eprintln!(
                "error: `{flag}` is not an option of tune run; config overrides are written \
                 `{key}=VALUE` after --config (e.g. `tune run <recipe> --config <config> \
                 {key}=VALUE`)\n\nFor more information, try 'tune run --help'."
            );
            std::process::exit(2);
        }
    }
    e.exit()
}
