//! Data-parallel process groups over TCP: what `lora_finetune_distributed` needs from
//! `torch.distributed` — rendezvous, sum all-reduce, broadcast — and nothing more.
//!
//! Every rank holds the whole (frozen) model and its own share of each batch; after the backward
//! the adapter gradients, token counts and losses are summed across ranks, so every rank takes
//! the identical optimizer step. LoRA gradients are small (4.2M values for the 7B default), so a
//! star through rank 0 is enough: rank 0 adds the contributions in rank order and sends the sum
//! back, which makes the result bit-identical on every rank (and independent of arrival order).
//!
//! Ranks find each other from torchrun's environment variables — `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` — which `tune run --nproc_per_node N` sets for its
//! worker processes (torchrun --no-python sets the same). Without `WORLD_SIZE` the group is a
//! single process and every collective is the identity.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// First bytes of every connection: tells a tune-rs rank from anything else on the port.
const HELLO_MAGIC: &[u8; 8] = b"TUNERS01";

/// How long a rank waits for the others (rendezvous, and each collective), unless
/// `TUNE_DIST_TIMEOUT_S` says otherwise. Generous like NCCL's: rank 0 may be saving a checkpoint.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where this process sits in a data-parallel job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world_size: usize,
    /// Index among the ranks on this machine: picks `cuda:{local_rank}`.
    pub local_rank: usize,
}

impl RankInfo {
    pub const SINGLE: RankInfo = RankInfo {
        rank: 0,
        world_size: 1,
        local_rank: 0,
    };

    /// From torchrun's variables; `None` when `WORLD_SIZE` is unset (a single process).
    pub fn from_env() -> Result<Option<(RankInfo, String)>> {
        let Some(world) = env_usize("WORLD_SIZE")? else {
            return Ok(None);
        };
        let rank = env_usize("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
        let local_rank = env_usize("LOCAL_RANK")?.unwrap_or(rank);
        if world == 0 || rank >= world {
            bail!("RANK={rank} is not valid with WORLD_SIZE={world}");
        }
        let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = env_usize("MASTER_PORT")?;
        let endpoint = match port {
            Some(port) => format!("{addr}:{port}"),
            None if world == 1 => String::new(),
            None => bail!("WORLD_SIZE={world} needs MASTER_PORT (the port rank 0 listens on)"),
        };
        Ok(Some((
            RankInfo {
                rank,
                world_size: world,
                local_rank,
            },
            endpoint,
        )))
    }
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("environment variable {name}={v:?} is not a number")),
        Err(_) => Ok(None),
    }
}

fn timeout_from_env() -> Result<Duration> {
    Ok(env_usize("TUNE_DIST_TIMEOUT_S")?
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(DEFAULT_TIMEOUT))
}

enum Links {
    Single,
    /// Rank 0: one stream per other rank, index `rank - 1`.
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

/// A group of ranks that run the same steps and agree on every collective.
pub struct ProcessGroup {
    info: RankInfo,
    links: Links,
    /// Collectives issued so far; sent with each one so ranks that drift apart fail loudly
    /// instead of adding unrelated buffers.
    sequence: u64,
}

impl ProcessGroup {
    /// A group of one: collectives return their input.
    pub fn single() -> ProcessGroup {
        ProcessGroup {
            info: RankInfo::SINGLE,
            links: Links::Single,
            sequence: 0,
        }
    }

    /// Joins the group described by the environment (see the module docs), or a group of one.
    pub fn from_env() -> Result<ProcessGroup> {
        match RankInfo::from_env()? {
            None => Ok(ProcessGroup::single()),
            Some((info, endpoint)) => ProcessGroup::connect(info, &endpoint, timeout_from_env()?),
        }
    }

    /// Rank 0 listens on `endpoint` and waits for every other rank; the others connect to it
    /// (retrying until rank 0 is up). Fails after `timeout` with the ranks still missing.
    pub fn connect(info: RankInfo, endpoint: &str, timeout: Duration) -> Result<ProcessGroup> {
        if info.world_size == 1 {
            return Ok(ProcessGroup {
                info,
                ..ProcessGroup::single()
            });
        }
        let links = if info.rank == 0 {
            Links::Root(accept_ranks(info.world_size, endpoint, timeout)?)
        } else {
            Links::Leaf(connect_to_root(info, endpoint, timeout)?)
        };
        tracing::debug!("rank {} of {} joined the group", info.rank, info.world_size);
        Ok(ProcessGroup {
            info,
            links,
            sequence: 0,
        })
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }

