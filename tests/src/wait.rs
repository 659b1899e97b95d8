//! Polling instead of sleeping: wait until a condition holds, or fail with what was last seen.
//! Timeouts here only stop a hung test; they are not performance goals. Under CPU emulation (the
//! v2 VM) everything is several times slower, so `DORMANT_TEST_TIME_SCALE` stretches them.

use std::time::{Duration, Instant};

/// How much longer than on native hardware waits may take (`DORMANT_TEST_TIME_SCALE`, default 1).
pub fn time_scale() -> u32 {
    std::env::var("DORMANT_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1)
}

/// `PGCONNECT_TIMEOUT` for the tests' clients, in seconds: a hang guard like the waits, so it is
/// stretched by the time scale too. 10 s was too short in the VM, where a 0.25-core tenant
/// answered a login later than that while other tests ran initdb beside it.
pub fn client_connect_timeout() -> String {
    (15 * time_scale()).to_string()
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` (times the
/// time scale) with `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let timeout = timeout * time_scale();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
