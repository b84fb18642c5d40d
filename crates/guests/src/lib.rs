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
    /// Its interrupts come from brisk's user-space devices (timer,
    /// doorbell), which need `--irqchip user`.
    pub user_irqchip: bool,
    /// Assemble the program for loading at `layout::CODE`.
    pub assemble: fn() -> Result<Vec<u8>, IcedError>,
}

/// Every built-in guest.
pub const ALL: &[Builtin] = &[
    Builtin {
        name: "hello",
        about: "each vCPU prints \"Hello from vCPU N\" in turn on the UART; the last powers off (status 0)",
        ends: true,
        user_irqchip: false,
        assemble: programs::hello,
    },
    Builtin {
        name: "spin",
        about: "busy loop forever, counting iterations",
        ends: false,
        user_irqchip: false,
        assemble: programs::spin,
    },
    Builtin {
        name: "pio",
        about: "tight `in` loop on the vCPU's counter device (one exit per iteration)",
        ends: false,
        user_irqchip: false,
        assemble: programs::pio,
    },
    Builtin {
        name: "halt",
        about: "HLT with interrupts off, forever; counts each time it is woken",
        ends: false,
        user_irqchip: false,
        assemble: programs::halt,
    },
    Builtin {
        name: "mixed",
        about: "alternates a spin phase, a PIO phase and HLT, forever",
        ends: false,
        user_irqchip: false,
        assemble: programs::mixed,
    },
    Builtin {
        name: "tick",
        about: "each vCPU takes 100 timer interrupts (1 ms period, vector 0x20) with HLT between them; the last powers off (needs --irqchip user)",
        ends: true,
        user_irqchip: true,
        assemble: programs::tick,
    },
    Builtin {
        name: "pingpong",
        about: "a token passes round the vCPUs 1000 times through the doorbell (vector 0x21), each HLTing until rung; vCPU 0 powers off (needs --irqchip user)",
        ends: true,
        user_irqchip: true,
        assemble: programs::pingpong,
    },
    Builtin {
        name: "debug-exit",
        about: "vCPU 0 prints a line and writes 0x21 to the debug-exit port (status 67)",
        ends: true,
        user_irqchip: false,
        assemble: programs::debug_exit,
    },
    Builtin {
        name: "stress",
        about: "vCPU i runs spin, pio or halt by i mod 3 (used by `brisk stress`)",
        ends: false,
        user_irqchip: false,
        assemble: programs::stress,
    },
    Builtin {
        name: "triple-fault",
        about: "misbehaves: loads an empty IDT and executes ud2 (triple fault: status 8)",
        ends: true,
        user_irqchip: false,
        assemble: programs::triple_fault,
    },
    Builtin {
        name: "ud2",
        about: "misbehaves: ud2 with no IDT (status 8)",
        ends: true,
        user_irqchip: false,
        assemble: programs::ud2,
    },
    Builtin {
        name: "int3",
        about: "misbehaves: int3 with no IDT (status 8)",
        ends: true,
        user_irqchip: false,
        assemble: programs::int3,
    },
    Builtin {
        name: "mmio-unmapped",
        about: "misbehaves: writes and reads unmapped MMIO; reports all-ones via debug-exit (status 33)",
        ends: true,
        user_irqchip: false,
        assemble: programs::mmio_unmapped,
    },
    Builtin {
        name: "pio-storm",
        about: "misbehaves: out/in on an unclaimed port forever (keeps running, stoppable)",
        ends: false,
        user_irqchip: false,
        assemble: programs::pio_storm,
    },
    Builtin {
        name: "mwait",
        about: "if CPUID offers MONITOR/MWAIT (--mwait exit|passthrough), uses them 1000 times then debug-exit (status 35), unless the host refuses them; otherwise debug-exit status 37 without trying",
        ends: true,
        user_irqchip: false,
        assemble: programs::mwait,
    },
];

/// An address with neither RAM nor a device (below the 4 GiB identity map's end).
pub const UNMAPPED_MMIO: u64 = 0xfeb0_0000;
/// `mmio-unmapped` writes this to the debug-exit port when its read of
/// unmapped MMIO returned all-ones (status 33).
pub const MMIO_ALL_ONES: u8 = 0x10;
/// `mwait` writes this when its MONITOR/MWAIT loop completed (status 35).
pub const MWAIT_DONE: u8 = 0x11;
/// `mwait` writes this when CPUID does not offer MONITOR/MWAIT (status 37).
pub const MWAIT_HIDDEN: u8 = 0x12;

/// What vCPU `id` of the `stress` guest does (the program computes the same
/// `id % 3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StressRole {
    Spin,
    Pio,
    Halt,
}

/// The role of vCPU `id` in the `stress` guest.
pub const fn stress_role(id: usize) -> StressRole {
    match id % 3 {
        0 => StressRole::Spin,
        1 => StressRole::Pio,
        _ => StressRole::Halt,
    }
}

/// Timer interrupts the `tick` guest takes on each vCPU, their vector and
/// period.
pub const TICKS: u64 = 100;
pub const TICK_VECTOR: u8 = 0x20;
pub const TICK_PERIOD_US: u32 = 1000;
/// Rounds of the `pingpong` token (each vCPU receives this many rings) and
/// the doorbell's vector.
pub const PINGPONG_ROUNDS: u64 = 1000;
pub const DOORBELL_VECTOR: u8 = 0x21;

/// The value the `debug-exit` guest writes to the debug-exit port.
pub const DEBUG_EXIT_VALUE: u8 = 0x21;

/// Look up a built-in guest by name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|g| g.name == name)
}
