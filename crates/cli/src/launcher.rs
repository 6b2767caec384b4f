//! torchrun's part of `tune run --nproc_per_node N`: start one worker process per local rank,
//! with the environment `tune_recipes::distributed::ProcessGroup` joins from, and supervise them.
//!
//! Workers are this same binary running `tune run <recipe> --config ... <overrides>` without the
//! launcher options. They get their own process group, so a terminal's Ctrl-C reaches only the
//! launcher, which forwards each interrupt once to every worker (first: save and stop at the
//! next step; second: quit; a third kills them). On Linux a worker whose launcher dies gets
//! SIGUSR2 (and saves and stops, however often it arrives). When one worker fails the others notice within
//! a collective; any still alive after a grace period are killed, and the launcher reports the
//! first failure.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::interrupt;

/// Where this node's workers sit in the job.
#[derive(Debug, Clone)]
pub struct Job {
    pub nnodes: usize,
    pub nproc_per_node: usize,
    /// `None`: given at the rendezvous (`--rdzv_backend c10d` without `--node_rank`).
    pub node_rank: Option<usize>,
    /// `host:port` rank 0 listens on; `None` picks a free local port (single node only).
    pub endpoint: Option<(String, u16)>,
    /// Shared by every rank of the job (`--rdzv_id` on several nodes); a new one per
    /// single-node job, so two jobs meeting on one port never mix.
    pub job_token: Option<u64>,
    /// Worker threads for CPU math: RAYON_NUM_THREADS unless the user set it.
    pub threads_per_worker: Option<usize>,
}

impl Job {
    pub fn world_size(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }
}

/// How long workers get to exit on their own after one of them failed.
const GRACE: Duration = Duration::from_secs(15);

