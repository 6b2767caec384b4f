//! torchrun's c10d rendezvous, for `tune run --nnodes N --rdzv_backend c10d --rdzv_endpoint
//! HOST:PORT` without `--node_rank`: the nodes' launchers meet at the endpoint and are given
//! their node ranks there.
//!
//! The launcher on HOST listens at PORT and is node 0 (rank 0 listens on that host). Every other
//! launcher connects and is given the next node rank in order of arrival. Nodes must agree on
//! the job (`--rdzv_id`), `--nnodes` and `--nproc_per_node`. Only when all N have met does the
//! host answer them, and it closes the port first: workers then use the same port to reach
//! rank 0, so no worker can reach the rendezvous by mistake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

const MAGIC: &[u8; 8] = b"TUNERDZ1";

/// How long a connected stranger gets to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What every node of one job must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meeting {
    pub job_token: u64,
    pub nnodes: usize,
    pub nproc_per_node: usize,
}

/// This node's rank, once all `meeting.nnodes` launchers have met at `host:port` (or `timeout`
/// passed).
pub fn node_rank(host: &str, port: u16, meeting: Meeting, timeout: Duration) -> Result<usize> {
    let endpoint = format!("{host}:{port}");
    let deadline = Instant::now() + timeout;
    if is_this_machine(&endpoint)? {
        let address = tune_recipes::distributed::listen_address(&endpoint)?;
        match TcpListener::bind(&address) {
            Ok(listener) => return host_meeting(listener, &endpoint, meeting, deadline).map(|_| 0),
            // Another launcher on this machine hosts it (or the port is taken: the handshake
            // will say so).
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot listen on {address} for the rendezvous at {endpoint}")
                })
            }
        }
    }
    join_meeting(&endpoint, meeting, deadline)
}

/// Is `endpoint`'s host an address of this machine (one it can listen on)?
fn is_this_machine(endpoint: &str) -> Result<bool> {
    let addresses: Vec<SocketAddr> = endpoint
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the rendezvous endpoint {endpoint}"))?
        .collect();
    Ok(addresses
        .iter()
        .any(|a| TcpListener::bind(SocketAddr::new(a.ip(), 0)).is_ok()))
}