    pub fn world_size(&self) -> usize {
        self.info.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.info.local_rank
    }

    /// Rank 0 logs, shows progress and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.info.rank == 0
    }

    /// Replaces `values` on every rank by their elementwise sum over ranks (added in rank order,
    /// so every rank gets the same bits).
    pub fn all_reduce_sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        self.all_reduce(values, Kind::F32)
    }

    /// [`all_reduce_sum_f32`](Self::all_reduce_sum_f32) for counters and losses.
    pub fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        self.all_reduce(values, Kind::F64)
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_u64(&mut self, value: u64) -> Result<u64> {
        // A sum where only rank 0 contributes: exact for any u64 carried as two halves.
        let mine = if self.is_main() { value } else { 0 };
        let mut halves = [(mine >> 32) as f64, (mine & 0xffff_ffff) as f64];
        self.all_reduce_sum_f64(&mut halves)?;
        Ok(((halves[0] as u64) << 32) | halves[1] as u64)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum_f64(&mut [])
    }

    /// Sums tensors (any dtype, any device) across ranks, in place of the inputs. One message
    /// carries all of them, in f32.
    pub fn all_reduce_tensors(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut flat = Vec::new();
        for t in tensors.iter() {
            flat.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        self.all_reduce_sum_f32(&mut flat)?;
        let mut offset = 0;
        for t in tensors.iter_mut() {
            let n = t.elem_count();
            let summed = Tensor::from_slice(&flat[offset..offset + n], t.shape(), t.device())?
                .to_dtype(t.dtype())?;
            *t = summed;
            offset += n;
        }
        Ok(())
    }

    fn all_reduce<T: Element>(&mut self, values: &mut [T], kind: Kind) -> Result<()> {
        self.sequence += 1;
        let header = Header {
            sequence: self.sequence,
            kind,
            len: values.len() as u64,
        };
        match &mut self.links {
            Links::Single => Ok(()),
            Links::Leaf(root) => send(root, &header, values)
                .and_then(|()| receive(root, &header, values))
                .with_context(|| {
                    format!(
                        "rank {} lost rank 0 during collective #{} (rank 0 probably failed; \
                             its error is printed above)",
                        self.info.rank, header.sequence
                    )
                }),
            Links::Root(peers) => {
                let mut incoming = vec![T::ZERO; values.len()];
                for (i, peer) in peers.iter_mut().enumerate() {
                    receive(peer, &header, &mut incoming).with_context(|| {
                        format!(
                            "rank 0 lost rank {} during collective #{} (that rank probably failed; \
                             its error is printed above)",
                            i + 1,
                            header.sequence
                        )
                    })?;
                    for (v, x) in values.iter_mut().zip(&incoming) {
                        *v = v.add(*x);
                    }
                }
                for (i, peer) in peers.iter_mut().enumerate() {
                    send(peer, &header, values).with_context(|| {
                        format!(
                            "rank 0 could not send collective #{} to rank {}",
                            header.sequence,
                            i + 1
                        )
                    })?;
                }
                Ok(())
            }
        }
    }
}

fn accept_ranks(world_size: usize, endpoint: &str, timeout: Duration) -> Result<Vec<TcpStream>> {
    let listener = TcpListener::bind(endpoint).with_context(|| {
        format!(
            "rank 0 cannot listen on {endpoint} (MASTER_ADDR:MASTER_PORT); is the port in use? \
             Pick another with --master_port"
        )
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false)?;
                configure(&stream, timeout)?;
                let rank = match read_hello(&mut stream, world_size) {
                    Ok(rank) => rank,
                    Err(e) => {
                        tracing::warn!("ignoring a connection from {from}: {e:#}");
                        continue;
                    }
                };
                if peers[rank - 1].is_some() {
                    bail!("two processes claim RANK={rank}; each rank must be started once");
                }
                peers[rank - 1] = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rank 0 waited {}s on {endpoint} but rank(s) {} never connected; check that \
                         every node uses the same --master_addr/--master_port and --nnodes",
                        timeout.as_secs(),
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a rank's connection"),
        }
    }
    Ok(peers.into_iter().map(|p| p.expect("all present")).collect())
}

