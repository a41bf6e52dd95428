//! Logs to stderr, which is the serial console when the agent is /init.

use std::io::Write;

struct ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(
                std::io::stderr(),
                "podbox-agent[{}] {}: {}",
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: ConsoleLogger = ConsoleLogger;

pub fn init(level: log::LevelFilter) {
    // A second init (e.g. tests) keeps the first logger; nothing to do.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
