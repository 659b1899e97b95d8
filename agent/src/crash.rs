//! Named crash points for the crash tests. In a debug build with the `failpoints` feature,
//! `FAILPOINTS="create.after_mount=return"` in the agent's environment makes the agent SIGKILL
//! itself when it reaches that step, exactly as a `kill -9` landing there would: no destructor
//! runs, nothing is flushed. In release builds, and without the feature, the points compile to
//! nothing.
//!
//! The points are named `<operation>.<step>` after the step that has just been done; the list is
//! `STEPS`, which the crash tests walk.

/// Every crash point, in the order an operation reaches them.
pub const STEPS: &[&str] = &[
    "create.after_record",
    "create.after_cgroup",
    "create.after_image",
    "create.after_attach",
    "create.after_mount",
    "create.during_init",
    "create.after_init",
    "start.after_spawn",
    "restart.after_intent",
    "restart.after_stop",
    "hibernate.after_intent",
    "hibernate.after_stop",
    "resize.after_record",
    "resize.after_limits",
    "resize.after_image_grow",
    "delete.after_intent",
    "delete.after_stop",
    "delete.after_cgroup",
    "delete.after_unmount",
    "delete.after_detach",
    "delete.after_trash",
];

/// Dies here if the crash tests asked for it (see the module doc).
#[macro_export]
macro_rules! crash_point {
    ($step:literal) => {
        #[cfg(all(feature = "failpoints", debug_assertions))]
        {
            if fail::eval($step, |_| ()).is_some() {
                $crate::crash::die($step);
            }
        }
    };
}

/// Reads `FAILPOINTS` once at start; the returned guard keeps them configured.
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    let armed = std::env::var("FAILPOINTS").ok()?;
    tracing::warn!(failpoints = %armed, "crash points armed (a test build)");
    Some(fail::FailScenario::setup())
}

#[cfg(not(all(feature = "failpoints", debug_assertions)))]
pub fn setup() -> Option<()> {
    None
}

/// SIGKILLs this process: the closest thing to `kill -9` arriving at this very step.
pub fn die(step: &str) -> ! {
    tracing::error!(step, "crash point reached: killing the agent with SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    // SIGKILL cannot be caught; this is never reached.
    std::process::abort()
}
