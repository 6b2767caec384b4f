//! Ctrl-C (SIGINT, or SIGTERM) during `tune run`: while a training loop runs, the first asks it to
//! save a checkpoint and stop at the next step boundary and the second quits at once; at any
//! other time (loading, evaluation, generation) the first quits. The distributed launcher counts
//! interrupts instead and forwards each one to its workers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result};

static RECEIVED: AtomicUsize = AtomicUsize::new(0);
static FORWARDING: AtomicBool = AtomicBool::new(false);
static ORPHANED: AtomicBool = AtomicBool::new(false);

/// The launcher's process id, in each worker's environment.
pub const LAUNCHER_PID_VAR: &str = "TUNE_LAUNCHER_PID";

/// Whether this is a launched worker whose launcher has died. Its death signal can arrive more
/// than once (once per launcher thread), and must count as one request to save and stop.
fn orphaned_worker() -> bool {
    #[cfg(unix)]
    if let Some(launcher) = std::env::var(LAUNCHER_PID_VAR)
        .ok()
        .and_then(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: getppid has no preconditions and cannot fail.
        return unsafe { libc::getppid() } != launcher;
    }
    false
}

/// Installs the handler (once per process).
pub fn install() -> Result<()> {
    ctrlc::set_handler(|| {
        // The launcher's death asks once to save and stop (however often it is signalled), and
        // never turns a stop already under way into quitting without saving.
        if orphaned_worker()
            && (ORPHANED.swap(true, Ordering::SeqCst) || RECEIVED.load(Ordering::SeqCst) > 0)
        {
            return;
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
