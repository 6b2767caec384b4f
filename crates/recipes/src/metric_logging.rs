//! Metric loggers: torchtune's `DiskLogger` (its exact line format, or JSONL), `StdoutLogger`, and
//! a `TensorBoardLogger` that writes real event files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tune_core::{ArgSpec, ArgType, Args, Component, ComponentKind};

/// One step's metrics, in the order they are logged.
pub type Metrics = Vec<(String, f64)>;

pub trait MetricLogger {
    fn log(&mut self, step: usize, metrics: &Metrics) -> Result<()>;
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Formats a float as Python's `repr` does (`0.0`, `0.0015`, `1e-05`, `4.599398612976074`), so
/// log files read exactly like torchtune's.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// torchtune's line for a step (Disk and Stdout loggers), its trailing space included.
fn step_line(step: usize, metrics: &Metrics) -> String {
    let mut line = format!("Step {step} | ");
    for (k, v) in metrics {
        line.push_str(&format!("{k}:{} ", py_float(*v)));
    }
    line
}

/// torchtune's `DiskLogger`: `log_dir/log_{unix_time}.txt` with lines
/// `Step N | loss:X lr:Y tokens_per_second_per_gpu:Z ` (or one JSON object per line with
/// `output_fmt: jsonl`).
pub struct DiskLogger {
    pub path: PathBuf,
    file: File,
    jsonl: bool,
}

impl DiskLogger {
    /// Appends to `log_dir/filename`, or to `log_dir/log_{unix_time}.txt` (`.jsonl`) without one.
    pub fn new(log_dir: &Path, filename: Option<&str>, jsonl: bool) -> Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create log_dir {}", log_dir.display()))?;
        let path = match filename.filter(|f| !f.is_empty()) {
            Some(name) => log_dir.join(name),
            None => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let ext = if jsonl { "jsonl" } else { "txt" };
                log_dir.join(format!("log_{stamp}.{ext}"))
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open log file {}", path.display()))?;
        tracing::info!("Writing logs to {}", path.display());
        Ok(DiskLogger { path, file, jsonl })
    }
}

impl MetricLogger for DiskLogger {
    fn log(&mut self, step: usize, metrics: &Metrics) -> Result<()> {
        let line = if self.jsonl {
            let mut obj = serde_json::Map::new();
            obj.insert("step".into(), step.into());
            for (k, v) in metrics {
                obj.insert(k.clone(), serde_json::json!(v));
            }
            serde_json::Value::Object(obj).to_string()
        } else {
            step_line(step, metrics)
        };
        writeln!(self.file, "{line}").context("cannot write the metric log (disk full?)")?;
        self.file.flush()?;
        Ok(())
    }
}

/// torchtune's `StdoutLogger`.
pub struct StdoutLogger;

impl MetricLogger for StdoutLogger {
    fn log(&mut self, step: usize, metrics: &Metrics) -> Result<()> {
        let line = step_line(step, metrics);
        crate::progress::suspend(|| println!("{line}"));
        Ok(())
    }
}

/// Writes TensorBoard event files (TFRecord framing, `Event` protos with scalar summaries).
pub struct TensorBoardLogger {
    pub path: PathBuf,
    file: File,
}

impl TensorBoardLogger {
    pub fn new(log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create log_dir {}", log_dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        // torch's SummaryWriter's name: time, host, process, writer number.
        let path = log_dir.join(format!(
            "events.out.tfevents.{:010}.{host}.{}.0",
            now.as_secs(),
            std::process::id()
        ));
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut logger = TensorBoardLogger { path, file };
        let mut event = Vec::new();
        proto_double(&mut event, 1, now.as_secs_f64());
        proto_bytes(&mut event, 3, b"brain.Event:2");
        logger.write_record(&event)?;
        Ok(logger)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .context("cannot write TensorBoard events (disk full?)")?;
        self.file.flush()?;
        Ok(())
    }
}

impl MetricLogger for TensorBoardLogger {
    fn log(&mut self, step: usize, metrics: &Metrics) -> Result<()> {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut summary = Vec::new();
        for (tag, value) in metrics {
            proto_bytes(&mut summary, 1, &scalar_value(tag, *value as f32));
        }
        let mut event = Vec::new();
        proto_double(&mut event, 1, wall);
        proto_varint_field(&mut event, 2, step as u64);
        proto_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }
}

/// A `Summary.Value` as torch's `add_scalar(..., new_style=True)` writes it (torchtune's
/// TensorBoardLogger): a scalar float tensor tagged for the scalars plugin, which TensorBoard
/// reads as a tensor event (`EventAccumulator.Tensors`).
fn scalar_value(tag: &str, value: f32) -> Vec<u8> {
    let mut tensor = Vec::new();
    proto_varint_field(&mut tensor, 1, 1); // dtype: DT_FLOAT (no shape: a scalar)
    proto_bytes(&mut tensor, 5, &value.to_le_bytes()); // float_val, packed
    let mut plugin = Vec::new();
    proto_bytes(&mut plugin, 1, b"scalars"); // plugin_name
    let mut metadata = Vec::new();
    proto_bytes(&mut metadata, 1, &plugin); // plugin_data
    let mut v = Vec::new();
    proto_bytes(&mut v, 1, tag.as_bytes()); // tag
    proto_bytes(&mut v, 8, &tensor); // tensor
    proto_bytes(&mut v, 9, &metadata); // metadata
    v
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn proto_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    varint(out, (field as u64) << 3);
    varint(out, v);
}

fn proto_double(out: &mut Vec<u8>, field: u32, v: f64) {
    varint(out, ((field as u64) << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn proto_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// What a `metric_logger` node asks for.
#[derive(Debug, Clone)]
pub enum LoggerSpec {
    Disk {
        log_dir: PathBuf,
        filename: Option<String>,
        jsonl: bool,
    },
    Stdout,
    TensorBoard {
        log_dir: PathBuf,
    },
}

impl LoggerSpec {
    pub fn open(&self) -> Result<Box<dyn MetricLogger>> {
        Ok(match self {
            LoggerSpec::Disk {
                log_dir,
                filename,
                jsonl,
            } => Box::new(DiskLogger::new(log_dir, filename.as_deref(), *jsonl)?),
            LoggerSpec::Stdout => Box::new(StdoutLogger),
            LoggerSpec::TensorBoard { log_dir } => Box::new(TensorBoardLogger::new(log_dir)?),
        })
    }
}

fn disk(args: &Args) -> Result<LoggerSpec> {
    let fmt: String = args.get("output_fmt")?;
    let jsonl = match fmt.as_str() {
        "txt" | "text" => false,
        "jsonl" => true,
        other => bail!("metric_logger.output_fmt `{other}`: use `txt` or `jsonl`"),
    };
    Ok(LoggerSpec::Disk {
        log_dir: PathBuf::from(args.get::<String>("log_dir")?),
        filename: args.get_opt("filename")?,
        jsonl,
    })
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.training.metric_logging.DiskLogger",
        aliases: &["DiskLogger", "torchtune.utils.metric_logging.DiskLogger"],
        kind: ComponentKind::MetricLogger,
        args: &[ArgSpec::required("log_dir", ArgType::Str), ArgSpec::optional("output_fmt", ArgType::Str, "txt"), ArgSpec::nullable("filename", ArgType::Str)],
        // torchtune's loggers take **kwargs (a `project` shared with a W&B node, ...).
        extra_args: true,
        about: "appends `Step N | loss:... lr:...` lines (or JSONL) to log_dir/filename, by default log_<time>.txt",
        origin: "built-in",
        build: |args| Ok(Box::new(disk(args)?)),
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.training.metric_logging.StdoutLogger",
        aliases: &["StdoutLogger", "torchtune.utils.metric_logging.StdoutLogger"],
        kind: ComponentKind::MetricLogger,
        args: &[],
        extra_args: true,
        about: "prints metrics to stdout",
        origin: "built-in",
        build: |_| Ok(Box::new(LoggerSpec::Stdout)),
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.training.metric_logging.TensorBoardLogger",
        aliases: &["TensorBoardLogger", "torchtune.utils.metric_logging.TensorBoardLogger"],
        kind: ComponentKind::MetricLogger,
        args: &[ArgSpec::required("log_dir", ArgType::Str), ArgSpec::optional("organize_logs", ArgType::Bool, "true")],
        extra_args: true,
        about: "writes TensorBoard event files (in log_dir/run_0_<time> with organize_logs, the default)",
        origin: "built-in",
        build: |args| {
            let mut log_dir = PathBuf::from(args.get::<String>("log_dir")?);
            // As torchtune: each run in its own `run_{rank}_{time}` folder (only rank 0 logs).
            if args.get::<bool>("organize_logs")? {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                log_dir = log_dir.join(format!("run_0_{now}"));
            }
            Ok(Box::new(LoggerSpec::TensorBoard { log_dir }))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As torchtune's, the TensorBoard logger puts each run in its own `run_0_<time>` folder
    /// unless `organize_logs: False`.
    #[test]
    fn tensorboard_runs_get_their_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = |extra: &str| -> PathBuf {
            let node: serde_yaml::Value =
                serde_yaml::from_str(&format!("{{log_dir: {:?}{extra}}}", dir.path())).unwrap();
            let built = tune_core::registry::lookup("TensorBoardLogger")
                .unwrap()
                .build_from(&node)
                .unwrap();
            match *built.downcast::<LoggerSpec>().unwrap() {
                LoggerSpec::TensorBoard { log_dir } => log_dir,
                other => panic!("{other:?}"),
            }
        };
        let organized = log_dir("");
        assert_eq!(organized.parent(), Some(dir.path()));
        let name = organized
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("run_0_"), "{name}");
        assert_eq!(log_dir(", organize_logs: false"), dir.path());
    }

    /// torchtune's `DiskLogger(filename=...)` writes that file in `log_dir`; without one,
    /// `log_<unix time>.txt`.
    #[test]
    fn disk_logger_writes_the_named_file() {
        let dir = tempfile::tempdir().unwrap();
        let node: serde_yaml::Value = serde_yaml::from_str(&format!(
            "{{log_dir: {:?}, filename: run1.txt}}",
            dir.path()
        ))
        .unwrap();
        let spec =
            disk(&Args::new(tune_core::registry::lookup("DiskLogger").unwrap(), &node).unwrap())
                .unwrap();
        let mut logger = spec.open().unwrap();
        logger.log(1, &vec![("loss".into(), 2.5)]).unwrap();
        drop(logger);
        let text = std::fs::read_to_string(dir.path().join("run1.txt")).unwrap();
        assert_eq!(text, "Step 1 | loss:2.5 \n");
        let unnamed = DiskLogger::new(dir.path(), None, false).unwrap();
        let name = unnamed
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("log_") && name.ends_with(".txt"), "{name}");
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(0.0015), "0.0015");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(4.599398612976074), "4.599398612976074");
        assert_eq!(py_float(0.00288581929876693), "0.00288581929876693");
        assert_eq!(py_float(0.0001141807012330699), "0.0001141807012330699");
        assert_eq!(py_float(3.0), "3.0");
        assert_eq!(py_float(1.5e16), "1.5e+16");
    }

