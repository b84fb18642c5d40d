//! A snapshot's state file on any bytes, as `brisk run --restore` and a
//! migration's destination read it: the header (magic, version, length,
//! CRC-32), the JSON body into `SavedVm` (KVM's structures as bytes, the
//! configuration, device states), then the checks made before anything is
//! built. Every input is refused with a sentence or accepted; no panic, no
//! hang, no allocation beyond the input's size.

use brisk_vmm::snapshot::{check_state, file, SavedVm};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(state) = file::parse::<SavedVm>(data) {
            let _ = check_state(&state);
        }
        // The body alone too, so mutations reach the JSON past the CRC.
        if let Ok(state) = serde_json::from_slice::<SavedVm>(data) {
            let _ = check_state(&state);
        }
    });
}
