#!/bin/sh
# Build brisk's multiboot test kernels into $1 with the machine's gcc and ld.
set -eu
out=${1:?usage: build.sh OUTDIR}
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
CFLAGS="-m32 -march=i686 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -fno-builtin -nostdlib -O2 -Wall -Wextra -Werror -mno-sse -mno-mmx -mno-80387"
gcc $CFLAGS -c "$src/boot.S" -o "$out/boot.o"
gcc $CFLAGS -c "$src/lib.c" -o "$out/lib.o"
gcc $CFLAGS -c "$src/virtio.c" -o "$out/virtio.o"
gcc $CFLAGS -c "$src/smp_boot.S" -o "$out/smp_boot.o"
gcc $CFLAGS -c "$src/uartirq_isr.S" -o "$out/uartirq_isr.o"
gcc $CFLAGS -c "$src/ipistorm_isr.S" -o "$out/ipistorm_isr.o"
for k in hello smp pmtimer inl uartirq virtioblk virtionet vsockecho ipistorm; do
    gcc $CFLAGS -c "$src/$k.c" -o "$out/$k.o"
    extra=""
    [ "$k" = smp ] && extra="$out/smp_boot.o"
    [ "$k" = uartirq ] && extra="$out/uartirq_isr.o"
    [ "$k" = ipistorm ] && extra="$out/smp_boot.o $out/ipistorm_isr.o"
    ld -m elf_i386 -T "$src/kernel.ld" -z noexecstack --no-warn-rwx-segments -o "$out/$k.elf" \
        "$out/boot.o" "$out/lib.o" "$out/virtio.o" "$out/$k.o" $extra
done
