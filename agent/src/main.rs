//! podbox-agent: PID 1 of a podbox guest. All logic lives in the library.

fn main() {
    std::process::exit(podbox_agent::main_entry(std::env::args().collect()));
}
