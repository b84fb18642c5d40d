//! ACPI tables where a guest searches for them (the BIOS area below 1 MiB):
//! RSDP, RSDT and XSDT, FADT (PM1a event/control blocks and the PM timer at
//! QEMU PIIX4's ports), FACS, MADT (one LAPIC per vCPU, the IOAPIC) and a
//! DSDT with the `_S5` sleep state (so a kernel's `poweroff` writes
//! PM1a_CNT) and the pvpanic device (ACPI `QEMU0001` at port 0x505, so a
//! panicking kernel says so). Encodings from rust-vmm's `acpi_tables`.

use acpi_tables::fadt::FADTBuilder;
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, facs::FACS, Aml};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{ports, BootError};

/// Where the tables go; the RSDP is on a 16-byte boundary in
/// 0xE0000-0xFFFFF, where the ACPI specification says to search.
pub use crate::layout::{
    ACPI_DSDT as DSDT, ACPI_FACS as FACS_AT, ACPI_FADT as FADT, ACPI_MADT as MADT_AT,
    ACPI_RSDP as RSDP, ACPI_RSDT as RSDT, ACPI_XSDT as XSDT, IOAPIC_BASE, LAPIC_BASE,
};
/// The SCI's ISA IRQ.
const SCI_IRQ: u16 = 9;

const OEM: [u8; 6] = *b"BRISK ";
const OEM_TABLE: [u8; 8] = *b"BRISKVM ";

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// The DSDT's definitions: `\\_S5` (SLP_TYP 5 for PM1a and PM1b) and
/// `\\_SB.PEVT`, the pvpanic device.
fn dsdt_body() -> Vec<u8> {
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&5u8, &5u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    let port = ports::PVPANIC;
    let io = aml::IO::new(port, port, 1, 1);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let sta: u8 = 0xf; // present, enabled, shown, functioning
    let hid: &'static str = "QEMU0001";
    let hid = aml::Name::new("_HID".into(), &hid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let sta = aml::Name::new("_STA".into(), &sta);
    let pvpanic = aml::Device::new("_SB_.PEVT".into(), vec![&hid, &crs, &sta]);
    pvpanic.to_aml_bytes(&mut body);
    body
}

/// Write every table for `cpus` vCPUs; returns the RSDP's address.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    cpus: usize,
) -> Result<u64, BootError> {
    let w = |addr: u64, data: &[u8]| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "the ACPI tables",
                addr,
                source,
            })
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM, OEM_TABLE, 1);
    dsdt.append_slice(&dsdt_body());
    w(DSDT, dsdt.as_slice())?;
    w(FACS_AT, &bytes(&FACS::new()))?;

    let mut fadt = FADTBuilder::new(OEM, OEM_TABLE, 1)
        .dsdt_32(DSDT as u32)
        .dsdt_64(DSDT)
        .firmware_ctrl_32(FACS_AT as u32);
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(ports::PM1A_EVT).into();
    fadt.pm1a_cnt_blk = u32::from(ports::PM1A_CNT).into();
    fadt.pm_tmr_blk = u32::from(ports::PM_TIMER).into();
    (fadt.pm1_evt_len, fadt.pm1_cnt_len, fadt.pm_tmr_len) = (4, 2, 4);
    w(FADT, &bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_BASE),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(cpus as u8, IOAPIC_BASE, 0));
    w(MADT_AT, &bytes(&madt))?;

    let tables = [FADT, MADT_AT];
    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM, OEM_TABLE, 1);
    for t in tables {
        rsdt.append_slice(&(t as u32).to_le_bytes());
    }
    w(RSDT, rsdt.as_slice())?;
    let mut xsdt = XSDT::new(OEM, OEM_TABLE, 1);
    for t in tables {
        xsdt.add_entry(t);
    }
    w(XSDT, &bytes(&xsdt))?;

    // acpi_tables' RSDP (revision 2) points at the XSDT only; older guests
    // read the RSDT address at offset 16, so fill it in and re-checksum.
    let mut rsdp = bytes(&Rsdp::new(OEM, XSDT));
    rsdp[16..20].copy_from_slice(&(RSDT as u32).to_le_bytes());
    rsdp[8] = 0;
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = 0;
    rsdp[32] = checksum(&rsdp);
    w(RSDP, &rsdp)?;
    Ok(RSDP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_the_madt_lists_every_lapic() {
        let mem =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, 3).unwrap();
        let read = |addr: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        let r = read(rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!((sum(&r[..20]), sum(&r)), (0, 0));
        let rsdt = u32::from_le_bytes(r[16..20].try_into().unwrap()) as u64;
        let head = read(rsdt, 36);
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let rsdt_bytes = read(rsdt, len);
        assert_eq!(sum(&rsdt_bytes), 0);
        let mut signatures = Vec::new();
        for e in rsdt_bytes[36..].chunks(4) {
            let at = u32::from_le_bytes(e.try_into().unwrap()) as u64;
            let h = read(at, 8);
            let t = read(at, u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize);
            assert_eq!(sum(&t), 0, "{:?}", std::str::from_utf8(&h[..4]));
            signatures.push(String::from_utf8_lossy(&h[..4]).into_owned());
            if &h[..4] == b"APIC" {
                let mut at = 44;
                let mut ids = Vec::new();
                while at < t.len() {
                    if t[at] == 0 {
                        ids.push(t[at + 3]);
                    }
                    at += t[at + 1] as usize;
                }
                assert_eq!(ids, [0, 1, 2]);
            }
            if &h[..4] == b"FACP" {
                let pm_tmr = u32::from_le_bytes(t[76..80].try_into().unwrap());
                assert_eq!(pm_tmr, u32::from(ports::PM_TIMER));
            }
        }
        assert_eq!(signatures, ["FACP", "APIC"]);
        // The DSDT (from the FADT) defines _S5 and the pvpanic device.
        let dsdt = read(DSDT, 36);
        let len = u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize;
        let dsdt = read(DSDT, len);
        assert_eq!(sum(&dsdt), 0);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_") && has(b"QEMU0001") && has(b"PEVT"));
    }
}
