#!/usr/bin/env bash
# Build brisk's guest Linux from Debian's linux-source-6.1, and the images
# the Linux tests boot: an uncompressed cpio initramfs and an ext4 root,
# each holding the static marker /init of scripts/guest-kernel/init.c and
# /idle (scripts/guest-kernel/idle.c: spins, so `rdinit=/idle` keeps a
# guest up for a test that needs it running).
#
#   scripts/guest-kernel.sh [--pvm|--no-pvm] [--cache DIR]
#
# The kernel is tinyconfig plus scripts/guest-kernel/kernel.config. On a
# PVM host (module kvm_pvm loaded; or --pvm) it also gets
# pvm-skip-int3-selftest.patch: PVM's instruction emulator cannot run 6.1's
# boot-time INT3 self-test and no command-line option skips it. The result
# is cached under $BRISK_CACHE (default ~/.cache/brisk) keyed by the hash
# of everything it is built from, so a second run (and CI) only prints the
# paths. Needs root for apt-get the first time; says what is missing
# otherwise. The last four lines are, one per line:
#   bzImage=PATH  vmlinux=PATH  initramfs=PATH  rootfs=PATH
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir="$here/guest-kernel"
cache="${BRISK_CACHE:-$HOME/.cache/brisk}"
pvm=auto
while [ $# -gt 0 ]; do
    case "$1" in
    --pvm) pvm=yes ;;
    --no-pvm) pvm=no ;;
    --cache) cache="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest-kernel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$pvm" = auto ]; then
    if [ -d /sys/module/kvm_pvm ]; then pvm=yes; else pvm=no; fi
fi

log() { echo "guest-kernel: $*" >&2; }

# What the build needs, from Debian's packages.
source_tar=/usr/src/linux-source-6.1.tar.xz
need_pkgs=()
[ -f "$source_tar" ] || need_pkgs+=(linux-source-6.1)
for t in flex:flex bison:bison bc:bc xz:xz-utils make:make gcc:gcc mke2fs:e2fsprogs; do
    command -v "${t%%:*}" >/dev/null || need_pkgs+=("${t#*:}")
done
[ -f /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing ${need_pkgs[*]}"
        apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 || {
            apt-get update >&2 && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; }
    else
        echo "guest-kernel.sh: missing Debian packages: ${need_pkgs[*]} (install them as root: apt-get install ${need_pkgs[*]})" >&2
        exit 1
    fi
fi

patches=()
[ "$pvm" = yes ] && patches+=("$dir/pvm-skip-int3-selftest.patch")
# The key: what the result is built from. Bump BUILD_STEPS when the steps
# below change what they produce.
BUILD_STEPS=1
key=$( {
    echo "steps=$BUILD_STEPS pvm=$pvm"
    dpkg-query -W -f='${Version}\n' linux-source-6.1 2>/dev/null || sha256sum "$source_tar"
    cat "$dir/kernel.config" "$dir/init.c" "$dir/idle.c"
    [ ${#patches[@]} -eq 0 ] || cat "${patches[@]}"
} | sha256sum | cut -c1-16)
out="$cache/guest-kernel/$key"

mkdir -p "$cache/guest-kernel"
# One build at a time (two test binaries, two CI jobs): the second waits,
# then finds the first one's result.
exec 9>"$cache/guest-kernel/.lock"
flock 9
if [ ! -f "$out/done" ]; then
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    trap 'rm -rf "$out.tmp"' EXIT
    work="$out.tmp/src"
    mkdir -p "$work"
    log "unpacking $source_tar (pvm patch: $pvm) into $out"
    tar xJf "$source_tar" -C "$work" --strip-components=1
    for p in ${patches[@]+"${patches[@]}"}; do
        log "applying $(basename "$p")"
        patch -d "$work" -p1 --quiet <"$p"
    done
    jobs=$(nproc)
    make -C "$work" -s tinyconfig >&2
    "$work/scripts/kconfig/merge_config.sh" -m -O "$work" "$work/.config" "$dir/kernel.config" >&2
    make -C "$work" -s olddefconfig >&2
    # A fragment line the kernel dropped (a typo, an unmet dependency)
    # would give a kernel that silently lacks it: refuse instead.
    missing=0
    while read -r line; do
        case "$line" in
        CONFIG_*=*) grep -qx "$line" "$work/.config" || { log "config: $line did not survive olddefconfig"; missing=1; } ;;
        esac
    done <"$dir/kernel.config"
    [ $missing = 0 ] || { echo "guest-kernel.sh: the config fragment does not apply cleanly (above)" >&2; exit 1; }
    log "building bzImage and vmlinux with $jobs jobs (about 5 minutes on 2 cores)"
    make -C "$work" -s -j"$jobs" bzImage >&2
    make -C "$work" -s usr/gen_init_cpio >&2 2>/dev/null || make -C "$work" -s usr/ >&2
    cp "$work/arch/x86/boot/bzImage" "$work/vmlinux" "$work/.config" "$out.tmp/"
    # /init: static, freestanding, no libc.
    gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -Os \
        -o "$out.tmp/init" "$dir/init.c"
    gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -Os \
        -o "$out.tmp/idle" "$dir/idle.c"
    # initramfs: uncompressed cpio (unpacking gzip under PVM's emulation
    # takes minutes), made by the kernel's own gen_init_cpio: no root
    # needed for the console node.
    cat >"$out.tmp/initramfs.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
file /init $out.tmp/init 0755 0 0
file /idle $out.tmp/idle 0755 0 0
LIST
    "$work/usr/gen_init_cpio" "$out.tmp/initramfs.list" >"$out.tmp/initramfs.cpio"
    # rootfs: ext4 with /sbin/init; devtmpfs is mounted on /dev by the kernel.
    root="$out.tmp/rootfs.d"
    mkdir -p "$root/sbin" "$root/dev" "$root/proc" "$root/sys"
    cp "$out.tmp/init" "$root/sbin/init"
    cp "$out.tmp/idle" "$root/idle"
    mke2fs -q -t ext4 -O ^has_journal -d "$root" -L brisk-root "$out.tmp/rootfs.ext4" 8M >&2
    rm -rf "$work" "$root"
    touch "$out.tmp/done"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    trap - EXIT
fi
echo "bzImage=$out/bzImage"
echo "vmlinux=$out/vmlinux"
echo "initramfs=$out/initramfs.cpio"
echo "rootfs=$out/rootfs.ext4"
