//! `tune run`: resolve a config (built-in name or path, overrides, interpolation) and hand it to
//! a registered recipe.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tune_core::recipe::RunOptions;
use tune_core::Config;

use crate::catalog;

/// Run a recipe with a config and command-line overrides.
///
/// Examples:
///   $ tune run lora_finetune_single_device --config stories260K/lora_single_device
///   $ tune run lora_finetune_single_device --config llama2/7B_lora_single_device \
///       model.lora_rank=16 model.lora_attn_modules=[q_proj,k_proj,v_proj] output_dir=./run1
///   $ tune run --nproc_per_node 2 lora_finetune_distributed --config llama2/7B_lora
///   $ tune run --plugin plugins/ia3/target/release/libtune_ia3.so lora_finetune_single_device \
///       --config stories260K/lora_single_device model.adapter=ia3 model.lora_attn_modules=[k_proj,v_proj]
///
/// Overrides: `a.b=value`; lists as [a,b], ['a','b'] or ["a", "b"]; `~a.b` deletes a key;
/// `model=<dotted.name>` swaps a component; null/None is null. `tune cat <config>` shows the keys.
///
/// Adapter plugins are loaded from the directories in TUNE_PLUGIN_PATH (colon-separated), then
/// the config's `plugins: [PATH, ...]`, then each --plugin; `tune ls --adapters` lists adapters.
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    override_usage = "tune run [--nnodes N] [--nproc_per_node M] [--node_rank R] [--master_addr HOST] [--master_port PORT] [--rdzv_endpoint HOST:PORT] [--rdzv_backend c10d] [--rdzv_id JOB] [--dry-run] [--plugin PATH]... <RECIPE> --config <CONFIG> [OVERRIDES]..."
)]
pub struct Args {
    /// Number of nodes (machines) for a distributed run.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nnodes: usize,
    /// Number of processes per node for a distributed run.
    #[arg(
        long = "nproc_per_node",
        alias = "nproc-per-node",
        default_value_t = 1,
        value_name = "M",
        value_parser = parse_nproc
    )]
    pub nproc_per_node: usize,
    /// This node's index in a multi-node run (0 on the node whose rank 0 listens); required
    /// with --nnodes above 1 (e.g. `--node_rank $SLURM_NODEID`) unless --rdzv_backend c10d
    /// hands the node ranks out.
    #[arg(long = "node_rank", alias = "node-rank", value_name = "R")]
    pub node_rank: Option<usize>,
    /// Address of the node running rank 0 (multi-node runs; default: this machine).
    #[arg(long = "master_addr", alias = "master-addr", value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Port rank 0 listens on (default: a free port, single node).
    #[arg(long = "master_port", alias = "master-port", value_name = "PORT")]
    pub master_port: Option<u16>,
    /// HOST:PORT of rank 0, instead of --master_addr/--master_port.
    #[arg(
        long = "rdzv_endpoint",
        alias = "rdzv-endpoint",
        value_name = "HOST:PORT"
    )]
    pub rdzv_endpoint: Option<String>,
    /// A job id shared by every node of a multi-node run (keeps concurrent jobs apart).
    #[arg(long = "rdzv_id", alias = "rdzv-id", value_name = "ID")]
    pub rdzv_id: Option<String>,
    /// torchrun's rendezvous backend: `c10d` (nodes meet at --rdzv_endpoint, which hands out
    /// node ranks in order of arrival, the host's node first) or `static` (--node_rank given).
    #[arg(long = "rdzv_backend", alias = "rdzv-backend", value_name = "BACKEND")]
    pub rdzv_backend: Option<String>,
    /// Single-node run with a local rendezvous (the default; accepted for torchrun users).
    #[arg(long)]
    pub standalone: bool,
    /// torchrun's restarts of a failed job: only 0 (here a failed rank stops the job).
    #[arg(
        long = "max_restarts",
        alias = "max-restarts",
        value_name = "N",
        default_value_t = 0,
        hide = true
    )]
    pub max_restarts: usize,
    /// torchrun options that change nothing here, accepted (with a warning) so that torchrun
    /// command lines run: --monitor_interval, --start_method, --rdzv_conf, --log_dir,
    /// --redirects, --tee, --local_addr, --role.
    #[arg(long = "monitor_interval", alias = "monitor-interval", hide = true)]
    pub monitor_interval: Option<String>,
    #[arg(long = "start_method", alias = "start-method", hide = true)]
    pub start_method: Option<String>,
    #[arg(long = "rdzv_conf", alias = "rdzv-conf", hide = true)]
    pub rdzv_conf: Option<String>,
    #[arg(long = "log_dir", alias = "log-dir", hide = true)]
    pub log_dir: Option<String>,
    #[arg(long, short = 'r', hide = true)]
    pub redirects: Option<String>,
    #[arg(long, short = 't', hide = true)]
    pub tee: Option<String>,
    #[arg(long = "local_addr", alias = "local-addr", hide = true)]
    pub local_addr: Option<String>,
    #[arg(long, hide = true)]
    pub role: Option<String>,
    /// Resolve the config and build what needs no weights, print it, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Load an adapter plugin (a shared library built against tune-plugin-api); repeatable.
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// The recipe to run (`tune ls` lists them).
    pub recipe: String,
    /// A built-in config name (looked up among the recipe's configs, then all built-in configs)
    /// or a path to a YAML file.
    #[arg(long)]
    pub config: String,
    /// Config overrides: `key=value`, `~key`.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

