//! The platform brisk presents to built-in guests, and the set-up that
//! starts every vCPU directly in 64-bit long mode.
//!
//! [`layout`] and [`ports`] are the contract between the VMM, its devices
//! and the guest programs assembled in `brisk-guests`.

pub mod acpi;
pub mod layout;
pub mod linux;
mod long_mode;
pub mod multiboot;
pub mod ports;

pub use long_mode::{load_program, start_vcpu_in_long_mode, write_page_tables, BootError};
