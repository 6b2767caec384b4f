//! Data-parallel process groups over TCP: what `lora_finetune_distributed` needs from
//! `torch.distributed` — rendezvous, sum all-reduce, broadcast — and nothing more.
//!
//! Every rank holds the whole (frozen) model and its own share of each batch; after the backward
//! the adapter gradients, token counts and losses are summed across ranks, so every rank takes
//! the identical optimizer step. LoRA gradients are small (17.9M values for `llama2/7B_lora`), so a
//! star through rank 0 is enough: rank 0 adds the contributions in rank order and sends the sum
//! back, which makes the result bit-identical on every rank (and independent of arrival order).
//!
//! Ranks find each other through the variables torchrun uses — `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` — which `tune run --nproc_per_node N` sets for its
//! worker processes, plus `TUNE_DIST_JOB`, a token that keeps two jobs that meet on one port
//! apart. Without `WORLD_SIZE` the group is a single process and every collective is the
//! identity. `TUNE_DIST_TIMEOUT_S` bounds every wait (default 30 minutes).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// First bytes of every connection: tells a tune-rs rank from anything else on the port.
/// Changes whenever the handshake does, so mismatched binaries fail at the hello.
const HELLO_MAGIC: &[u8; 8] = b"TUNERS02";

/// What a launcher joining a c10d rendezvous (the CLI's) sends first, so that rank 0, which
/// listens on the same port once the rendezvous is over, can name a late one.
pub const RENDEZVOUS_MAGIC: &[u8; 8] = b"TUNERDZ1";

/// How long a rank waits for the others (rendezvous, and each collective), unless
/// `TUNE_DIST_TIMEOUT_S` says otherwise. Generous like NCCL's: rank 0 may be saving a checkpoint.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long a new connection may take to introduce itself before rank 0 drops it.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A wait on other ranks says it is still waiting after this long, then at doubling intervals:
/// a stuck rank would otherwise mean silence until the timeout (30 minutes by default).
const FIRST_NOTICE: Duration = Duration::from_secs(60);

/// When a long wait should say so.
struct Patience {
    started: Instant,
    next_notice: Duration,
}

impl Patience {
    fn new() -> Patience {
        Patience {
            started: Instant::now(),
            next_notice: FIRST_NOTICE,
        }
    }

    /// The seconds waited, when it is time to say so.
    fn notice_due(&mut self) -> Option<u64> {
        let waited = self.started.elapsed();
        (waited >= self.next_notice).then(|| {
            self.next_notice *= 2;
            waited.as_secs()
        })
    }

    /// How long until the next notice is due.
    fn until_notice(&self) -> Duration {
        self.next_notice.saturating_sub(self.started.elapsed())
    }
}

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

