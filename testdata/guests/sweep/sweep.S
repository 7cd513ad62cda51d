/*
 * sweep.S - the qmigrate "sweep" test guest: a 512-byte x86 boot sector.
 *
 * Written for qmigrate (not derived from QEMU's a-b-bootblock.S).
 *
 * What it does, in order:
 *   1. real mode: disable interrupts, enable A20 (port 0x92), load a flat GDT,
 *      set CR0.PE and far-jump into 32-bit protected mode;
 *   2. load flat data segments and a stack below 0x7c00;
 *   3. zero the first byte of every 4 KiB page in [1 MiB, 100 MiB) so the
 *      pattern starts uniform whatever firmware left there;
 *   4. write 'A' (0x41) to COM1 (0x3f8) once;
 *   5. forever: for every page in [1 MiB, 100 MiB) in ascending order,
 *      increment the page's first byte, then busy-wait SPIN iterations;
 *      after each full pass (25344 pages) write 'B' (0x42) to COM1.
 *
 * SPIN is the 32-bit little-endian word at image offset 0x1fa (just before
 * the 0x55aa signature). The Go package internal/guest/sweep patches it per
 * test to set the dirty rate; 0 means unthrottled.
 *
 * Integrity invariant (see qemu-protocol.md 1.2): with the guest stopped, the
 * first bytes b[0..25343] are a run of v+1 followed by a run of v (mod 256).
 *
 * Build (see build.sh):
 *   gcc -m32 -c -o sweep.o sweep.S
 *   ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o sweep.img sweep.o
 */

#define COM1        0x3f8
#define RANGE_START 0x00100000
#define RANGE_END   0x06400000
#define PAGE        4096

	.code16
	.text
	.globl _start
_start:
	cli
	cld
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %ss
	movw	$0x7c00, %sp

	/* fast A20 gate: set bit 1 of port 0x92, never bit 0 (reset) */
	inb	$0x92, %al
	orb	$0x02, %al
	andb	$0xfe, %al
	outb	%al, $0x92

	lgdtl	gdt_desc
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$0x08, $pmode

	.code32
pmode:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	$0x7c00, %esp

	/* pre-zero pass over the first byte of every page */
	movl	$RANGE_START, %edi
zero:
	movb	$0, (%edi)
	addl	$PAGE, %edi
	cmpl	$RANGE_END, %edi
	jb	zero

	movw	$COM1, %dx
	movb	$'A', %al
	outb	%al, %dx

pass:
	movl	$RANGE_START, %edi
page:
	incb	(%edi)
	movl	spin, %ecx
	jecxz	spun
delay:
	decl	%ecx
	jnz	delay
spun:
	addl	$PAGE, %edi
	cmpl	$RANGE_END, %edi
	jb	page

	movb	$'B', %al
	outb	%al, %dx
	jmp	pass

	.p2align 3
gdt:
	.quad	0x0000000000000000	/* null */
	.quad	0x00cf9a000000ffff	/* 0x08: code, base 0, limit 4 GiB, 32-bit */
	.quad	0x00cf92000000ffff	/* 0x10: data, base 0, limit 4 GiB */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.long	gdt

	/* SPIN: per-page busy-wait count, patched by the test harness */
	.org	0x1fa
spin:
	.long	0

	.org	0x1fe
	.byte	0x55, 0xaa