/// Runs `worker_args` (arguments after the program name) as this node's ranks; returns when all
/// exited, with an error naming the first rank that failed.
pub fn launch(job: &Job, worker_args: &[OsString]) -> Result<()> {
    if let Some(node_rank) = job.node_rank.filter(|&r| r >= job.nnodes) {
        bail!(
            "--node_rank {node_rank} is not valid with --nnodes {}",
            job.nnodes
        );
    }
    let (addr, port) = match &job.endpoint {
        Some(endpoint) => endpoint.clone(),
        None if job.nnodes == 1 => {
            parse_endpoint(&tune_recipes::distributed::free_local_endpoint()?)?
        }
        None => bail!(
            "--nnodes {} needs the address rank 0 listens on: --master_addr HOST --master_port \
             PORT (or --rdzv_endpoint HOST:PORT), the same on every node",
            job.nnodes
        ),
    };
    // Rank 0 listens on every interface, so a host name that does not resolve would fail only
    // the other ranks, after they start: check it first.
    let host = tune_recipes::distributed::bare_host(&addr);
    let why = match std::net::ToSocketAddrs::to_socket_addrs(&(host, port)) {
        Ok(mut found) => found.next().is_none().then(|| "no address".to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = why {
        bail!(
            "cannot resolve `{addr}`, the host of rank 0's endpoint (--master_addr or \
             --rdzv_endpoint): {why}; is it spelled right, and known on this machine?"
        );
    }
    let exe = std::env::current_exe().context("cannot find the tune binary to start workers")?;
    // Several nodes must agree on the token without talking: the endpoint they all name.
    let job_token = job.job_token.unwrap_or_else(|| {
        if job.nnodes == 1 {
            fresh_token()
        } else {
            // The port: every node names it the same way (the host may be spelled differently).
            token_of(&format!("port {port}"))
        }
    });
    let node_rank = match job.node_rank {
        Some(rank) => rank,
        None => {
            let meeting = crate::rendezvous::Meeting {
                job_token,
                nnodes: job.nnodes,
                nproc_per_node: job.nproc_per_node,
            };
            let timeout = tune_recipes::distributed::timeout_from_env()?;
            let rank = crate::rendezvous::node_rank(&addr, port, meeting, timeout)?;
            tracing::info!(
                "the rendezvous at {addr}:{port} made this node {rank} of {}",
                job.nnodes
            );
            rank
        }
    };
    // Rank 0 would find its port taken only after every rank started, and the others would
    // wait out the grace period: try the port here first (released at once for rank 0).
    if node_rank == 0 && job.endpoint.is_some() {
        let endpoint = format!("{addr}:{port}");
        let address = tune_recipes::distributed::listen_address(&endpoint)?;
        if let Err(e) = std::net::TcpListener::bind(&address) {
            return Err(e).with_context(|| {
                format!(
                    "rank 0 cannot listen on {address} (from {endpoint}); is the port in use? \
                     Pick another port (--master_port, or the port of --rdzv_endpoint)"
                )
            });
        }
    }
    interrupt::set_forwarding(true);

    let mut workers: Vec<(usize, Child)> = Vec::new();
    for local_rank in 0..job.nproc_per_node {
        let rank = node_rank * job.nproc_per_node + local_rank;
        let mut command = Command::new(&exe);
        command
            .args(worker_args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("WORLD_SIZE", job.world_size().to_string())
            .env("LOCAL_WORLD_SIZE", job.nproc_per_node.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            .env("TUNE_DIST_JOB", job_token.to_string())
            .env(interrupt::LAUNCHER_PID_VAR, std::process::id().to_string());
        if let Some(threads) = job.threads_per_worker {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            let launcher_pid = std::process::id() as libc::pid_t;
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                // Orphaned workers (launcher killed) save and stop instead of training on.
                let signal = interrupt::LAUNCHER_DIED as libc::c_ulong;
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher died before the line above took effect.
                if libc::getppid() != launcher_pid {
                    return Err(std::io::Error::other("the launcher exited"));
                }
                Ok(())
            });
        }
        match command.spawn() {
            Ok(child) => workers.push((rank, child)),
            Err(e) => {
                stop_all(&mut workers);
                return Err(e).with_context(|| format!("cannot start rank {rank}"));
            }
        }
    }
    tracing::info!(
        "started ranks {}-{} of {} (rank 0 at {addr}:{port})",
        node_rank * job.nproc_per_node,
        (node_rank + 1) * job.nproc_per_node - 1,
        job.world_size()
    );
    let result = supervise(&mut workers);
    if result.is_err() {
        stop_all(&mut workers);
    }
    result
}

/// Interrupts after which the launcher stops waiting for its workers and kills them.
const KILL_AFTER_INTERRUPTS: usize = 3;

fn supervise(workers: &mut [(usize, Child)]) -> Result<()> {
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut interrupts_forwarded = 0;
    let mut running: Vec<bool> = vec![true; workers.len()];
    while running.iter().any(|r| *r) {
        let interrupts = interrupt::count();
        // One per pass (50 ms apart), so two quick Ctrl-Cs reach a worker as two signals.
        if interrupts_forwarded < interrupts.min(KILL_AFTER_INTERRUPTS - 1) {
            for ((_, child), alive) in workers.iter().zip(&running) {
                if *alive {
                    interrupt::send(child);
                }
            }
            interrupts_forwarded += 1;
        }
        if interrupts >= KILL_AFTER_INTERRUPTS {
            eprintln!("Interrupted {interrupts} times: killing the ranks");
            stop_all(workers);
            std::process::exit(130);
        }
        for ((rank, child), alive) in workers.iter_mut().zip(running.iter_mut()) {
            if !*alive {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                *alive = false;
                if !status.success() && first_failure.is_none() {
                    first_failure = Some((*rank, status));
                    failed_at = Some(Instant::now());
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            tracing::warn!("ranks still running {GRACE:?} after the failure; killing them");
            stop_all(workers);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        // Ranks that stopped on an interrupt (saved and stopped, or quit while loading or on a
        // second Ctrl-C) did not fail; a rank killed by a signal did, unless the user pressed
        // Ctrl-C.
        Some((rank, status))
            if status.code() == Some(130)
                || (interrupts_forwarded > 0 && status.code().is_none()) =>
        {
            eprintln!("Interrupted: the ranks stopped (rank {rank}: {status})");
            std::process::exit(130);
        }
        Some((rank, status)) => bail!(
            "rank {rank} failed ({status}) and the job stopped; the ranks' errors are printed \
             above as `Error (rank N): ...`"
        ),
    }
}

fn stop_all(workers: &mut [(usize, Child)]) {
    for (_, child) in workers.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A token for a new single-node job: unique enough that two jobs on one machine differ.
fn fresh_token() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ ((std::process::id() as u64) << 40)
}

/// The job token of a multi-node job from `--rdzv_id` (every node must pass the same id).
pub fn token_of(rdzv_id: &str) -> u64 {
    // FNV-1a: stable across runs and machines, unlike std's randomly keyed hasher.
    rdzv_id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `host:port` from `--rdzv_endpoint`.
pub fn parse_endpoint(text: &str) -> Result<(String, u16)> {
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("--rdzv_endpoint {text:?}: expected HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("--rdzv_endpoint {text:?}: `{port}` is not a port number"))?;
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_their_errors() {
        assert_eq!(
            parse_endpoint("node0:29500").unwrap(),
            ("node0".to_string(), 29500)
        );
        assert!(parse_endpoint("node0").is_err());
        assert!(parse_endpoint("node0:http").is_err());
    }

    #[test]
    fn rdzv_ids_give_stable_distinct_tokens() {
        assert_eq!(token_of("job-1"), token_of("job-1"));
        assert_ne!(token_of("job-1"), token_of("job-2"));
    }

    #[test]
    fn multi_node_needs_an_endpoint() {
        let job = Job {
            nnodes: 2,
            nproc_per_node: 1,
            node_rank: Some(0),
            endpoint: None,
            job_token: None,
            threads_per_worker: None,
        };
        let e = launch(&job, &[]).unwrap_err().to_string();
        assert!(e.contains("--master_addr"), "{e}");
    }
}
