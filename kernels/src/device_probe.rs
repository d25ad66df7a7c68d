//! Whether a backend has a usable device, asked once per process and written once for the library,
//! the CLI and every test: device discovery panics inside Burn when there is none, so the probe
//! runs a tiny computation on a thread of its own and catches that panic.
//!
//! The process's panic hook is never swapped: the first probe wraps the hook in place (once) with
//! one that stays silent for probe threads only and passes every other thread's panic on, so no
//! panic elsewhere is lost while a probe runs.

use std::sync::Once;

/// The name of the threads probes run on; the wrapped hook keeps their panics quiet.
const PROBE_THREAD: &str = "prefer-device-probe";

fn quiet_probe_threads() {
    static WRAP: Once = Once::new();
    WRAP.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(PROBE_THREAD) {
                previous(info);
            }
        }));
    });
}

/// Runs `work` on a probe thread: `Ok` when it returns, or the first line of its panic message.
pub fn probe_with(work: impl FnOnce() + Send + 'static) -> Result<(), String> {
    quiet_probe_threads();
    let joined = std::thread::Builder::new()
        .name(PROBE_THREAD.into())
        .spawn(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)))
        .map_err(|e| format!("could not start the probe thread: {e}"))?
        .join();
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(payload)) | Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "device initialisation failed".into());
            Err(message.lines().next().unwrap_or_default().to_string())
        }
    }
}

/// Whether backend `B` can compute on `device`; the error is the backend's complaint.
pub fn probe<B: burn::tensor::backend::Backend>(device: &B::Device) -> Result<(), String> {
    let device = device.clone();
    probe_with(move || {
        burn::tensor::Tensor::<B, 1>::ones([4], &device)
            .sum()
            .into_data();
    })
}

/// Whether the wgpu backend has an adapter (asked once; false when wgpu is not compiled in).
pub fn wgpu_available() -> bool {
    #[cfg(feature = "wgpu")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| probe::<burn::backend::Wgpu>(&Default::default()).is_ok())
    }
    #[cfg(not(feature = "wgpu"))]
    false
}

/// For tests: whether to run on wgpu. Without an adapter the test skips with a notice on stderr,
/// unless `REQUIRE_WGPU=1` (as in CI), where a missing adapter fails it.
pub fn wgpu_ready(test: &str) -> bool {
    let ok = wgpu_available();
    if !ok {
        assert!(
            std::env::var("REQUIRE_WGPU").map_or(true, |v| v != "1"),
            "{test}: REQUIRE_WGPU=1 but no wgpu adapter was found (install mesa-vulkan-drivers)"
        );
        eprintln!("{test}: skipped on wgpu: no adapter found");
    }
    ok
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};

    use super::*;

    #[test]
    fn a_probe_reports_the_failure_and_other_threads_panics_still_reach_the_hook() {
        // A hook that records which threads panicked (other tests may panic too: only names count).
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = seen.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            record.lock().unwrap().push(name);
            previous(info);
        }));
        // While the probe runs, another thread panics: its panic must reach the hook.
        let (tx, rx) = mpsc::channel();
        let result = probe_with(move || {
            let other = std::thread::Builder::new()
                .name("panics-during-a-probe".into())
                .spawn(|| panic!("elsewhere"))
                .unwrap();
            let _ = other.join();
            tx.send(()).unwrap();
            panic!("no adapter\nsecond line");
        });
        rx.recv().unwrap();
        assert_eq!(result, Err("no adapter".to_string()));
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.iter().any(|n| n == "panics-during-a-probe"),
            "a panic during the probe was swallowed: {seen:?}"
        );
        assert_eq!(probe_with(|| ()), Ok(()));
    }
}
