//! Built-in guests: small 64-bit programs, assembled here from source (no
//! binaries in the repo), using only integer instructions.
//!
//! Every vCPU starts at [`brisk_boot::layout::CODE`] in long mode with
//! `rdi` = its index and `rsi` = the vCPU count, interrupts off, and its own
//! stack. Guests report progress by incrementing their per-vCPU counter at
//! [`brisk_boot::layout::progress`], which tests and benchmarks read.
//!
//! ```
//! let hello = brisk_guests::find("hello").unwrap();
//! let code = (hello.assemble)().unwrap();
//! assert!(!code.is_empty());
//! ```

mod asm;
mod programs;

use iced_x86::IcedError;

/// A built-in guest.
#[derive(Clone, Copy)]
pub struct Builtin {
    /// Name used on the command line.
    pub name: &'static str,
    /// One line for `brisk guests`.
    pub about: &'static str,
    /// Whether it ends by itself (power-off or debug-exit).
    pub ends: bool,
    /// Assemble the program for loading at `layout::CODE`.
    pub assemble: fn() -> Result<Vec<u8>, IcedError>,
}

/// Every built-in guest.
pub const ALL: &[Builtin] = &[
    Builtin {
        name: "hello",
        about: "each vCPU prints \"Hello from vCPU N\" in turn on the UART; the last powers off (status 0)",
        ends: true,
        assemble: programs::hello,
    },
    Builtin {
        name: "spin",
        about: "busy loop forever, counting iterations",
        ends: false,
        assemble: programs::spin,
    },
    Builtin {
        name: "pio",
        about: "tight `in` loop on the vCPU's counter device (one exit per iteration)",
        ends: false,
        assemble: programs::pio,
    },
    Builtin {
        name: "halt",
        about: "HLT with interrupts off, forever; counts each time it is woken",
        ends: false,
        assemble: programs::halt,
    },
    Builtin {
        name: "mixed",
        about: "alternates a spin phase, a PIO phase and HLT, forever",
        ends: false,
        assemble: programs::mixed,
    },
    Builtin {
        name: "debug-exit",
        about: "vCPU 0 prints a line and writes 0x21 to the debug-exit port (status 67)",
        ends: true,
        assemble: programs::debug_exit,
    },
];

/// The value the `debug-exit` guest writes to the debug-exit port.
pub const DEBUG_EXIT_VALUE: u8 = 0x21;

/// Look up a built-in guest by name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|g| g.name == name)
}