/// A number of processes. torchrun also takes `gpu`, `cpu` and `auto`, counted from the machine;
/// here the count is given, which also says how many ranks share the CPU cores.
fn parse_nproc(value: &str) -> std::result::Result<usize, String> {
    match value.trim() {
        "gpu" | "cpu" | "auto" => Err(format!(
            "torchrun's `{value}` is not supported; give the number of processes (one per GPU \
             with `device: cuda`; on the CPU the ranks share the cores)"
        )),
        number => number
            .parse()
            .map_err(|_| format!("expected a number of processes, got `{value}`")),
    }
}

pub fn run(args: &Args) -> Result<()> {
    // First, so an early Ctrl-C (a launcher forwarding one to a starting worker) ends cleanly.
    crate::interrupt::install()?;
    let recipe = tune_core::recipe::lookup(&args.recipe).or_else(|e| {
        if catalog::is_recipe(&args.recipe) {
            bail!(
                "recipe `{}` is listed by `tune ls` but was not built into this binary",
                args.recipe
            )
        }
        Err(e)
    })?;
    if args.nnodes == 0 || args.nproc_per_node == 0 {
        bail!("--nnodes and --nproc_per_node must be at least 1");
    }
    if args.max_restarts > 0 {
        bail!(
            "--max_restarts {}: tune-rs does not restart failed ranks (a failed rank stops the job); \
             drop it, and continue a stopped run with resume_from_checkpoint=True",
            args.max_restarts
        );
    }

    let options = RunOptions {
        dry_run: args.dry_run,
        nnodes: args.nnodes,
        nproc_per_node: args.nproc_per_node,
    };
    let launcher_options_given = args.node_rank.is_some_and(|r| r > 0)
        || args.rdzv_backend.is_some()
        || args.master_addr.is_some()
        || args.master_port.is_some()
        || args.rdzv_endpoint.is_some()
        || args.rdzv_id.is_some()
        || args.standalone;
    if (options.is_distributed() || launcher_options_given) && !recipe.supports_distributed() {
        // The distributed twin of a single-device recipe, as torchtune names them.
        let twin = recipe.name().replace("_single_device", "_distributed");
        let instead = match tune_core::recipe::lookup(&twin) {
            Ok(r) if r.supports_distributed() => format!(", or use {twin}"),
            // generate, eleuther_eval: nothing to parallelise over processes.
            _ => String::new(),
        };
        bail!(
            "recipe {} does not support distributed training (--nnodes {} --nproc_per_node {}); run \
             it without launcher options{instead}",
            recipe.name(),
            args.nnodes,
            args.nproc_per_node
        );
    }

    let mut recipe_configs = catalog::configs_of(recipe.name());
    recipe_configs.extend(recipe.configs().iter().map(|c| c.to_string()));
    let mut config = load_config(&args.config, &recipe_configs)?;
    config.apply_overrides(&args.overrides)?;
    let unread = tune_core::recipe::unread_top_level_keys(&config, recipe)?;
    config
        .resolve_interpolations()
        .context("cannot resolve the config's ${...} references")?;

    let log_level = config
        .get("log_level")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    crate::logging::init(log_level.as_deref())?;
    let no_effect = [
        ("--monitor_interval", &args.monitor_interval),
        ("--start_method", &args.start_method),
        ("--rdzv_conf", &args.rdzv_conf),
        ("--log_dir", &args.log_dir),
        ("--redirects", &args.redirects),
        ("--tee", &args.tee),
        ("--local_addr", &args.local_addr),
        ("--role", &args.role),
    ];
    for (option, _) in no_effect.iter().filter(|(_, value)| value.is_some()) {
        tracing::warn!("torchrun's {option} has no effect in tune-rs; ignoring it");
    }
    // The launcher has said it already for the ranks it started.
    if !unread.is_empty() && std::env::var_os("TUNE_DIST_JOB").is_none() {
        tracing::warn!(
            "{} does not read the top-level {} {}; {} no effect",
            recipe.name(),
            if unread.len() == 1 { "key" } else { "keys" },
            unread.join(", "),
            if unread.len() == 1 {
                "it has"
            } else {
                "they have"
            }
        );
    }
    // Before the checks: a config may name a plugin's adapter.
    load_plugins(&args.plugins, Some(&config))?;
    check(&config)?;

    // The launcher: start the ranks (each re-reads and re-checks the config) and wait for them.
    if options.is_distributed() && !args.dry_run {
        if std::env::var_os("WORLD_SIZE").is_some() {
            bail!(
                "launcher options were given inside a distributed job (WORLD_SIZE is set); start \
                 workers as `tune run <recipe> --config ...` without --nproc_per_node/--nnodes"
            );
        }
        return crate::launcher::launch(&job(args)?, &worker_args(args));
    }

    tracing::info!(
        "Running {} with resolved config:\n\n{}",
        recipe.name(),
        config.to_yaml_string()
    );
    recipe
        .run(config, &options)
        .with_context(|| format!("recipe {} failed", recipe.name()))
}

