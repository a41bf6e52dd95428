//! containerd-shim-podbox-v2: see the podbox-shim library.

use std::io::Write;
use std::process::ExitCode;

use podbox_shim::service::{run, Reply};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args, &mut std::io::stdin()) {
        Ok(reply) => {
            let bytes = match &reply {
                Reply::Address(address) => address.as_bytes(),
                Reply::Deleted(response) => response.as_slice(),
            };
            let mut stdout = std::io::stdout();
            if stdout.write_all(bytes).and_then(|()| stdout.flush()).is_err() {
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