/// How long any wait on other ranks may take: `TUNE_DIST_TIMEOUT_S`, else 30 minutes.
pub fn timeout_from_env() -> Result<Duration> {
    match env_usize("TUNE_DIST_TIMEOUT_S")? {
        Some(0) => bail!("TUNE_DIST_TIMEOUT_S=0: the timeout must be at least 1 second"),
        Some(seconds) => Ok(Duration::from_secs(seconds as u64)),
        None => Ok(DEFAULT_TIMEOUT),
    }
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
            Some((info, endpoint)) => {
                let job = env_usize("TUNE_DIST_JOB")?.unwrap_or(0) as u64;
                ProcessGroup::connect_job(info, &endpoint, job, timeout_from_env()?)
            }
        }
    }

    /// Rank 0 listens on `endpoint` and waits for every other rank; the others connect to it
    /// (retrying until rank 0 is up). Fails after `timeout` with the ranks still missing.
    pub fn connect(info: RankInfo, endpoint: &str, timeout: Duration) -> Result<ProcessGroup> {
        ProcessGroup::connect_job(info, endpoint, 0, timeout)
    }

    /// [`connect`](Self::connect) for the job `job`: rank 0 accepts only ranks with the same token.
    pub fn connect_job(
        info: RankInfo,
        endpoint: &str,
        job: u64,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        if info.world_size == 1 {
            return Ok(ProcessGroup {
                info,
                ..ProcessGroup::single()
            });
        }
        let links = if info.rank == 0 {
            Links::Root(accept_ranks(info.world_size, endpoint, job, timeout)?)
        } else {
            Links::Leaf(connect_to_root(info, endpoint, job, timeout)?)
        };
        tracing::debug!("rank {} of {} joined the group", info.rank, info.world_size);
        let mut group = ProcessGroup {
            info,
            links,
            sequence: 0,
        };
        // Every rank returns only once the whole group has formed: a rank that rank 0 accepted
        // before giving up fails here, not after loading a model.
        group.barrier()?;
        Ok(group)
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

    /// How long each later collective may wait for another rank.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        match &self.links {
            Links::Single => {}
            Links::Root(peers) => {
                for peer in peers {
                    configure(peer, timeout)?;
                }
            }
            Links::Leaf(root) => configure(root, timeout)?,
        }
        Ok(())
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
    /// Fails on every rank unless all ranks hold the same `value` (compared by hash with rank
    /// 0's); `what` names it in the error. A group of one agrees with itself.
    pub fn check_all_agree(&mut self, value: &impl std::hash::Hash, what: &str) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        use std::hash::Hasher;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut hasher);
        let fingerprint = hasher.finish();
        let reference = self.broadcast_u64(fingerprint)?;
        let mut disagree = [f64::from(u8::from(reference != fingerprint))];
        self.all_reduce_sum_f64(&mut disagree)?;
        if disagree[0] > 0.0 {
            bail!(
                "{} of {} ranks were started with another {what} than rank 0; start every rank \
                 with the same config and overrides",
                disagree[0],
                self.world_size()
            );
        }
        Ok(())
    }

    pub fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum_f64(&mut [])
    }

    /// Sums tensors (any dtype, any device) across ranks, in place of the inputs. One message
    /// carries all of them, in f32.
    pub fn all_reduce_tensors(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut flat = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
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
                .and_then(|()| wait_for_data(root, self.info.rank, 0, header.sequence))
                .and_then(|()| receive(root, &header, values, |slot, sum| *slot = sum))
                .map_err(|e| peer_error(e, self.info.rank, 0, header.sequence)),
            Links::Root(peers) => {
                // Adds each rank's values as they arrive, in rank order.
                for (i, peer) in peers.iter_mut().enumerate() {
                    wait_for_data(peer, 0, i + 1, header.sequence)
                        .and_then(|()| {
                            receive(peer, &header, values, |slot, x| *slot = slot.add(x))
                        })
                        .map_err(|e| peer_error(e, 0, i + 1, header.sequence))?;
                }
                for (i, peer) in peers.iter_mut().enumerate() {
                    send(peer, &header, values)
                        .map_err(|e| peer_error(e, 0, i + 1, header.sequence))?;
                }
                Ok(())
            }
        }
    }
}

/// Another rank closed its connection mid-collective: it failed, or was interrupted.
#[derive(Debug)]
pub struct PeerLost {
    pub me: usize,
    pub peer: usize,
    pub sequence: u64,
}

impl std::fmt::Display for PeerLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} lost rank {} during collective #{} (that rank probably failed; its error is \
             printed above)",
            self.me, self.peer, self.sequence
        )
    }
}

/// What went wrong talking to `peer`: a timeout, a rank that went away, or a protocol error.
fn peer_error(e: anyhow::Error, me: usize, peer: usize, sequence: u64) -> anyhow::Error {
    use std::io::ErrorKind;
    let kind = e.downcast_ref::<std::io::Error>().map(|io| io.kind());
    match kind {
        Some(ErrorKind::WouldBlock | ErrorKind::TimedOut) => e.context(format!(
            "rank {me} timed out waiting for rank {peer} in collective #{sequence}; if that rank \
             is just slow (a long checkpoint save), raise TUNE_DIST_TIMEOUT_S (seconds)"
        )),
        Some(_) => e.context(PeerLost { me, peer, sequence }),
        None => e.context(format!(
            "rank {me} and rank {peer} disagree in collective #{sequence}"
        )),
    }
}

/// A free loopback `host:port` (the OS picks the port), for a group on this machine.
pub fn free_local_endpoint() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    Ok(format!("127.0.0.1:{}", listener.local_addr()?.port()))
}

