//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine: with `reboot=k` Linux writes the "pulse reset line" command
//! (0xfe) to the command port, and the VMM ends with status 0.

use std::sync::Arc;

use crate::exit::{ExitLatch, VmExit};

/// i8042 data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

const CMD_PULSE_RESET: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<ExitLatch>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitLatch>) -> Self {
        Self { exit }
    }

    /// Status reads 0: output buffer empty, input buffer free, so the
    /// kernel's wait-for-ready loops end at once.
    pub fn read(&self, port: u16) -> u8 {
        match port {
            I8042_DATA_PORT | I8042_COMMAND_PORT => 0,
            _ => 0xff,
        }
    }

    pub fn write(&self, port: u16, value: u8) {
        if port == I8042_COMMAND_PORT && value == CMD_PULSE_RESET {
            self.exit.trigger(VmExit::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm_successfully() {
        let latch = Arc::new(ExitLatch::new());
        let dev = I8042::new(latch.clone());
        dev.write(I8042_DATA_PORT, CMD_PULSE_RESET);
        dev.write(I8042_COMMAND_PORT, 0xd1);
        assert!(!latch.is_set(), "only 0xfe on the command port resets");
        assert_eq!(dev.read(I8042_COMMAND_PORT), 0);
        dev.write(I8042_COMMAND_PORT, CMD_PULSE_RESET);
        assert_eq!(latch.wait(), VmExit::GuestReset);
    }
}