    #[test]
    fn tensorboard_records_are_framed_with_masked_crc() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoardLogger::new(dir.path()).unwrap();
        tb.log(1, &vec![("loss".into(), 2.5)]).unwrap();
        let bytes = std::fs::read(&tb.path).unwrap();
        // Walk the records: each length and payload must carry a valid masked CRC32C.
        let mut pos = 0;
        let mut records = 0;
        let mut last = Vec::new();
        while pos < bytes.len() {
            let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(&bytes[pos..pos + 8]));
            let data = &bytes[pos + 12..pos + 12 + len];
            let data_crc =
                u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked_crc(data));
            last = data.to_vec();
            pos += 16 + len;
            records += 1;
        }
        assert_eq!(records, 2);
        // The value goes as torch's new-style scalar, byte for byte: torch 2.15's
        // `summary.scalar("loss", 2.5, new_style=True).SerializeToString()`.
        let torch_summary: [u8; 31] = [
            10, 29, 10, 4, 108, 111, 115, 115, 66, 8, 8, 1, 42, 4, 0, 0, 32, 64, 74, 11, 10, 9, 10,
            7, 115, 99, 97, 108, 97, 114, 115,
        ];
        assert!(last.ends_with(&torch_summary), "{last:?}");
        // Known value: TensorFlow's masked CRC of an empty payload.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "torchtune.training.metric_logging.WandBLogger",
        aliases: &["WandBLogger", "torchtune.utils.metric_logging.WandBLogger"],
        why: "Weights & Biases has no client outside Python. Log with \
              torchtune.training.metric_logging.TensorBoardLogger (log_dir: ...) and upload its \
              event files with `wandb sync <log_dir>`",
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "torchtune.training.metric_logging.CometLogger",
        aliases: &["CometLogger", "torchtune.utils.metric_logging.CometLogger"],
        why: "Comet has no client outside Python. Log with \
              torchtune.training.metric_logging.TensorBoardLogger or DiskLogger instead",
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "torchtune.training.metric_logging.MLFlowLogger",
        aliases: &["MLFlowLogger", "torchtune.utils.metric_logging.MLFlowLogger"],
        why: "MLflow's client is Python. Log with torchtune.training.metric_logging.TensorBoardLogger \
              or DiskLogger instead",
    }
}