/// A host as written in an endpoint, without the brackets of an IPv6 address (`[::1]`).
pub fn bare_host(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `host` names this machine's loopback itself: `localhost` or a loopback address (not a
/// host name that happens to resolve to one, such as Debian's `127.0.1.1` for its own name).
pub fn names_loopback(host: &str) -> bool {
    host == "localhost"
        || bare_host(host)
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where rank 0 listens: `endpoint` itself on loopback, else every interface on its port (a
/// host name may resolve to a loopback address on its own machine, unreachable from others).
pub fn listen_address(endpoint: &str) -> Result<String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .with_context(|| format!("{endpoint}: expected HOST:PORT"))?;
    let ip = bare_host(host).parse::<std::net::IpAddr>().ok();
    let loopback = names_loopback(host);
    Ok(match (loopback, ip) {
        (true, _) => endpoint.to_string(),
        (false, Some(std::net::IpAddr::V6(_))) => format!("[::]:{port}"),
        (false, _) => format!("0.0.0.0:{port}"),
    })
}

fn accept_ranks(
    world_size: usize,
    endpoint: &str,
    job: u64,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let address = listen_address(endpoint)?;
    let listener = TcpListener::bind(&address).with_context(|| {
        format!(
            "rank 0 cannot listen on {address} (from MASTER_ADDR:MASTER_PORT {endpoint}); is the \
             port in use? Pick another port (--master_port, or the port of --rdzv_endpoint)"
        )
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut patience = Patience::new();
    let mut peers: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false)?;
                configure(&stream, HELLO_TIMEOUT)?;
                let rank = match read_hello(&mut stream, world_size, job) {
                    Ok(rank) if peers[rank - 1].is_some() => {
                        let why = format!("RANK={rank} has already joined");
                        let _ = reply(&mut stream, Err(&why));
                        bail!("two processes claim RANK={rank}; each rank must be started once");
                    }
                    Ok(rank) => rank,
                    Err(e) => {
                        // Tell the stranger why, so it fails instead of waiting on us.
                        let _ = reply(&mut stream, Err(&format!("{e:#}")));
                        tracing::warn!("turned away a connection from {from}: {e:#}");
                        continue;
                    }
                };
                reply(&mut stream, Ok(()))
                    .with_context(|| format!("rank {rank} went away while joining"))?;
                configure(&stream, timeout)?;
                peers[rank - 1] = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let missing_ranks = || -> Vec<String> {
                    peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect()
                };
                if let Some(waited) = patience.notice_due() {
                    tracing::warn!(
                        "rank 0 has waited {waited}s on {endpoint} for rank(s) {} to connect; \
                         it gives up after {}s (TUNE_DIST_TIMEOUT_S)",
                        missing_ranks().join(", "),
                        timeout.as_secs()
                    );
                }
                if Instant::now() > deadline {
                    let missing = missing_ranks();
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

fn connect_to_root(
    info: RankInfo,
    endpoint: &str,
    job: u64,
    timeout: Duration,
) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let mut patience = Patience::new();
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
            stream.write_all(&job.to_le_bytes())?;
            let mut verdict = [0u8; 1];
            stream.read_exact(&mut verdict).map_err(|e| {
                let what = match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        "accepted the connection but never answered (is another program on \
                         that port?)"
                    }
                    _ => "closed the connection before accepting this rank",
                };
                anyhow::anyhow!("no tune-rs rank 0 at {endpoint}: it {what} ({e})")
            })?;
            if verdict[0] != 1 {
                let mut reason = String::new();
                let _ = stream.read_to_string(&mut reason);
                bail!(
                    "rank 0 at {endpoint} turned rank {} away: {reason}",
                    info.rank
                );
            }
            return Ok(stream);
        }
        if let Some(waited) = patience.notice_due() {
            tracing::warn!(
                "rank {} has tried to reach rank 0 at {endpoint} for {waited}s; it gives up after \
                 {}s (TUNE_DIST_TIMEOUT_S)",
                info.rank,
                timeout.as_secs()
            );
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

/// Rank 0's answer to a hello: 1 (joined), or 0 and the reason, then the connection closes.
fn reply(stream: &mut TcpStream, verdict: std::result::Result<(), &str>) -> std::io::Result<()> {
    match verdict {
        Ok(()) => stream.write_all(&[1]),
        Err(why) => {
            stream.write_all(&[0])?;
            stream.write_all(why.as_bytes())
        }
    }
}

fn read_hello(stream: &mut TcpStream, world_size: usize, job: u64) -> Result<usize> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if &magic == RENDEZVOUS_MAGIC {
        bail!(
            "a launcher came to join the c10d rendezvous on this port, which has already \
             completed: start every node of the job together"
        );
    }
    if &magic != HELLO_MAGIC {
        bail!("not a rank of this tune-rs version (use the same `tune` binary on every node)");
    }
    let mut word = [0u8; 8];
    stream.read_exact(&mut word)?;
    let rank = u64::from_le_bytes(word) as usize;
    stream.read_exact(&mut word)?;
    let their_world = u64::from_le_bytes(word) as usize;
    stream.read_exact(&mut word)?;
    if u64::from_le_bytes(word) != job {
        bail!(
            "it belongs to another job (TUNE_DIST_JOB differs: every node must pass the same \
             --rdzv_id, or none, and the same --master_port)"
        );
    }
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
    const BYTES: usize;
    fn add(self, other: Self) -> Self;
    fn write(self, out: &mut [u8]);
    fn read(bytes: &[u8]) -> Self;
}

macro_rules! wire_float {
    ($t:ty, $bytes:expr) => {
        impl Element for $t {
            const BYTES: usize = $bytes;
            fn add(self, other: Self) -> Self {
                self + other
            }
            fn write(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes())
            }
            fn read(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("one value's bytes"))
            }
        }
    };
}

