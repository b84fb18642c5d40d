//! A snapshot state's JSON body on any bytes, past the framing the
//! `snapshot` target's mutations mostly break on (magic, version, length,
//! CRC): serde into `SavedVm` (KVM's structures as bytes, the
//! configuration, device states), then every check made before anything
//! is built (`check_state`, and `check_trusted` as a restore without
//! --trust-disk-paths runs it). Seeded with the body of a real state file.

use brisk_vmm::snapshot::{check_state, check_trusted, SavedVm};
use brisk_vmm::RestoreOptions;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(state) = serde_json::from_slice::<SavedVm>(data) {
            let _ = check_trusted(&state.config, &RestoreOptions::default());
            let _ = check_state(&state);
        }
    });
}