/// The launcher's job description from the command line.
fn job(args: &Args) -> Result<crate::launcher::Job> {
    let endpoint = match (&args.rdzv_endpoint, &args.master_addr, args.master_port) {
        (Some(endpoint), None, None) => Some(crate::launcher::parse_endpoint(endpoint)?),
        (Some(_), _, _) => {
            bail!("give either --rdzv_endpoint or --master_addr/--master_port, not both")
        }
        (None, Some(addr), Some(port)) => Some((addr.clone(), port)),
        (None, None, Some(port)) if args.nnodes == 1 => Some(("127.0.0.1".into(), port)),
        (None, None, Some(_)) => bail!(
            "--nnodes {} needs --master_addr: the address of the node running rank 0, the same on \
             every node",
            args.nnodes
        ),
        (None, Some(_), None) => bail!("--master_addr needs --master_port"),
        (None, None, None) => None,
    };
    if args.standalone && args.nnodes > 1 {
        bail!("--standalone is for a single node; drop it or --nnodes");
    }
    if let Some(backend) = &args.rdzv_backend {
        if !matches!(backend.as_str(), "c10d" | "static") {
            bail!("--rdzv_backend {backend:?}: tune-rs meets at the endpoint (c10d or static)");
        }
    }
    // torchrun's c10d rendezvous hands out node ranks; with a static one each node says its own.
    let node_rank = match args.node_rank {
        Some(rank) => Some(rank),
        // Without an endpoint the launcher says what is missing first.
        None if args.nnodes == 1 || endpoint.is_none() => Some(0),
        None if args.rdzv_backend.as_deref() == Some("c10d") && args.rdzv_endpoint.is_some() => {
            let (host, _) = endpoint.as_ref().expect("parsed above");
            let bare = tune_recipes::distributed::bare_host(host);
            if bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            {
                bail!(
                    "--rdzv_endpoint {host}: the rendezvous must be one machine's address or host \
                     name (every node would host at {host})"
                );
            }
            None
        }
        None => bail!(
            "--nnodes {} needs --node_rank on each node (0 to {}, 0 where rank 0 listens; under \
             SLURM --node_rank $SLURM_NODEID), or torchrun's dynamic form: --rdzv_backend c10d \
             --rdzv_endpoint HOST:PORT --rdzv_id JOB, the same on every node",
            args.nnodes,
            args.nnodes - 1
        ),
    };
    // Workers share the cores unless the user chose the thread count.
    let threads_per_worker =
        (!crate::RAYON_THREADS_FROM_USER.load(std::sync::atomic::Ordering::SeqCst)).then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / args.nproc_per_node).max(1)
        });
    Ok(crate::launcher::Job {
        nnodes: args.nnodes,
        nproc_per_node: args.nproc_per_node,
        node_rank,
        endpoint,
        job_token: args.rdzv_id.as_deref().map(crate::launcher::token_of),
        threads_per_worker,
    })
}