wire_float!(f32, 4);
wire_float!(f64, 8);

/// Values per write or read: large transfers stream through one small buffer instead of
/// allocating (and page-faulting) a message-sized one per collective.
const CHUNK_VALUES: usize = 1 << 16;

fn send<T: Element>(stream: &mut TcpStream, header: &Header, values: &[T]) -> Result<()> {
    stream.write_all(&header.encode())?;
    let mut buf = vec![0u8; CHUNK_VALUES.min(values.len()) * T::BYTES];
    for chunk in values.chunks(CHUNK_VALUES) {
        let bytes = &mut buf[..chunk.len() * T::BYTES];
        for (v, out) in chunk.iter().zip(bytes.chunks_exact_mut(T::BYTES)) {
            v.write(out);
        }
        stream.write_all(bytes)?;
    }
    Ok(())
}

/// Returns once `stream` (rank `me`'s link to rank `peer`) has a message to read, or has closed,
/// within the stream's read timeout; a long wait is logged as it goes.
fn wait_for_data(stream: &TcpStream, me: usize, peer: usize, sequence: u64) -> Result<()> {
    let Some(limit) = stream.read_timeout()? else {
        return Ok(());
    };
    let mut patience = Patience::new();
    let outcome = loop {
        let left = limit.saturating_sub(patience.started.elapsed());
        if left.is_zero() {
            break Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
        // A zero read timeout means none: wait at least a millisecond.
        let slice = left
            .min(patience.until_notice())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(slice))?;
        match stream.peek(&mut [0u8; 1]) {
            // Data, or the peer closed the connection: the read that follows tells which.
            Ok(_) => break Ok(()),
            // A signal (Ctrl-C) arrived: with a receive timeout set the kernel does not restart
            // the call. The handler has done its work; wait on.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if let Some(waited) = patience.notice_due() {
                    // Only rank 0 saves: the others wait on it through every save.
                    let why = if peer == 0 {
                        "it may be saving a checkpoint, or stuck"
                    } else {
                        "it may be slow or stuck"
                    };
                    tracing::warn!(
                        "rank {me} has waited {waited}s for rank {peer} in collective #{sequence} \
                         ({why}); the wait fails after {}s (TUNE_DIST_TIMEOUT_S)",
                        limit.as_secs()
                    );
                }
            }
            Err(e) => break Err(e),
        }
    };
    stream.set_read_timeout(Some(limit))?;
    Ok(outcome?)
}