/// Node 0: waits for the other nodes, then closes the port and tells each its rank.
fn host_meeting(
    listener: TcpListener,
    endpoint: &str,
    meeting: Meeting,
    deadline: Instant,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    tracing::info!(
        "hosting the rendezvous at {endpoint}: waiting for {} more node(s)",
        meeting.nnodes - 1
    );
    let mut joined: Vec<TcpStream> = Vec::new();
    while joined.len() + 1 < meeting.nnodes {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
                stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
                match read_hello(&mut stream, meeting) {
                    Ok(()) => {
                        tracing::info!("node {} joined from {from}", joined.len() + 1);
                        joined.push(stream);
                    }
                    Err(e) => {
                        // Tell the stranger why, so that it fails instead of waiting.
                        let _ = answer(&mut stream, Err(&format!("{e:#}")));
                        tracing::warn!("turned away a connection from {from}: {e:#}");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "the rendezvous at {endpoint} timed out with {} of {} nodes; start \
                         `tune run` with the same --nnodes, --rdzv_endpoint and --rdzv_id on \
                         every node (TUNE_DIST_TIMEOUT_S sets the wait)",
                        joined.len() + 1,
                        meeting.nnodes
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a node at the rendezvous"),
        }
    }
    drop(listener);
    for (index, stream) in joined.iter_mut().enumerate() {
        let node_rank = index + 1;
        answer(stream, Ok(node_rank))
            .with_context(|| format!("node {node_rank} left the rendezvous"))?;
    }
    Ok(())
}

/// Reads a node's introduction; an error says how it differs from this job.
fn read_hello(stream: &mut TcpStream, meeting: Meeting) -> Result<()> {
    let mut magic = [0u8; 8];
    stream
        .read_exact(&mut magic)
        .context("the peer sent no introduction")?;
    if &magic != MAGIC {
        bail!("not a tune-rs launcher joining a rendezvous");
    }
    let mut read_u64 = || -> Result<u64> {
        let mut bytes = [0u8; 8];
        stream.read_exact(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    };
    let (token, nnodes, nproc) = (read_u64()?, read_u64()?, read_u64()?);
    if token != meeting.job_token {
        bail!("it belongs to another job (a different --rdzv_id)");
    }
    if nnodes != meeting.nnodes as u64 || nproc != meeting.nproc_per_node as u64 {
        bail!(
            "it says --nnodes {nnodes} --nproc_per_node {nproc}, the host --nnodes {} \
             --nproc_per_node {}; every node must say the same",
            meeting.nnodes,
            meeting.nproc_per_node
        );
    }
    Ok(())
}

/// `[1] + node rank`, or `[0] + why`.
fn answer(stream: &mut TcpStream, verdict: Result<usize, &str>) -> std::io::Result<()> {
    match verdict {
        Ok(node_rank) => {
            stream.write_all(&[1])?;
            stream.write_all(&(node_rank as u64).to_le_bytes())?;
        }
        Err(why) => {
            stream.write_all(&[0])?;
            stream.write_all(why.as_bytes())?;
        }
    }
    stream.flush()
}

/// Any other node: connects (retrying until the host is up) and waits for its rank.
fn join_meeting(endpoint: &str, meeting: Meeting, deadline: Instant) -> Result<usize> {
    loop {
        let addresses = endpoint
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve the rendezvous endpoint {endpoint}"))?;
        let connected = addresses
            .into_iter()
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok());
        if let Some(mut stream) = connected {
            let left = deadline.saturating_duration_since(Instant::now());
            stream.set_read_timeout(Some(left.max(HELLO_TIMEOUT)))?;
            stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
            stream.write_all(MAGIC)?;
            for value in [
                meeting.job_token,
                meeting.nnodes as u64,
                meeting.nproc_per_node as u64,
            ] {
                stream.write_all(&value.to_le_bytes())?;
            }
            let mut verdict = [0u8; 1];
            stream.read_exact(&mut verdict).map_err(|e| {
                anyhow!(
                    "no tune-rs rendezvous answered at {endpoint} ({e}); is another program on \
                     that port, or did the other nodes not start within the timeout?"
                )
            })?;
            if verdict[0] == 1 {
                let mut rank = [0u8; 8];
                stream
                    .read_exact(&mut rank)
                    .context("the rendezvous host went away")?;
                return Ok(u64::from_le_bytes(rank) as usize);
            }
            let mut why = String::new();
            let _ = stream.read_to_string(&mut why);
            bail!("the rendezvous at {endpoint} turned this node away: {why}");
        }
        if Instant::now() > deadline {
            bail!(
                "could not reach the rendezvous at {endpoint}; is `tune run` running on that \
                 host with the same --rdzv_endpoint? (TUNE_DIST_TIMEOUT_S sets the wait)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    const MEETING: Meeting = Meeting {
        job_token: 7,
        nnodes: 3,
        nproc_per_node: 2,
    };

    #[test]
    fn three_nodes_get_three_ranks() {
        let port = free_port();
        let nodes: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(move || {
                    node_rank("127.0.0.1", port, MEETING, Duration::from_secs(20))
                })
            })
            .collect();
        let mut ranks: Vec<usize> = nodes
            .into_iter()
            .map(|n| n.join().unwrap().unwrap())
            .collect();
        ranks.sort();
        assert_eq!(ranks, [0, 1, 2]);
        // The host closed the port: rank 0 can listen there now.
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn nodes_of_another_job_or_shape_are_turned_away() {
        let port = free_port();
        let host = std::thread::spawn(move || {
            let two = Meeting {
                nnodes: 2,
                ..MEETING
            };
            node_rank("127.0.0.1", port, two, Duration::from_secs(20))
        });
        std::thread::sleep(Duration::from_millis(200));
        let deadline = Instant::now() + Duration::from_secs(20);
        let join = |meeting| join_meeting(&format!("127.0.0.1:{port}"), meeting, deadline);
        let other_job = Meeting {
            job_token: 8,
            nnodes: 2,
            ..MEETING
        };
        let err = join(other_job).unwrap_err().to_string();
        assert!(err.contains("another job"), "{err}");
        let other_shape = Meeting {
            nnodes: 2,
            nproc_per_node: 1,
            ..MEETING
        };
        let err = join(other_shape).unwrap_err().to_string();
        assert!(err.contains("--nproc_per_node 1"), "{err}");
        // The host still waits for a node that fits.
        let fits = Meeting {
            nnodes: 2,
            ..MEETING
        };
        assert_eq!(join(fits).unwrap(), 1);
        assert_eq!(host.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn a_host_alone_times_out_saying_how_many_came() {
        let err = node_rank(
            "127.0.0.1",
            free_port(),
            MEETING,
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("timed out with 1 of 3 nodes"), "{err}");
    }
}
