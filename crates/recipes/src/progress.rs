//! The progress bar a recipe shows on the terminal, and writing around it: a log line or a
//! `Step N | ...` line printed while the bar is drawn would land on the bar's line. Everything
//! printed during a run goes through [`suspend`], which clears the bar, prints, and redraws it.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle, WeakProgressBar};

/// The bar being drawn, if any (held weakly: it goes when the recipe drops it).
static ACTIVE: Mutex<Option<WeakProgressBar>> = Mutex::new(None);

/// A bar of `len` steps drawn as `template` (indicatif's), which output goes around.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.downgrade());
    bar
}

/// Runs `print` with the active bar cleared (and redrawn after), or as it is without one.
pub fn suspend<R>(print: impl FnOnce() -> R) -> R {
    let active = ACTIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(WeakProgressBar::upgrade);
    match active {
        Some(bar) if !bar.is_finished() => bar.suspend(print),
        _ => print(),
    }
}