/// Reads a message of `values.len()` values and hands each to `take(slot, value)`.
fn receive<T: Element>(
    stream: &mut TcpStream,
    expected: &Header,
    values: &mut [T],
    take: impl Fn(&mut T, T),
) -> Result<()> {
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
    let mut buf = vec![0u8; CHUNK_VALUES.min(values.len()) * T::BYTES];
    for chunk in values.chunks_mut(CHUNK_VALUES) {
        let bytes = &mut buf[..chunk.len() * T::BYTES];
        stream.read_exact(bytes)?;
        for (slot, raw) in chunk.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
            take(slot, T::read(raw));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal that interrupts the wait (a Ctrl-C forwarded to the rank) neither fails it nor
    /// loses bytes: the wait goes on until data arrives, and the stream's timeout is restored.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_signal_during_a_wait_is_not_an_error() {
        extern "C" fn ignore(_: libc::c_int) {}
        // SAFETY: installs a handler that does nothing, for a signal no other test uses.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            assert_eq!(
                libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
                0
            );
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            let waited = wait_for_data(&client, 1, 0, 7);
            (waited, client)
        });
        let thread = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: the thread is alive (it is blocked in the wait until the write below).
        assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
        std::thread::sleep(Duration::from_millis(200));
        server.write_all(b"x").unwrap();
        let (waited, mut client) = waiter.join().unwrap();
        waited.unwrap();
        assert_eq!(
            client.read_timeout().unwrap(),
            Some(Duration::from_secs(20))
        );
        let mut byte = [0u8];
        client.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    /// A long wait says so after a minute, then at doubling intervals.
    #[test]
    fn a_long_wait_is_noticed_at_doubling_intervals() {
        let mut patience = Patience {
            started: Instant::now()
                .checked_sub(Duration::from_secs(61))
                .expect("the clock is past a minute"),
            next_notice: FIRST_NOTICE,
        };
        assert_eq!(patience.notice_due(), Some(61));
        assert_eq!(patience.notice_due(), None);
        assert!(patience.until_notice() > Duration::from_secs(58));
        patience.started = patience
            .started
            .checked_sub(Duration::from_secs(60))
            .unwrap();
        assert_eq!(patience.notice_due(), Some(121));
        assert_eq!(patience.next_notice, Duration::from_secs(240));
    }

    /// A launcher that comes to a c10d rendezvous after it completed reaches rank 0 instead, which
    /// says so (and keeps waiting for its ranks).
    #[test]
    fn rank_zero_names_a_late_launcher() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let late = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(address).unwrap();
            stream.write_all(RENDEZVOUS_MAGIC).unwrap();
        });
        let (mut stream, _) = listener.accept().unwrap();
        late.join().unwrap();
        let err = read_hello(&mut stream, 2, 0).unwrap_err().to_string();
        assert!(
            err.contains("rendezvous on this port, which has already completed"),
            "{err}"
        );
    }

    /// Runs `body` on `world` ranks (threads) joined into one group; returns each rank's result.
    fn on_ranks<R: Send + 'static>(
        world: usize,
        body: impl Fn(&mut ProcessGroup) -> Result<R> + Send + Sync + Clone + 'static,
    ) -> Vec<Result<R>> {
        let endpoint = free_local_endpoint().unwrap();
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
        let root = results[0].as_ref().unwrap_err();
        // Typed, so the CLI can tell a lost peer from a rank's own failure.
        assert!(root.downcast_ref::<PeerLost>().is_some(), "{root:#}");
        let root = root.to_string();
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
        let endpoint = free_local_endpoint().unwrap();
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
    fn a_rank_of_another_job_is_turned_away() {
        let endpoint = free_local_endpoint().unwrap();
        let info = |rank| RankInfo {
            rank,
            world_size: 2,
            local_rank: rank,
        };
        let stranger = {
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                ProcessGroup::connect_job(info(1), &endpoint, 7, Duration::from_secs(5))
            })
        };
        let root = ProcessGroup::connect_job(info(0), &endpoint, 8, Duration::from_secs(1));
        let e = root.err().unwrap().to_string();
        assert!(e.contains("rank(s) 1 never connected"), "{e}");
        // The stranger learns why at once instead of waiting for a collective.
        let e = stranger.join().unwrap().err().unwrap().to_string();
        assert!(
            e.contains("turned rank 1 away") && e.contains("another job"),
            "{e}"
        );
    }

    #[test]
    fn a_slow_rank_is_reported_as_a_timeout_not_a_crash() {
        let endpoint = free_local_endpoint().unwrap();
        let root = {
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                let info = RankInfo {
                    rank: 0,
                    world_size: 2,
                    local_rank: 0,
                };
                let mut group = ProcessGroup::connect(info, &endpoint, Duration::from_secs(20))?;
                group.set_timeout(Duration::from_millis(300))?;
                group.barrier()
            })
        };
        let info = RankInfo {
            rank: 1,
            world_size: 2,
            local_rank: 1,
        };
        let group = ProcessGroup::connect(info, &endpoint, Duration::from_secs(5)).unwrap();
        let e = format!("{:#}", root.join().unwrap().unwrap_err());
        assert!(e.contains("timed out waiting for rank 1"), "{e}");
        assert!(e.contains("TUNE_DIST_TIMEOUT_S"), "{e}");
        drop(group);
    }

    #[test]
    fn rank_zero_listens_on_all_interfaces_unless_on_loopback() {
        assert_eq!(
            listen_address("127.0.0.1:29500").unwrap(),
            "127.0.0.1:29500"
        );
        assert_eq!(
            listen_address("localhost:29500").unwrap(),
            "localhost:29500"
        );
        assert_eq!(listen_address("node0:29500").unwrap(), "0.0.0.0:29500");
        assert_eq!(listen_address("10.1.2.3:29500").unwrap(), "0.0.0.0:29500");
        assert_eq!(listen_address("[::1]:29500").unwrap(), "[::1]:29500");
        assert_eq!(listen_address("[fd00::2]:29500").unwrap(), "[::]:29500");
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
