//! torchrun's c10d rendezvous, for `tune run --nnodes N --rdzv_backend c10d --rdzv_endpoint
//! HOST:PORT` without `--node_rank`: the nodes' launchers meet at the endpoint and are given
//! their node ranks there.
//!
//! The launcher on HOST (the endpoint names one of its addresses, or its host name) listens at
//! PORT and is node 0, since rank 0 listens on that host. Every other launcher connects, is told
//! at once that it reached a rendezvous, and waits; nodes must agree on the job (`--rdzv_id`),
//! `--nnodes` and `--nproc_per_node`, and one that leaves while waiting is forgotten. When all N
//! are there the host closes the port (workers then use it to reach rank 0, so none can reach the
//! rendezvous by mistake) and answers in two phases: each node gets its rank in order of arrival
//! and acknowledges it, then all are told to start, or all are told why not.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use tune_recipes::distributed::{bare_host, names_loopback, RENDEZVOUS_MAGIC as MAGIC};

/// How long a peer gets for each short step (introduction, acknowledgements).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the host sends: an acknowledgement of a hello, a rank, the start, or a refusal.
const WAITING: u8 = 2;
const RANK: u8 = 1;
const START: u8 = 3;
const REFUSED: u8 = 0;

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
    if let Some(address) = host_address(host, port) {
        match TcpListener::bind(address) {
            Ok(listener) => return host_meeting(listener, &endpoint, meeting, deadline).map(|_| 0),
            // Another launcher on this machine hosts it, or another program has the port: the
            // handshake tells which.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tracing::info!("{address} is taken: joining the rendezvous at {endpoint} there")
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot listen on {address} for the rendezvous at {endpoint}")
                })
            }
        }
    }
    join_meeting(&endpoint, meeting, deadline, STEP_TIMEOUT)
}

/// Where this machine would host the rendezvous, if `host` names it: `localhost` or a loopback
/// address (bound as rank 0 will bind it, the first address it resolves to), else one of its
/// addresses or its host name (bound on every interface, as a host name may resolve to a
/// loopback address on its own machine).
fn host_address(host: &str, port: u16) -> Option<SocketAddr> {
    let addresses: Vec<SocketAddr> = (bare_host(host), port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    if names_loopback(host) {
        return addresses.first().copied();
    }
    let own_name = hostname().is_some_and(|name| {
        name.eq_ignore_ascii_case(host)
            || host
                .split_once('.')
                .is_some_and(|(short, _)| short.eq_ignore_ascii_case(&name))
    });
    let own_address = addresses
        .iter()
        .any(|a| TcpListener::bind(SocketAddr::new(a.ip(), 0)).is_ok());
    let any: std::net::IpAddr = match addresses.first() {
        Some(SocketAddr::V6(_)) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
    };
    (own_name || own_address).then_some(SocketAddr::new(any, port))
}

fn hostname() -> Option<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates what fits.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if status != 0 {
        return None;
    }
    let end = buffer.iter().position(|&b| b == 0)?;
    String::from_utf8(buffer[..end].to_vec()).ok()
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
    let mut joined: Vec<(SocketAddr, TcpStream)> = Vec::new();
    loop {
        if joined.len() + 1 == meeting.nnodes {
            // Complete only if nobody left in the meantime.
            forget_departed(&mut joined);
            if joined.len() + 1 == meeting.nnodes {
                break;
            }
        }
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(STEP_TIMEOUT))?;
                stream.set_write_timeout(Some(STEP_TIMEOUT))?;
                match read_hello(&mut stream, meeting) {
                    Ok(()) if stream.write_all(&[WAITING]).is_ok() => {
                        tracing::info!("a node joined from {from}");
                        joined.push((from, stream));
                    }
                    Ok(()) => tracing::warn!("the node at {from} left while joining"),
                    Err(e) => {
                        // Tell the stranger why, so that it fails instead of waiting.
                        let _ = refuse(&mut stream, &format!("{e:#}"));
                        tracing::warn!("turned away a connection from {from}: {e:#}");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                forget_departed(&mut joined);
                if Instant::now() > deadline {
                    let why = format!(
                        "the rendezvous at {endpoint} timed out with {} of {} nodes; start `tune \
                         run` with the same --nnodes, --nproc_per_node, --rdzv_endpoint and \
                         --rdzv_id on every node (TUNE_DIST_TIMEOUT_S sets the wait)",
                        joined.len() + 1,
                        meeting.nnodes
                    );
                    for (_, stream) in &mut joined {
                        let _ = refuse(stream, &why);
                    }
                    bail!(why);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a node at the rendezvous"),
        }
    }
    drop(listener);
    // Two phases, so that no node starts unless every node will.
    let ranks = joined.iter_mut().enumerate().map(|(index, (_, stream))| {
        let node_rank = (index + 1) as u64;
        stream.write_all(&[RANK])?;
        stream.write_all(&node_rank.to_le_bytes())?;
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack)?;
        Ok::<_, std::io::Error>(ack[0] == RANK)
    });
    let lost = ranks
        .enumerate()
        .find(|(_, acked)| !matches!(acked, Ok(true)))
        .map(|(index, _)| index + 1);
    if let Some(node) = lost {
        let why = format!(
            "node {node} left the rendezvous at {endpoint} as it completed; start the job again"
        );
        for (_, stream) in &mut joined {
            let _ = refuse(stream, &why);
        }
        bail!(why);
    }
    for (_, stream) in &mut joined {
        // A node that goes now fails its own workers; rank 0 reports them missing.
        let _ = stream.write_all(&[START]);
    }
    Ok(())
}

