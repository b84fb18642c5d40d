//! The I/O port map.

/// 16550 UART (COM1), eight registers.
pub const COM1: u16 = 0x3f8;
/// isa-debug-exit: a write of `v` ends the VM with status `(v << 1) | 1`.
pub const DEBUG_EXIT: u16 = 0xf4;
/// ACPI PM1a event block (as QEMU's PIIX4; reads zero here).
pub const PM1A_EVT: u16 = 0x600;
/// ACPI PM timer: 24-bit, 3.579545 MHz, read with `inl`.
pub const PM_TIMER: u16 = 0x608;
/// QEMU's fw_cfg: 16-bit selector at `FW_CFG`, data bytes at `FW_CFG + 1`.
pub const FW_CFG: u16 = 0x510;
/// ACPI PM1a control (as QEMU's PIIX4): writing SLP_EN powers off.
pub const PM1A_CNT: u16 = 0x604;
/// SLP_EN | SLP_TYP=0 written to [`PM1A_CNT`] powers the machine off.
pub const PM1A_POWER_OFF: u16 = 0x2000;
/// Per-vCPU counter devices: vCPU `i`'s is at `COUNTER + 4 * i`; each `in`
/// returns the next value of a 32-bit counter.
pub const COUNTER: u16 = 0x700;
/// Per-vCPU periodic timers (user irqchip): vCPU `i`'s registers are at
/// `TIMER + 8 * i`: `+0` vector (8-bit), `+4` period in µs (32-bit, 0 stops).
pub const TIMER: u16 = 0x900;
/// Inter-vCPU doorbell (user irqchip): write `(target << 8) | vector`.
pub const DOORBELL: u16 = 0x6f0;
/// pvpanic (QEMU's ISA pvpanic, ACPI QEMU0001): the guest writes bit 0
/// when it panics; reads say which events are supported.
pub const PVPANIC: u16 = 0x505;
/// The keyboard controller (i8042): command/status at `I8042_COMMAND`,
/// data at `I8042_DATA`; command 0xFE pulses the CPU reset line.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// The CMOS RTC: index at `CMOS`, data at `CMOS + 1`.
pub const CMOS: u16 = 0x70;
/// PCI configuration mechanism #1: address at `PCI_CONFIG`, data at
/// `PCI_CONFIG + 4` (four bytes).
pub const PCI_CONFIG: u16 = 0xcf8;
/// A port no device claims (reads all-ones).
pub const UNCLAIMED: u16 = 0x80;

/// Counter devices of vCPUs 64 and up (as [`COUNTER`]), to 0x4f00.
pub const COUNTER_HIGH: u16 = 0x4000;
/// Timer registers of vCPUs 64 and up (as [`TIMER`]), to 0x6e00.
pub const TIMER_HIGH: u16 = 0x5000;
/// Bytes of ports per vCPU: counter, timer.
pub const COUNTER_STRIDE: u16 = 4;
pub const TIMER_STRIDE: u16 = 8;

/// Port of vCPU `id`'s counter device.
pub const fn counter(id: usize) -> u16 {
    crate::layout::per_vcpu(
        id,
        COUNTER as u64,
        COUNTER_HIGH as u64,
        COUNTER_STRIDE as u64,
    ) as u16
}

/// First port of vCPU `id`'s timer registers.
pub const fn timer(id: usize) -> u16 {
    crate::layout::per_vcpu(id, TIMER as u64, TIMER_HIGH as u64, TIMER_STRIDE as u64) as u16
}
