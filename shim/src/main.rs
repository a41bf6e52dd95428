//! containerd-shim-podbox-v2: see the podbox-shim library.
//!
//! `start` and `delete` are short commands containerd runs; without an
//! action (and with `-socket`) this is the long-lived server that `start`
//! spawned for a pod.

use std::io::Write;
use std::process::ExitCode;

use podbox_shim::service::{run, Reply};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match containerd_shim::parse(&args) {
        Ok(flags) if flags.action.is_empty() && !flags.socket.is_empty() => return serve(flags),
        _ => {}
    }
    match run(&args, &mut std::io::stdin()) {
        Ok(reply) => {
            let bytes = match &reply {
                Reply::Address(address) => address.as_bytes(),
                Reply::Deleted(response) => response.as_slice(),
            };
            let mut stdout = std::io::stdout();
            if stdout
                .write_all(bytes)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            // containerd puts a failed start's stderr into the client's error.
            eprintln!("containerd-shim-podbox-v2: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(flags: containerd_shim::Flags) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("containerd-shim-podbox-v2: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(podbox_shim::serve::serve(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("containerd-shim-podbox-v2: {error}");
            ExitCode::FAILURE
        }
    }
}
