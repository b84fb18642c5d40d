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
//! let code = (hello.assemble)(0).unwrap();
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
    /// What `NAME=N` sets, if the guest takes a length (`tick=20000`).
    pub param: Option<Param>,
    /// Assemble the program for loading at `layout::CODE`, with the
    /// length `N` (the param's default when none is given; ignored by
    /// guests without one).
    pub assemble: fn(u64) -> Result<Vec<u8>, IcedError>,
}

/// The one number a counting guest takes on the command line.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// What it counts, for `brisk guests`.
    pub what: &'static str,
    pub default: u64,
    /// The largest value the program can count to.
    pub max: u64,
}

/// A guest chosen on the command line: `NAME` or `NAME=N`.
#[derive(Clone, Copy, Debug)]
pub struct Choice {
    pub guest: &'static Builtin,
    /// `N`, or the default; 0 for guests that take none.
    pub value: u64,
}

impl std::fmt::Debug for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Choice {
    /// Assemble the chosen program.
    pub fn assemble(&self) -> Result<Vec<u8>, IcedError> {
        (self.guest.assemble)(self.value)
    }
}

/// Why a `--guest` value names no guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChoiceError {
    Unknown(String),
    /// `NAME=N` for a guest that takes no number.
    NoParam(&'static str),
    /// `N` is not a number in 1..=max.
    BadValue {
        guest: &'static str,
        value: String,
        max: u64,
    },
}

impl std::fmt::Display for ChoiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChoiceError::Unknown(g) => {
                let names: Vec<&str> = ALL.iter().map(|g| g.name).collect();
                write!(
                    f,
                    "unknown guest '{g}' (built-in guests: {})",
                    names.join(", ")
                )
            }
            ChoiceError::NoParam(g) => write!(f, "guest '{g}' takes no '=N'"),
            ChoiceError::BadValue { guest, value, max } => write!(
                f,
                "guest '{guest}': '{value}' is not a whole number from 1 to {max}"
            ),
        }
    }
}

impl std::error::Error for ChoiceError {}

/// Parse `NAME` or `NAME=N`.
///
/// ```
/// let c = brisk_guests::choose("tick=20000").unwrap();
/// assert_eq!((c.guest.name, c.value), ("tick", 20000));
/// assert_eq!(brisk_guests::choose("tick").unwrap().value, brisk_guests::TICKS);
/// assert!(brisk_guests::choose("hello=3").is_err());
/// ```
pub fn choose(spec: &str) -> Result<Choice, ChoiceError> {
    let (name, value) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let guest = find(name).ok_or_else(|| ChoiceError::Unknown(name.to_string()))?;
    let value = match (guest.param, value) {
        (None, None) => 0,
        (None, Some(_)) => return Err(ChoiceError::NoParam(guest.name)),
        (Some(p), None) => p.default,
        (Some(p), Some(v)) => v
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=p.max).contains(n))
            .ok_or_else(|| ChoiceError::BadValue {
                guest: guest.name,
                value: v.to_string(),
                max: p.max,
            })?,
    };
    Ok(Choice { guest, value })
}

