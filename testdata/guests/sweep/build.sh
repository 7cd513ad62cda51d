#!/bin/sh
# Rebuilds sweep.img from sweep.S and copies it next to the Go package that
# embeds it. Needs gcc (with -m32 support in the assembler) and GNU ld.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gcc -m32 -c -o "$tmp/sweep.o" "$here/sweep.S"
ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$tmp/sweep.img" "$tmp/sweep.o"
size=$(wc -c <"$tmp/sweep.img")
[ "$size" -eq 512 ] || { echo "sweep.img is $size bytes, want 512" >&2; exit 1; }
cp "$tmp/sweep.img" "$here/../../../internal/guest/sweep/sweep.img"
