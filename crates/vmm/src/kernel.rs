//! Booting a kernel from a file: read it, load it as multiboot, and lay
//! out the platform tables it looks for.

use brisk_boot::multiboot::Kernel;

use crate::{KernelConfig, StartError};

/// Where the boot vCPU starts.
pub(crate) struct MultibootStart {
    pub entry: u32,
    pub info: u64,
}

fn read(what: &str, path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path)
        .map_err(|e| StartError::Kernel(format!("cannot read {what} {}: {e}", path.display())))
}

/// Load `k` into `vm`'s memory (`ram` bytes, `cpus` vCPUs): segments,
/// multiboot information, initrd, ACPI tables.
pub(crate) fn load(
    vm: &brisk_kvm::Vm,
    k: &KernelConfig,
    ram: u64,
    cpus: usize,
) -> Result<MultibootStart, StartError> {
    let bytes = read("kernel", &k.path)?;
    let initrd = k.initrd.as_deref().map(|p| read("initrd", p)).transpose()?;
    let refuse = |e: brisk_boot::multiboot::LoadError| {
        StartError::Kernel(format!("kernel {}: {e}", k.path.display()))
    };
    let kernel = Kernel::parse(&bytes).map_err(refuse)?;
    kernel.load(vm.memory(), ram).map_err(refuse)?;
    let info = kernel
        .write_info(vm.memory(), ram, &k.cmdline, initrd.as_deref())
        .map_err(refuse)?;
    brisk_boot::acpi::write_tables(vm.memory(), cpus)
        .map_err(|e| StartError::Setup(e.to_string()))?;
    Ok(MultibootStart {
        entry: kernel.entry(),
        info,
    })
}
