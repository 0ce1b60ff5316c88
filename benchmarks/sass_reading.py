"""Reading a kernel's SASS (nvdisasm's text): its K loop, the waits on its plain loads and on its
warpgroup MMAs, and the order of a PDL kernel's prologue. Plain text in, plain data out: kernels_compile.py feeds it
cubins it compiled; the tests feed it crafted lines."""

from __future__ import annotations

import re
from collections import Counter

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
BRANCH_BACK = re.compile(r"\bBRA\b[^;]*?(\.L_x_\d+)")
MEMORY = re.compile(r"^(?:LDG|LDGSTS|LDS|LD|STG|STS|ST|REDG|RED|ATOMG|ATOM|ATOMS)\b")
# a warpgroup MMA whose first operand is a register, not a shared-memory descriptor (gdesc); fp16 inputs
# carry no type suffix (HGMMA.64x128x16.F32), bf16 ones do (.F32.BF16)
MMA_A_IN_REGISTERS = re.compile(r"\bHGMMA\.\w+\.F32(?:\.\w+)? R\d+, R\d+, gdesc")


def opcode_counts(lines: list[str]) -> Counter:
    """How many of each opcode the SASS lines hold."""
    return Counter(m.group(1) for line in lines if (m := INSTRUCTION.search(line)))


def k_loop(sass: list[str]) -> list[str]:
    """The SASS lines of the kernel's K loop: the longest body a backward branch closes."""
    labels = {line.strip()[:-1]: index for index, line in enumerate(sass) if re.fullmatch(r"\s*\.L_x_\d+:", line)}
    loops = [(labels[m.group(1)], index) for index, line in enumerate(sass)
             if (m := BRANCH_BACK.search(line)) and labels.get(m.group(1), index) < index]
    if not loops:
        return []
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return sass[start:end + 1]


def load_waits(loop: list[str]) -> list[int | None]:
    """For each plain global load (LDG) of a K loop, how many instructions later in the same pass
    its register is first read: where a thread waits for it, unless the memory answered sooner.
    None: not read in that pass (the load is for the next one). cp.async copies (LDGSTS) land in
    shared memory and are waited on by barrier, so they are not counted."""
    lines = [line for line in loop if INSTRUCTION.search(line)]
    waits = []
    for index, line in enumerate(lines):
        load = re.search(r"\bLDG\S*\s+(R\d+)", line)
        if not load:
            continue
        register = re.compile(rf"\b{load.group(1)}\b")
        waits.append(next((later - index for later in range(index + 1, len(lines))
                           if register.search(source_operands(lines[later]))), None))
    return waits


MMA_WAIT = re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+|\d+)")


def mma_in_flight(loop: list[str]) -> int | None:
    """How many warpgroup MMA groups a K loop's waits leave running (the fewest over its waits,
    WARPGROUP.DEPBAR.LE gsb0, N): 0 when each wait drains them, so the warpgroup's own next work
    (dequantising the next step) cannot overlap its MMAs; None: no warpgroup MMA waited on in it."""
    pending = [int(m.group(1), 0) for line in loop if (m := MMA_WAIT.search(line))]
    return min(pending) if pending else None


def dependent_launch_order(sass: list[str]) -> dict:
    """Where a kernel compiled with PDL (triton_common.prefetch_then_wait) waits for the kernel
    ahead of it (ACQBULK, PTX's griddepcontrol.wait): the L2 prefetches (CCTL.E.PF2) before it, any
    other memory instruction before it (none may be: x, the sums and the output may still be the
    kernel ahead's), and whether the program lets the kernel behind launch (PREEXIT, PTX's
    griddepcontrol.launch_dependents) after it."""
    opcodes = [m.group(1) + (".PF2" if ".PF2" in line else "") for line in sass if (m := INSTRUCTION.search(line))]
    wait = opcodes.index("ACQBULK") if "ACQBULK" in opcodes else None
    before = opcodes if wait is None else opcodes[:wait]
    return {"waits": wait is not None, "prefetches_before_wait": before.count("CCTL.PF2"),
            "memory_before_wait": sorted({op for op in before if MEMORY.match(op)}),
            "launches_dependents_after_wait": wait is not None and "PREEXIT" in opcodes[wait:]}


def source_operands(line: str) -> str:
    """What a SASS instruction reads, as load_waits counts it: its operands after the first, which
    it writes (a store's first operand, an address it reads, is left out too: the loads counted
    there bring values, scales and zeros, not addresses)."""
    operands = line.split(";")[0].split(None, 2)[-1]  # past the address comment and the opcode or predicate
    return operands.split(",", 1)[-1]
