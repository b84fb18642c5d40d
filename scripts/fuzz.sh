#!/usr/bin/env bash
# Coverage-guided fuzzing of brisk's parsers of hostile input with AFL++
# (cargo-afl, stable toolchain): the multiboot/ELF loader, the Linux loader
# (bzImage/vmlinux through linux-loader), the API's
# request parsing and routing, the snapshot state file reader (framed, and
# its JSON body alone), and the migration stream receiver. Each
# target starts from its corpus in
# fuzz/corpus/ and runs SECONDS (default 10); any crash or hang fails.
#
#   scripts/fuzz.sh            # every target, 10 s each (what test.sh runs)
#   scripts/fuzz.sh 600 api    # one target, 10 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(multiboot linux api snapshot state migration)

if ! cargo afl --version >/dev/null 2>&1; then
    echo "== installing cargo-afl (builds AFL++ from crates.io with the machine's C compiler)"
    cargo install cargo-afl --locked --quiet
fi
# AFL++ wants a core_pattern without a pipe and a fixed CPU governor; in a
# container or CI VM neither can be set: run anyway.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1
(cd fuzz && cargo afl build --release --quiet)
out=$(mktemp -d /tmp/brisk-fuzz.XXXXXX)
trap 'rm -rf "$out"' EXIT
status=0
for t in "${targets[@]}"; do
    log="$out/$t.log"
    if ! (cd fuzz && cargo afl fuzz -V "$seconds" -i "corpus/$t" -o "$out/$t" "target/release/$t") >"$log" 2>&1; then
        echo "fuzz $t: AFL++ failed:"; tail -20 "$log"; status=1; continue
    fi
    stats="$out/$t/default/fuzzer_stats"
    execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats")
    crashes=$(find "$out/$t/default/crashes" -type f ! -name README.txt | wc -l)
    hangs=$(find "$out/$t/default/hangs" -type f | wc -l)
    echo "fuzz $t: ${seconds}s, $execs executions, $crashes crashes, $hangs hangs"
    if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
        mkdir -p fuzz/findings/$t
        cp "$out/$t/default/crashes/"* "$out/$t/default/hangs/"* fuzz/findings/$t/ 2>/dev/null || true
        echo "  inputs copied to fuzz/findings/$t (reproduce: fuzz/target/release/$t < FILE)"
        status=1
    fi
done
exit $status
