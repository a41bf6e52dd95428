//! `podbox-vmm`: boot a guest kernel and run it until it exits.
//!
//! Exit status 0 when the guest resets the VM (`reboot -f`); otherwise a
//! non-zero status and one line saying why.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use podbox_vmm::config::VmArgs;
use podbox_vmm::{builder, fatal};

/// Test hook for vmm/tests/panic_exit.rs, in debug builds only: with
/// `PODBOX_VMM_TEST_PANIC_THREAD=NAME` in the environment, a thread named
/// NAME panics while another thread spins for ever and the main thread
/// waits on it, as a VMM's event loop would carry on past a dead device
/// thread. Only [`fatal::exit_on_panic`] ends the process then. It is read
/// once, before the command line; the guest has no way to set it.
#[cfg(debug_assertions)]
fn test_panic_trigger() {
    let Some(name) = std::env::var_os("PODBOX_VMM_TEST_PANIC_THREAD") else {
        return;
    };
    let spinner = std::thread::Builder::new()
        .name("test-spin".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(10));
        })
        .expect("spawning the test spinner");
    std::thread::Builder::new()
        .name(name.to_string_lossy().into_owned())
        .spawn(|| panic!("test panic requested by PODBOX_VMM_TEST_PANIC_THREAD"))
        .expect("spawning the test panic thread");
    let _ = spinner.join();
}

fn main() -> ExitCode {
    let started = Instant::now();
    // First, before any thread exists: a panic in any of them ends the VMM.
    fatal::exit_on_panic();
    #[cfg(debug_assertions)]
    test_panic_trigger();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODBOX_LOG")
                // virtio-queue logs guest ring mistakes at error level,
                // one line each; the devices count and rate-limit those.
                .unwrap_or_else(|_| "info,virtio_queue=off".into()),
        )
        .with_target(false)
        .init();
    let config = match VmArgs::parse().into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("podbox-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    match builder::run(&config, started) {
        Ok(exit) if exit.exit_code() == 0 => {
            tracing::info!("{exit}");
            ExitCode::SUCCESS
        }
        Ok(exit) => {
            eprintln!("podbox-vmm: {exit}");
            ExitCode::from(exit.exit_code())
        }
        Err(e) => {
            eprintln!("podbox-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}