fn connect_to_root(info: RankInfo, endpoint: &str, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = endpoint
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve MASTER_ADDR:MASTER_PORT {endpoint}"))?
            .find_map(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok());
        if let Some(mut stream) = attempt {
            configure(&stream, timeout)?;
            stream.write_all(HELLO_MAGIC)?;
            stream.write_all(&(info.rank as u64).to_le_bytes())?;
            stream.write_all(&(info.world_size as u64).to_le_bytes())?;
            return Ok(stream);
        }
        if Instant::now() > deadline {
            bail!(
                "rank {} could not reach rank 0 at {endpoint} within {}s; is rank 0 running, and \
                 are --master_addr/--master_port right?",
                info.rank,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(())
}

fn read_hello(stream: &mut TcpStream, world_size: usize) -> Result<usize> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if &magic != HELLO_MAGIC {
        bail!("not a tune-rs rank");
    }
    let mut word = [0u8; 8];
    stream.read_exact(&mut word)?;
    let rank = u64::from_le_bytes(word) as usize;
    stream.read_exact(&mut word)?;
    let their_world = u64::from_le_bytes(word) as usize;
    if their_world != world_size {
        bail!("a rank started with WORLD_SIZE={their_world} joined a group of {world_size}; start every rank with the same --nnodes/--nproc_per_node");
    }
    if rank == 0 || rank >= world_size {
        bail!("a process with RANK={rank} joined a group of {world_size}");
    }
    Ok(rank)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    F32 = 1,
    F64 = 2,
}

struct Header {
    sequence: u64,
    kind: Kind,
    len: u64,
}

impl Header {
    const BYTES: usize = 17;

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.sequence.to_le_bytes());
        out[8] = self.kind as u8;
        out[9..].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// The number types a collective carries, little-endian on the wire.
trait Element: Copy {
    const ZERO: Self;
    const BYTES: usize;
    fn add(self, other: Self) -> Self;
    fn write(self, out: &mut [u8]);
    fn read(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const BYTES: usize = 4;
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn write(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes())
    }
    fn read(bytes: &[u8]) -> Self {
        f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const BYTES: usize = 8;
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn write(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes())
    }
    fn read(bytes: &[u8]) -> Self {
        f64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
}

fn send<T: Element>(stream: &mut TcpStream, header: &Header, values: &[T]) -> Result<()> {
    let mut buf = Vec::with_capacity(Header::BYTES + values.len() * T::BYTES);
    buf.extend_from_slice(&header.encode());
    buf.resize(Header::BYTES + values.len() * T::BYTES, 0);
    for (v, chunk) in values
        .iter()
        .zip(buf[Header::BYTES..].chunks_exact_mut(T::BYTES))
    {
        v.write(chunk);
    }
    stream.write_all(&buf)?;
    Ok(())
}

fn receive<T: Element>(stream: &mut TcpStream, expected: &Header, values: &mut [T]) -> Result<()> {
    let mut head = [0u8; Header::BYTES];
    stream.read_exact(&mut head)?;
    let expected_head = expected.encode();
    if head != expected_head {
        let sequence = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(head[9..].try_into().expect("8 bytes"));
        bail!(
            "ranks disagree: expected collective #{} of {} values, got #{sequence} of {len} \
             (ranks must run the same config and data)",
            expected.sequence,
            expected.len
        );
    }
    let mut body = vec![0u8; values.len() * T::BYTES];
    stream.read_exact(&mut body)?;
    for (v, chunk) in values.iter_mut().zip(body.chunks_exact(T::BYTES)) {
        *v = T::read(chunk);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_endpoint() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    }

    /// Runs `body` on `world` ranks (threads) joined into one group; returns each rank's result.
    fn on_ranks<R: Send + 'static>(
        world: usize,
        body: impl Fn(&mut ProcessGroup) -> Result<R> + Send + Sync + Clone + 'static,
    ) -> Vec<Result<R>> {
        let endpoint = free_endpoint();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let endpoint = endpoint.clone();
                let body = body.clone();
                std::thread::spawn(move || {
                    let info = RankInfo {
                        rank,
                        world_size: world,
                        local_rank: rank,
                    };
                    let mut group =
                        ProcessGroup::connect(info, &endpoint, Duration::from_secs(20))?;
                    body(&mut group)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_and_every_rank_gets_the_same_bits() {
        let results = on_ranks(3, |group| {
            let r = group.rank() as f32;
            // Values whose sum depends on the order of addition in f32.
            let mut v = vec![1.0e8 * (r - 1.0), 1.0 + r, 0.1 * r, -r];
            group.all_reduce_sum_f32(&mut v)?;
            let mut counts = [group.rank() as f64 + 0.5];
            group.all_reduce_sum_f64(&mut counts)?;
            Ok((v, counts[0]))
        });
        let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        let expected = {
            // rank 0 + rank 1 + rank 2, in that order.
            let mut acc = [-1.0e8f32, 1.0, 0.0, 0.0];
            for r in 1..3 {
                let r = r as f32;
                for (a, x) in acc
                    .iter_mut()
                    .zip([1.0e8 * (r - 1.0), 1.0 + r, 0.1 * r, -r])
                {
                    *a += x;
                }
            }
            acc
        };
        for (v, count) in &results {
            assert_eq!(v.as_slice(), expected.as_slice());
            assert_eq!(*count, 0.5 + 1.5 + 2.5);
        }
    }

    #[test]
    fn tensors_of_mixed_shapes_and_dtypes_round_trip() {
        let results = on_ranks(2, |group| {
            let device = candle_core::Device::Cpu;
            let r = group.rank() as f32 + 1.0;
            let mut tensors = vec![
                Tensor::new(&[[r, 2.0 * r], [3.0 * r, 4.0 * r]], &device)?,
                Tensor::new(&[r, -r, 0.5], &device)?.to_dtype(DType::BF16)?,
            ];
            group.all_reduce_tensors(&mut tensors)?;
            Ok((
                tensors[0].to_vec2::<f32>()?,
                tensors[1].dtype(),
                tensors[1].to_dtype(DType::F32)?.to_vec1::<f32>()?,
            ))
        });
        for r in results {
            let (a, dtype, b) = r.unwrap();
            assert_eq!(a, vec![vec![3.0, 6.0], vec![9.0, 12.0]]);
            assert_eq!(dtype, DType::BF16);
            assert_eq!(b, vec![3.0, -3.0, 1.0]);
        }
    }

    #[test]
    fn broadcast_carries_rank_zeros_full_u64() {
        let results = on_ranks(3, |group| {
            let mine = if group.is_main() {
                0xfedc_ba98_7654_3210
            } else {
                group.rank() as u64
            };
            group.broadcast_u64(mine)
        });
        for r in results {
            assert_eq!(r.unwrap(), 0xfedc_ba98_7654_3210);
        }
    }

    #[test]
    fn a_rank_that_leaves_is_an_error_naming_it_not_a_hang() {
        let results = on_ranks(3, |group| {
            group.barrier()?;
            if group.rank() == 2 {
                // Rank 2 "crashes": its connection closes when the group is dropped.
                return Ok(());
            }
            let mut v = [1.0f32];
            group.all_reduce_sum_f32(&mut v)?;
            Ok(())
        });
        let root = results[0].as_ref().unwrap_err().to_string();
        assert!(root.contains("lost rank 2"), "{root}");
        let leaf = format!("{:#}", results[1].as_ref().unwrap_err());
        assert!(leaf.contains("lost rank 0"), "{leaf}");
        assert!(results[2].is_ok());
    }

    #[test]
    fn ranks_that_drift_apart_fail_loudly() {
        let results = on_ranks(2, |group| {
            if group.rank() == 1 {
                group.barrier()?; // an extra collective rank 0 does not make
            }
            let mut v = [1.0f32; 3];
            group.all_reduce_sum_f32(&mut v)?;
            Ok(())
        });
        let root = format!("{:#}", results[0].as_ref().unwrap_err());
        assert!(root.contains("ranks disagree"), "{root}");
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        let endpoint = free_endpoint();
        let info = RankInfo {
            rank: 0,
            world_size: 3,
            local_rank: 0,
        };
        let e = ProcessGroup::connect(info, &endpoint, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("rank(s) 1, 2 never connected"),
            "{e}"
        );
    }

    #[test]
    fn a_group_of_one_needs_no_network() {
        let mut group = ProcessGroup::single();
        let mut v = [1.5f32, 2.5];
        group.all_reduce_sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, 2.5]);
        assert_eq!(group.broadcast_u64(42).unwrap(), 42);
    }
}
