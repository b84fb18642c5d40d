#!/usr/bin/env bash
# brisk's whole test suite: formatting, lints, unit/integration/doc tests.
# Installs what the tests need where it can (as root, with apt-get), or says
# exactly what is missing. Tests that need /dev/kvm skip loudly without it.
set -euo pipefail
cd "$(dirname "$0")/.."

need_cmd() { command -v "$1" >/dev/null 2>&1; }

if ! need_cmd cargo; then
    echo "brisk tests need a Rust toolchain (cargo, rustc >= 1.85): install it with rustup" >&2
    exit 1
fi
# The CLI tests use unshare and setpriv (util-linux) to run brisk without
# /dev/kvm and without permission; they skip those cases if absent.
if ! need_cmd setpriv || ! need_cmd unshare; then
    if [ "$(id -u)" = 0 ] && need_cmd apt-get; then
        apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
    else
        echo "note: setpriv/unshare (util-linux) missing: the no-KVM CLI cases will be skipped" >&2
    fi
fi
# The multiboot test kernels (crates/test-kernels) are C built with gcc -m32
# and GNU ld.
if ! need_cmd gcc || ! need_cmd ld; then
    if [ "$(id -u)" = 0 ] && need_cmd apt-get; then
        apt-get update -qq && apt-get install -y -qq gcc binutils >/dev/null
    else
        echo "brisk tests need gcc and binutils for the test kernels: apt-get install gcc binutils" >&2
        exit 1
    fi
fi
# The network tests make TAP devices with `ip` (iproute2) and need
# /dev/net/tun and CAP_NET_ADMIN; without those they skip loudly.
if ! need_cmd ip; then
    if [ "$(id -u)" = 0 ] && need_cmd apt-get; then
        apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
    else
        echo "brisk's network tests need ip (iproute2): apt-get install iproute2" >&2
        exit 1
    fi
fi
if [ ! -e /dev/net/tun ]; then
    echo "*** /dev/net/tun is absent: every test that needs a TAP will be SKIPPED ***" >&2
fi
if [ ! -e /dev/kvm ]; then
    echo "*** /dev/kvm is absent: every test that needs KVM will be SKIPPED ***" >&2
fi
for c in rustfmt clippy; do
    if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$c" >/dev/null 2>&1 || { echo "missing cargo $c: rustup component add $c" >&2; exit 1; }
    fi
done

# The Linux tests boot the guest kernel scripts/guest-kernel.sh builds
# from Debian's linux-source-6.1 (installed with apt-get as root; cached
# outside the tree by the hash of its inputs, so only the first run or a
# changed config fragment builds: about 8 minutes on 2 cores).
echo "== guest kernel (scripts/guest-kernel.sh)"
scripts/guest-kernel.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== cargo test"
# A hang is a failure, not a stalled CI run: bound the whole suite.
timeout --kill-after=30s 40m cargo test --workspace --all-features --locked
echo "== loom model check of the control protocol (release, own target dir)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    timeout --kill-after=30s 20m cargo test -p brisk-control --test model --release --locked
echo "== fuzz: AFL++ on the loader and the API parser (scripts/fuzz.sh, 10 s a target)"
timeout --kill-after=30s 20m scripts/fuzz.sh 10