/// Every built-in guest.
pub const ALL: &[Builtin] = &[
    Builtin {
        name: "hello",
        about: "each vCPU prints \"Hello from vCPU N\" in turn on the UART; the last powers off (status 0)",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::hello,
    },
    Builtin {
        name: "spin",
        about: "busy loop forever, counting iterations",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::spin,
    },
    Builtin {
        name: "pio",
        about: "tight `in` loop on the vCPU's counter device (one exit per iteration)",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::pio,
    },
    Builtin {
        name: "halt",
        about: "HLT with interrupts off, forever; counts each time it is woken",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::halt,
    },
    Builtin {
        name: "mixed",
        about: "alternates a spin phase, a PIO phase and HLT, forever",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::mixed,
    },
    Builtin {
        name: "tick",
        about: "each vCPU takes N (default 100) timer interrupts (1 ms period, vector 0x20) with HLT between them; the last powers off (needs --irqchip user; tick=N)",
        ends: true,
        user_irqchip: true,
        param: Some(Param { what: "timer interrupts per vCPU", default: TICKS, max: i32::MAX as u64 }),
        assemble: programs::tick,
    },
    Builtin {
        name: "pingpong",
        about: "a token passes round the vCPUs N (default 1000) times through the doorbell (vector 0x21), each HLTing until rung; vCPU 0 powers off (needs --irqchip user; pingpong=N)",
        ends: true,
        user_irqchip: true,
        param: Some(Param { what: "rounds of the token", default: PINGPONG_ROUNDS, max: i32::MAX as u64 }),
        assemble: programs::pingpong,
    },
    Builtin {
        name: "dirty",
        about: "each vCPU sweeps its own N MiB (default 16) from 16 MiB up, writing the sweep number into every 4 KiB page, forever, counting sweeps (dirties memory for migration tests and benchmarks; dirty=N, give it the RAM)",
        ends: false,
        user_irqchip: false,
        param: Some(Param { what: "MiB each vCPU dirties", default: DIRTY_MIB, max: 4096 }),
        assemble: programs::dirty,
    },
    Builtin {
        name: "fill",
        about: "as dirty, but one sweep: each vCPU writes every page of its N MiB (default 16) once, then HLTs forever (a VM with its RAM touched, then idle; fill=N)",
        ends: false,
        user_irqchip: false,
        param: Some(Param { what: "MiB each vCPU fills", default: DIRTY_MIB, max: 4096 }),
        assemble: programs::fill,
    },
    Builtin {
        name: "debug-exit",
        about: "vCPU 0 prints a line and writes 0x21 to the debug-exit port (status 67)",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::debug_exit,
    },
    Builtin {
        name: "stress",
        about: "vCPU i runs spin, pio or halt by i mod 3 (used by `brisk stress`)",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::stress,
    },
    Builtin {
        name: "triple-fault",
        about: "misbehaves: loads an empty IDT and executes ud2 (triple fault: status 8)",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::triple_fault,
    },
    Builtin {
        name: "ud2",
        about: "misbehaves: ud2 with no IDT (status 8)",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::ud2,
    },
    Builtin {
        name: "int3",
        about: "misbehaves: int3 with no IDT (status 8)",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::int3,
    },
    Builtin {
        name: "mmio-unmapped",
        about: "misbehaves: writes and reads unmapped MMIO; reports all-ones via debug-exit (status 33)",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::mmio_unmapped,
    },
    Builtin {
        name: "pio-storm",
        about: "misbehaves: out/in on an unclaimed port forever (keeps running, stoppable)",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::pio_storm,
    },
    Builtin {
        name: "mwait",
        about: "if CPUID offers MONITOR/MWAIT (--mwait exit|passthrough), uses them 1000 times then debug-exit (status 35), unless the host refuses them; otherwise debug-exit status 37 without trying",
        ends: true,
        user_irqchip: false,
        param: None,
        assemble: programs::mwait,
    },
    Builtin {
        name: "mmio-split",
        about: "misbehaves: an 8-byte load that straddles two pages of unmapped MMIO, forever (KVM exits twice per load)",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::mmio_split,
    },
    Builtin {
        name: "kvmclock",
        about: "enables kvmclock (MSR_KVM_SYSTEM_TIME_NEW) and spins; counts each pause KVM reports to it (PVCLOCK_GUEST_STOPPED)",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::kvmclock,
    },
    Builtin {
        name: "flood",
        about: "prints lines on the UART as fast as it can, forever",
        ends: false,
        user_irqchip: false,
        param: None,
        assemble: programs::flood,
    },
    Builtin {
        name: "stress-irq",
        about: "vCPU i by i mod 4: spins, loops on PIO (ringing vCPU i+2's doorbell every 64 reads), or idles in `sti; hlt` woken only by its timer (500 us) or by doorbell rings; interrupts on throughout, all counted (used by `brisk stress`; needs --irqchip user)",
        ends: false,
        user_irqchip: true,
        param: None,
        assemble: programs::stress_irq,
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

/// MiB each vCPU of the `dirty` guest sweeps, by default, and where the
/// sweeps start: vCPU `i`'s area is `DIRTY_BASE + i * N MiB`.
pub const DIRTY_MIB: u64 = 16;
pub const DIRTY_BASE: u64 = 16 << 20;

/// The value the `debug-exit` guest writes to the debug-exit port.
pub const DEBUG_EXIT_VALUE: u8 = 0x21;

/// Where `kvmclock` puts vCPU `id`'s pvclock structure.
pub const fn pvclock(id: usize) -> u64 {
    brisk_boot::layout::pvclock(id)
}

/// Look up a built-in guest by name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|g| g.name == name)
}

/// What vCPU `id` of the `stress-irq` guest does (the program computes the
/// same `id % 4`). Every role runs with interrupts enabled (IF=1) once set
/// up, except inside the interrupt handler; every vector (timer, doorbell,
/// [`STRESS_RAISE_VECTOR`]) goes to one handler that counts into the
/// progress counter and into the vCPU's `+8` slot ([`stress_irq_handled`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StressIrqRole {
    /// Increments its progress counter forever, with no exits of its own.
    Spin,
    /// `in` from its counter port, counting each; every
    /// [`STRESS_IRQ_RING_EVERY`] reads it rings the doorbell of
    /// [`stress_irq_ring_target`].
    Pio,
    /// Programs its timer ([`TICK_VECTOR`], every [`STRESS_IRQ_TIMER_US`]),
    /// then `sti; hlt` forever: it progresses only through interrupts.
    TimerHalt,
    /// `sti; hlt` forever, woken only by doorbell rings (from the PIO vCPUs
    /// or raised by the stress controller).
    DoorbellHalt,
}

