//! Shared by the CLI's test binaries.

pub use brisk_vmm::require_kvm;
