//! Ctrl-C (SIGINT, or SIGTERM) during `tune run`: while a training loop runs, the first asks it to
//! save a checkpoint and stop at the next step boundary and the second quits at once; at any
//! other time (loading, evaluation, generation) the first quits. The distributed launcher counts
//! interrupts instead and forwards each one to its workers. Two interrupts within half a second
//! count as one press.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

static RECEIVED: AtomicUsize = AtomicUsize::new(0);
static FORWARDING: AtomicBool = AtomicBool::new(false);
/// When the last counted interrupt arrived.
static LAST_AT: Mutex<Option<Instant>> = Mutex::new(None);
/// An interrupt this soon after the previous one is the same Ctrl-C delivered twice (by the
/// terminal to the process group and again by a wrapper such as `timeout` or a job runner
/// forwarding it), not a second press.
const SAME_PRESS: Duration = Duration::from_millis(500);
/// Set by the launcher in each worker's environment (the launcher's process id).
pub const LAUNCHER_PID_VAR: &str = "TUNE_LAUNCHER_PID";

/// The signal a worker gets when its launcher dies (`PR_SET_PDEATHSIG`): its own, so that it
/// never counts as a second Ctrl-C, however often it arrives.
#[cfg(target_os = "linux")]
pub const LAUNCHER_DIED: libc::c_int = libc::SIGUSR2;

/// A launched worker whose launcher died: save and stop at the next step (idempotent), or end
/// at once when no training loop would save.
#[cfg(target_os = "linux")]
extern "C" fn launcher_died(_: libc::c_int) {
    // Only async-signal-safe work here: atomics and _exit.
    if tune_core::recipe::stop_is_listened() {
        tune_core::recipe::request_stop();
    } else {
        // SAFETY: _exit is async-signal-safe and ends the process without running anything.
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handlers (once per process).
pub fn install() -> Result<()> {
    #[cfg(target_os = "linux")]
    if std::env::var_os(LAUNCHER_PID_VAR).is_some() {
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe.
        unsafe {
            libc::signal(
                LAUNCHER_DIED,
                launcher_died as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    ctrlc::set_handler(|| {
        // ctrlc runs this on its own thread, not in the signal handler: a lock is fine. A
        // launched worker has its own process group: only its launcher's (already counted)
        // interrupts reach it, so it takes every one.
        if std::env::var_os(LAUNCHER_PID_VAR).is_none() {
            let mut last = LAST_AT.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < SAME_PRESS) {
                return;
            }
            *last = Some(Instant::now());
        }
        let received = RECEIVED.fetch_add(1, Ordering::SeqCst) + 1;
        if FORWARDING.load(Ordering::SeqCst) {
            return;
        }
        // In a distributed job rank 0 speaks for all ranks.
        let speaks = std::env::var("RANK").map_or(true, |r| r.trim() == "0");
        if !tune_core::recipe::stop_is_listened() {
            // Loading, evaluating, generating: nothing would save, so stop now.
            std::process::exit(130);
        }
        if received == 1 {
            tune_core::recipe::request_stop();
            if speaks {
                eprintln!(
                    "\nInterrupted: saving a checkpoint at the next step boundary, then stopping \
                     (press Ctrl-C again to quit without saving)"
                );
            }
        } else {
            if speaks {
                eprintln!("\nInterrupted again: quitting without saving");
            }
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")
}

/// Interrupts received so far.
pub fn count() -> usize {
    RECEIVED.load(Ordering::SeqCst)
}

/// In the launcher: count interrupts and leave them to [`send`], instead of acting on them.
pub fn set_forwarding(on: bool) {
    FORWARDING.store(on, Ordering::SeqCst);
}

/// Passes one interrupt on to a worker process.
pub fn send(child: &std::process::Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    #[cfg(not(unix))]
    let _ = child;
}