/// The role of vCPU `id` in the `stress-irq` guest.
pub const fn stress_irq_role(id: usize) -> StressIrqRole {
    match id % 4 {
        0 => StressIrqRole::Spin,
        1 => StressIrqRole::Pio,
        2 => StressIrqRole::TimerHalt,
        _ => StressIrqRole::DoorbellHalt,
    }
}

/// The vCPU whose doorbell `stress-irq`'s PIO vCPU `id` rings (vector
/// [`DOORBELL_VECTOR`]): `id + 2` (a [`StressIrqRole::DoorbellHalt`] one),
/// or itself when there is no such vCPU.
pub const fn stress_irq_ring_target(id: usize, cpus: usize) -> usize {
    if id + 2 < cpus {
        id + 2
    } else {
        id
    }
}

/// The period of the `stress-irq` timer-halt vCPUs' timers, in µs.
pub const STRESS_IRQ_TIMER_US: u32 = 500;
/// `stress-irq`'s PIO vCPUs ring a doorbell once per this many reads.
pub const STRESS_IRQ_RING_EVERY: u32 = 64;
/// The vector the stress controller raises (the guest handles it like the
/// others).
pub const STRESS_RAISE_VECTOR: u8 = 0x22;

/// Where `stress-irq` vCPU `id` counts the interrupts its handler took
/// (the `+8` slot of its data line, which this guest does not use for
/// counter reads: `Vm::last_read` reads it).
pub const fn stress_irq_handled(id: usize) -> u64 {
    brisk_boot::layout::last_read(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program fits between its load address and the first area
    /// of the high vCPUs (vCPUs 64 and up keep their data above the code).
    #[test]
    fn every_program_fits_below_the_high_vcpu_areas() {
        let room = (brisk_boot::layout::VCPU_DATA_HIGH - brisk_boot::layout::CODE) as usize;
        for g in ALL {
            let value = g.param.map_or(0, |p| p.default);
            let code = (g.assemble)(value).unwrap();
            assert!(code.len() < room, "{}: {} bytes", g.name, code.len());
        }
    }
}