/// The command line each worker runs: this one without the launcher options.
fn worker_args(args: &Args) -> Vec<std::ffi::OsString> {
    let mut out: Vec<std::ffi::OsString> = vec!["run".into()];
    for plugin in &args.plugins {
        out.push("--plugin".into());
        out.push(plugin.into());
    }
    out.push(args.recipe.clone().into());
    out.push("--config".into());
    out.push(args.config.clone().into());
    out.extend(args.overrides.iter().map(Into::into));
    out
}

/// The config named `name`: one of the recipe's configs, else any built-in config, else a file.
pub fn load_config(name: &str, recipe_configs: &[String]) -> Result<Config> {
    let builtin = recipe_configs
        .iter()
        .find(|c| *c == name)
        .map(String::as_str)
        .or_else(|| catalog::config_names().into_iter().find(|c| *c == name));
    if let Some(builtin) = builtin {
        return catalog::builtin_config(builtin).expect("listed config exists");
    }
    let path = Path::new(name);
    if path.exists() {
        return Config::load(path);
    }
    if let Some(Some(config)) = name.strip_suffix(".yaml").map(catalog::builtin_config) {
        return config;
    }
    bail!(
        "config `{name}` is neither a built-in config nor a file (`tune ls` lists the built-in \
         configs).{}",
        catalog::did_you_mean(name)
    )
}

/// Loads the adapter plugins in the directories of TUNE_PLUGIN_PATH, then those the config's
/// `plugins` key lists, then `cli` (`--plugin`). A file named twice is loaded once.
pub fn load_plugins(cli: &[PathBuf], config: Option<&Config>) -> Result<()> {
    let mut paths = tune_adapters::plugin::env_plugin_paths()?;
    if let Some(config) = config {
        paths.extend(tune_adapters::plugin::config_plugin_paths(&config.root)?);
    }
    paths.extend(cli.iter().cloned());
    let mut announced = std::collections::HashSet::new();
    for plugin in tune_adapters::plugin::load_all(&paths)? {
        // A library named twice (a link and its target) is one plugin, announced once.
        if !announced.insert(plugin.path.clone()) {
            continue;
        }
        tracing::info!(
            "loaded plugin {} {} ({}): adapters {}",
            plugin.name,
            plugin.version,
            plugin.path.display(),
            plugin.adapters.join(", ")
        );
    }
    Ok(())
}

/// `tune validate`'s checks on the resolved config, before anything is built: every problem at
/// once.
fn check(config: &Config) -> Result<()> {
    let problems = tune_core::validate::validate_resolved(config);
    if !problems.is_empty() {
        bail!(
            "the config has {} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    Ok(())
}
