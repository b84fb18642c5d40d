//! A migration stream on any bytes, as `brisk run --receive-migration`
//! takes it: framed messages (`wire::next_frame`: known kind, reserved
//! field zero, length within the kind's bound), the first a Hello checked
//! by `Intake::hello` (protocol version, memfd, trust: RAM bound and disk
//! paths, configuration), every later one by `Intake::step` (Pages and
//! Zero inside one RAM region in whole pages, a State that parses and
//! matches the Hello, an Abort's text escaped). Every input is refused
//! with a sentence or accepted; no panic, no hang, no allocation beyond
//! the input's size (RAM itself is never touched here).

use brisk_vmm::migration::wire::{next_frame, Kind};
use brisk_vmm::migration::{Intake, Step};
use brisk_vmm::RestoreOptions;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // The first byte says whether a descriptor came with the Hello.
        let Some((&fd, mut rest)) = data.split_first() else {
            return;
        };
        let opts = RestoreOptions {
            // Bounded as a receiver with --max-memory 1G would be.
            max_memory: Some(1 << 30),
            ..RestoreOptions::default()
        };
        let Ok(Some((Kind::Hello, body, after))) = next_frame(rest) else {
            return;
        };
        let Ok(intake) = Intake::hello(body, fd & 1 == 1, &opts) else {
            return;
        };
        rest = after;
        // What the receiver would touch: whole pages inside one region.
        let regions = brisk_boot::layout::ram_regions(intake.config().memory);
        let inside = |at: u64, len: u64| {
            at % 4096 == 0
                && len > 0
                && len % 4096 == 0
                && regions
                    .iter()
                    .any(|&(s, n)| at >= s && at.checked_add(len).is_some_and(|e| e <= s + n))
        };
        while let Ok(Some((kind, body, after))) = next_frame(rest) {
            match intake.step(kind, body) {
                Ok(Step::Write { at, data }) => assert!(inside(at, data.len() as u64)),
                Ok(Step::Discard { at, len }) => assert!(inside(at, len)),
                Ok(Step::State(_)) | Err(_) => return,
            }
            rest = after;
        }
    });
}
