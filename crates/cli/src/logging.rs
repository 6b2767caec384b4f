//! Logging to stderr with `tracing-subscriber`.
//!
//! The level is `RUST_LOG` when set (any `EnvFilter` directive, e.g. `debug` or
//! `tune_recipes=trace`), else the config's `log_level` (torchtune's names: DEBUG, INFO,
//! WARNING, ERROR, CRITICAL), else INFO. Ranks other than 0 of a distributed run log warnings
//! and errors only (rank 0 speaks for the job), unless `RUST_LOG` says otherwise.

use std::io::IsTerminal;

use anyhow::{bail, Result};
use tracing_subscriber::EnvFilter;

/// Starts logging; `log_level` is the config's `log_level` value, if it has one.
pub fn init(log_level: Option<&str>) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => filter,
            Err(e) => bail!("RUST_LOG={directives:?} is not a valid log filter: {e}"),
        },
        _ => {
            let level = level(log_level.unwrap_or("INFO"))?;
            let quiet_rank = std::env::var("RANK").is_ok_and(|r| r.trim() != "0")
                && std::env::var_os("WORLD_SIZE").is_some();
            if quiet_rank && matches!(level, "info" | "debug" | "trace") {
                EnvFilter::new("warn")
            } else {
                EnvFilter::new(level)
            }
        }
    };
    // A second init (only in tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| AroundTheBar)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    Ok(())
}

/// Standard error, written with a recipe's progress bar cleared: each log line is one write,
/// which would otherwise land on the bar's line.
struct AroundTheBar;

impl std::io::Write for AroundTheBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        tune_recipes::progress::suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// torchtune's (Python's) level names, as `tracing` levels.
fn level(name: &str) -> Result<&'static str> {
    Ok(match name.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARN" | "WARNING" => "warn",
        "ERROR" | "CRITICAL" | "FATAL" => "error",
        "OFF" | "NONE" => "off",
        _ => bail!("log_level `{name}` is not a level; use DEBUG, INFO, WARNING or ERROR"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_level_names() {
        assert_eq!(super::level("INFO").unwrap(), "info");
        assert_eq!(super::level("warning").unwrap(), "warn");
        assert_eq!(super::level("CRITICAL").unwrap(), "error");
        assert!(super::level("LOUD").is_err());
    }
}
