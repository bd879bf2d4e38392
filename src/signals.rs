//! Signals (CONTRACT.md "Shutdown"): SIGINT or SIGTERM starts the graceful drain; a second one
//! exits at once; if the drain is not done within its budget + 5 s, the process exits anyway.
//! SIGHUP runs the reload hook (the TLS pair) when there is one; otherwise `dev` treats it as a
//! stop (a closed terminal) and `serve` ignores it.
//!
//! The signals are blocked in every thread (the mask is set before any thread starts and is
//! inherited) and one thread takes them with `sigwait`, so no handler runs in a shard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use net::server::Control;

/// Margin after the drain budget before the process exits whatever is left (CONTRACT.md).
pub(crate) const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// The signals this module takes, blocked in the calling thread and every thread it spawns.
pub(crate) struct Blocked(libc::sigset_t);

/// Blocks SIGINT, SIGTERM and SIGHUP. Call before spawning any other thread.
pub(crate) fn block() -> Result<Blocked> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("cannot block signals: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(Blocked(set))
    }
}

/// What the signal thread does besides draining.
pub(crate) struct Hooks {
    /// SIGHUP: reload (the TLS pair).
    pub(crate) reload: Option<Box<dyn Fn() + Send>>,
    /// Whether SIGHUP without a reload hook stops the process (`dev`).
    pub(crate) hangup_stops: bool,
    /// Runs before any exit the signal thread itself makes (`dev`: stop PostgreSQL).
    pub(crate) before_exit: fn(),
    /// Runs when the drain starts (cluster mode: say goodbye to the other nodes).
    pub(crate) on_drain: Option<Box<dyn Fn() + Send>>,
}

fn name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

/// Waits for one of the blocked signals, for at most `timeout`; `None` on timeout.
fn wait(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<libc::c_int> {
    loop {
        let signal = match timeout {
            None => {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` holds blocked signals; sigwait stores the one received.
                if unsafe { libc::sigwait(set, &mut signal) } != 0 {
                    continue;
                }
                signal
            }
            Some(timeout) => {
                let spec = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
                // SAFETY: `set` holds blocked signals; a null siginfo is allowed.
                let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &spec) };
                if signal < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return None;
                }
                signal
            }
        };
        return Some(signal);
    }
}

/// Ends the process now, without running exit handlers: the shards are still running, and
/// `exit(3)`'s handlers may wait on state those threads hold (seen as a hang under load).
pub(crate) fn exit_now(code: i32) -> ! {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // SAFETY: _exit has no preconditions; it ends the process at once.
    unsafe { libc::_exit(code) }
}

/// Starts the signal thread for a server that drains with `control` within `drain`.
pub(crate) fn spawn(blocked: Blocked, control: Arc<Control>, drain: Duration, hooks: Hooks) -> Result<()> {
    let set = blocked.0;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let first = loop {
                let signal = wait(&set, None).expect("no timeout");
                match (signal, &hooks.reload) {
                    (libc::SIGHUP, Some(reload)) => reload(),
                    (libc::SIGHUP, None) if !hooks.hangup_stops => tracing::info!("SIGHUP ignored: nothing to reload"),
                    _ => break signal,
                }
            };
            tracing::warn!(signal = name(first), drain_secs = drain.as_secs(), "draining (a second signal stops at once)");
            control.start_drain();
            if let Some(on_drain) = &hooks.on_drain {
                on_drain();
            }
            let deadline = Instant::now() + drain + EXIT_MARGIN;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match wait(&set, Some(left)) {
                    Some(libc::SIGHUP) => {
                        if let Some(reload) = &hooks.reload {
                            reload();
                        }
                    }
                    Some(signal) => {
                        tracing::warn!(signal = name(signal), "second signal: stopping now");
                        (hooks.before_exit)();
                        exit_now(128 + signal);
                    }
                    None => {
                        tracing::warn!("the drain did not finish in time: stopping now");
                        (hooks.before_exit)();
                        exit_now(0);
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
