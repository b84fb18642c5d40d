//! Shared by the CLI's test binaries.

/// Skip (loudly) when /dev/kvm cannot be opened.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            eprintln!("\n*** SKIPPED: this test needs KVM (/dev/kvm: {e}) ***\n");
            return;
        }
    };
}