/// Drops the waiting nodes that gave up (Ctrl-C, their own timeout): they no longer count.
fn forget_departed(joined: &mut Vec<(SocketAddr, TcpStream)>) {
    joined.retain(|(from, stream)| {
        let alive = still_connected(stream);
        if !alive {
            tracing::warn!("the node at {from} left the rendezvous");
        }
        alive
    });
}

/// Whether the peer of a waiting node's connection is still there (nothing to read, no EOF).
fn still_connected(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let alive = match stream.peek(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    alive && stream.set_nonblocking(false).is_ok()
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

fn refuse(stream: &mut TcpStream, why: &str) -> std::io::Result<()> {
    stream.write_all(&[REFUSED])?;
    stream.write_all(why.as_bytes())?;
    stream.flush()
}

/// Any other node: connects (retrying until the host is up), then waits for its rank.
fn join_meeting(
    endpoint: &str,
    meeting: Meeting,
    deadline: Instant,
    step_timeout: Duration,
) -> Result<usize> {
    let mut stream = loop {
        // Names may resolve late (a scheduler's DNS): retried like the connection.
        let connected = endpoint.to_socket_addrs().ok().and_then(|addresses| {
            addresses
                .into_iter()
                .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok())
        });
        if let Some(stream) = connected {
            break stream;
        }
        if Instant::now() > deadline {
            bail!(
                "could not reach the rendezvous at {endpoint}; is `tune run` running on that \
                 host with the same --rdzv_endpoint, and does the endpoint name that host's own \
                 address or host name? (TUNE_DIST_TIMEOUT_S sets the wait)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stream.set_read_timeout(Some(step_timeout))?;
    stream.set_write_timeout(Some(step_timeout))?;
    stream.write_all(MAGIC)?;
    for value in [
        meeting.job_token,
        meeting.nnodes as u64,
        meeting.nproc_per_node as u64,
    ] {
        stream.write_all(&value.to_le_bytes())?;
    }
    let no_host = |e: std::io::Error| {
        anyhow!(
            "no tune-rs rendezvous answered at {endpoint} ({e}); is another program on that port?"
        )
    };
    let mut verdict = [0u8; 1];
    stream.read_exact(&mut verdict).map_err(no_host)?;
    if verdict[0] == WAITING {
        tracing::info!("joined the rendezvous at {endpoint}; waiting for the other nodes");
        // The host answers when all have met, or tells why not when it gives up.
        stream.set_read_timeout(None)?;
        stream.read_exact(&mut verdict).map_err(|e| {
            anyhow!("the rendezvous host at {endpoint} went away while this node waited ({e})")
        })?;
    }
    match verdict[0] {
        RANK => {
            stream.set_read_timeout(Some(step_timeout))?;
            let mut rank = [0u8; 8];
            stream
                .read_exact(&mut rank)
                .context("the rendezvous host went away")?;
            stream.write_all(&[RANK])?;
            stream
                .read_exact(&mut verdict)
                .context("the rendezvous host went away before the start")?;
            match verdict[0] {
                START => Ok(u64::from_le_bytes(rank) as usize),
                _ => bail!("the rendezvous at {endpoint} failed: {}", rest(&mut stream)),
            }
        }
        REFUSED => bail!(
            "the rendezvous at {endpoint} turned this node away: {}",
            rest(&mut stream)
        ),
        _ => Err(no_host(std::io::Error::other("an unexpected answer"))),
    }
}

/// The rest of what the host sent: its reason.
fn rest(stream: &mut TcpStream) -> String {
    let mut why = String::new();
    let _ = stream.read_to_string(&mut why);
    why
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

    fn two() -> Meeting {
        Meeting {
            nnodes: 2,
            ..MEETING
        }
    }

    /// The ranks `nodes` concurrent calls of `node` get, sorted.
    fn ranks_of(
        nodes: usize,
        node: impl Fn() -> Result<usize> + Copy + Send + 'static,
    ) -> Vec<usize> {
        let nodes: Vec<_> = (0..nodes).map(|_| std::thread::spawn(node)).collect();
        let mut ranks: Vec<usize> = nodes
            .into_iter()
            .map(|n| n.join().unwrap().unwrap())
            .collect();
        ranks.sort();
        ranks
    }

    fn join(port: u16, meeting: Meeting) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(20);
        join_meeting(
            &format!("127.0.0.1:{port}"),
            meeting,
            deadline,
            STEP_TIMEOUT,
        )
    }

    #[test]
    fn three_nodes_get_three_ranks() {
        for host in ["127.0.0.1", "localhost"] {
            let port = free_port();
            let ranks = ranks_of(3, move || {
                node_rank(host, port, MEETING, Duration::from_secs(20))
            });
            assert_eq!(ranks, [0, 1, 2], "{host}");
            // The host closed the port: rank 0 can listen there now.
            let rank0 = tune_recipes::distributed::listen_address(&format!("{host}:{port}"));
            TcpListener::bind(rank0.unwrap()).unwrap();
        }
    }

    #[test]
    fn nodes_of_another_job_or_shape_are_turned_away() {
        let port = free_port();
        let host = std::thread::spawn(move || {
            node_rank("127.0.0.1", port, two(), Duration::from_secs(20))
        });
        std::thread::sleep(Duration::from_millis(200));
        let other_job = Meeting {
            job_token: 8,
            ..two()
        };
        let err = join(port, other_job).unwrap_err().to_string();
        assert!(err.contains("another job"), "{err}");
        let other_shape = Meeting {
            nproc_per_node: 1,
            ..two()
        };
        let err = join(port, other_shape).unwrap_err().to_string();
        assert!(err.contains("--nproc_per_node 1"), "{err}");
        // The host still waits for a node that fits.
        assert_eq!(join(port, two()).unwrap(), 1);
        assert_eq!(host.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn a_node_that_leaves_while_waiting_is_not_counted() {
        let port = free_port();
        let host = std::thread::spawn(move || {
            node_rank("127.0.0.1", port, MEETING, Duration::from_secs(20))
        });
        std::thread::sleep(Duration::from_millis(200));
        // A launcher that says hello and is then stopped (Ctrl-C) before the others come.
        let mut quitter = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => break stream,
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        quitter.write_all(MAGIC).unwrap();
        for value in [7u64, 3, 2] {
            quitter.write_all(&value.to_le_bytes()).unwrap();
        }
        let mut waiting = [0u8; 1];
        quitter.read_exact(&mut waiting).unwrap();
        assert_eq!(waiting[0], WAITING);
        drop(quitter);
        std::thread::sleep(Duration::from_millis(200));
        // Two more nodes complete the meeting of three without it.
        assert_eq!(ranks_of(2, move || join(port, MEETING)), [1, 2]);
        assert_eq!(host.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn a_host_that_gives_up_tells_the_waiting_nodes() {
        let port = free_port();
        let host = std::thread::spawn(move || {
            node_rank("127.0.0.1", port, MEETING, Duration::from_secs(5))
        });
        std::thread::sleep(Duration::from_millis(200));
        let err = join(port, MEETING).unwrap_err().to_string();
        assert!(err.contains("timed out with 2 of 3 nodes"), "{err}");
        let err = host.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("timed out with 2 of 3 nodes"), "{err}");
    }

    #[test]
    fn a_silent_program_on_the_port_fails_fast() {
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let deadline = Instant::now() + Duration::from_secs(60);
        let started = Instant::now();
        let endpoint = format!("127.0.0.1:{port}");
        let err = join_meeting(&endpoint, two(), deadline, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another program on that port"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn only_this_machine_hosts() {
        assert!(host_address("127.0.0.1", 1).is_some());
        assert!(host_address("[::1]", 1).is_some());
        // TEST-NET-1 (RFC 5737) is nobody's address.
        assert!(host_address("192.0.2.1", 1).is_none());
        if let Some(name) = hostname() {
            assert!(host_address(&name, 1).is_some(), "{name}");
        }
    }
}
