//! Graceful interruption of long loops. While a [`Guard`] is alive, SIGINT (Ctrl-C) or
//! SIGTERM (a scheduler's preemption notice) only sets a flag that the loop polls at a
//! point where stopping loses nothing: the trainer checks it between steps, writes every
//! SAE's checkpoint and stops, so the same command resumes where it was. The handler
//! restores the default action first, so a second signal ends the process at once.
//! Without a guard (and off Linux) the signals keep their default action.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "linux")]
extern "C" fn on_signal(sig: libc::c_int) {
    // Both calls are async-signal-safe.
    REQUESTED.store(true, Ordering::SeqCst);
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

#[cfg(target_os = "linux")]
fn set_handlers(handler: libc::sighandler_t) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only stores an atomic and calls signal().
        unsafe {
            libc::signal(sig, handler);
        }
    }
}

/// Catches SIGINT and SIGTERM until dropped (then their default action is back).
pub struct Guard(());

impl Guard {
    /// Clear any earlier request and start catching the signals.
    pub fn install() -> Guard {
        REQUESTED.store(false, Ordering::SeqCst);
        #[cfg(target_os = "linux")]
        set_handlers(on_signal as *const () as libc::sighandler_t);
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        set_handlers(libc::SIG_DFL);
    }
}

/// Whether SIGINT or SIGTERM arrived since the last [`Guard::install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
