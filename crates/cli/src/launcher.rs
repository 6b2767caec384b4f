//! torchrun's part of `tune run --nproc_per_node N`: start one worker process per local rank,
//! with the environment `tune_recipes::distributed::ProcessGroup` joins from, and supervise them.
//!
//! Workers are this same binary running `tune run <recipe> --config ... <overrides>` without the
//! launcher options. They get their own process group, so a terminal's Ctrl-C reaches only the
//! launcher, which forwards each interrupt once to every worker (first: save and stop at the
//! next step; second: quit). When one worker fails the others notice within a collective; any
//! still alive after a grace period are killed, and the launcher reports the first failure.

use std::ffi::OsString;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::interrupt;

/// Where this node's workers sit in the job.
#[derive(Debug, Clone)]
pub struct Job {
    pub nnodes: usize,
    pub nproc_per_node: usize,
    pub node_rank: usize,
    /// `host:port` rank 0 listens on; `None` picks a free local port (single node only).
    pub endpoint: Option<(String, u16)>,
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
    if job.node_rank >= job.nnodes {
        bail!(
            "--node_rank {} is not valid with --nnodes {}",
            job.node_rank,
            job.nnodes
        );
    }
    let (addr, port) = match &job.endpoint {
        Some(endpoint) => endpoint.clone(),
        None if job.nnodes == 1 => ("127.0.0.1".to_string(), free_port()?),
        None => bail!(
            "--nnodes {} needs the address rank 0 listens on: --master_addr HOST --master_port \
             PORT (or --rdzv_endpoint HOST:PORT), the same on every node",
            job.nnodes
        ),
    };
    let exe = std::env::current_exe().context("cannot find the tune binary to start workers")?;
    interrupt::set_forwarding(true);

    let mut workers: Vec<(usize, Child)> = Vec::new();
    for local_rank in 0..job.nproc_per_node {
        let rank = job.node_rank * job.nproc_per_node + local_rank;
        let mut command = Command::new(&exe);
        command
            .args(worker_args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("WORLD_SIZE", job.world_size().to_string())
            .env("LOCAL_WORLD_SIZE", job.nproc_per_node.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string());
        if let Some(threads) = job.threads_per_worker {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        match command.spawn() {
            Ok(child) => workers.push((rank, child)),
            Err(e) => {
                stop_all(&mut workers);
                return Err(e).with_context(|| format!("cannot start rank {rank}"));
            }
        }
    }
    tracing::info!(
        "started ranks {}..{} of {} (rank 0 at {addr}:{port})",
        job.node_rank * job.nproc_per_node,
        (job.node_rank + 1) * job.nproc_per_node - 1,
        job.world_size()
    );
    supervise(workers)
}

fn supervise(mut workers: Vec<(usize, Child)>) -> Result<()> {
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut interrupts_forwarded = 0;
    let mut running: Vec<bool> = vec![true; workers.len()];
    while running.iter().any(|r| *r) {
        let interrupts = interrupt::count();
        while interrupts_forwarded < interrupts {
            for ((_, child), alive) in workers.iter().zip(&running) {
                if *alive {
                    interrupt::send(child);
                }
            }
            interrupts_forwarded += 1;
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
            for ((rank, child), alive) in workers.iter_mut().zip(running.iter_mut()) {
                if *alive {
                    tracing::warn!("rank {rank} did not stop after the failure; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    *alive = false;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
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

/// A port nothing listens on now (the OS picks it); rank 0 binds it moments later.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
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
    fn multi_node_needs_an_endpoint() {
        let job = Job {
            nnodes: 2,
            nproc_per_node: 1,
            node_rank: 0,
            endpoint: None,
            threads_per_worker: None,
        };
        let e = launch(&job, &[]).unwrap_err().to_string();
        assert!(e.contains("--master_addr"), "{e}");
    }
}
