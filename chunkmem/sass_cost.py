"""Static per-iteration cost of a compiled Triton kernel's loops, read from its SASS.

An issue-bound proxy, no GPU needed: for every loop of the kernel (a backward branch in the
SASS; the loop body is the branch target .. the branch) it counts the SASS instructions of one
iteration, the tensor-core MMA instructions (HGMMA = Hopper warpgroup MMA, HMMA = warp
``mma.sync``) with the work they execute, and the ``MUFU.EX2`` (exp2) instructions. With the
"useful" dots of the loop (the matrix products the algorithm needs per iteration, given by the
caller per loop function) it gives the executed / useful MMA work and the warp-instructions
issued per useful MFLOP. It says nothing about latency, memory bandwidth, occupancy, trip
counts or how often masked branches run.

Each loop is attributed to the source call of the ``@triton.jit`` loop function it comes from,
using the line table of the cubin (``nvdisasm -gi``: the chain of inlined call sites of every
instruction) and the kernel's Python AST (the call's arguments, evaluated with the kernel's
constexprs).

Entry points: :func:`disassemble` (cubin -> nvdisasm text), :func:`parse_sass`,
:func:`find_loops`, :func:`loop_cost`, :func:`kernel_calls` / :func:`attribute_loop` /
:func:`call_instructions`, :func:`loop_breakdown`, :func:`occupancy`.
"""
from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field

# Per-SM limits: register file (32-bit registers), threads, resident CTAs, shared memory
# (bytes per SM usable by CTAs) and the shared memory the driver reserves per CTA.
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, ctas=32, smem=167936, smem_per_cta_reserved=1024),
    90: dict(regs=65536, threads=2048, ctas=32, smem=233472, smem_per_cta_reserved=1024),
}
# Registers are allocated per warp in units of 256 (8 per thread).
_REG_UNIT = 256

# mma.sync shapes (m, n, k) by their SASS name.
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32),
                "884": (8, 8, 4), "1684": (16, 8, 4)}

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]*)", line (\d+)(?: inlined at "([^"]*)", line (\d+))?')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Instr:
    """One SASS instruction: byte address, guard predicate ("" or e.g. "@!P0"), opcode with its
    modifiers (e.g. "HGMMA.64x64x16.F32.BF16"), operand text, branch target label, and the
    source location chain ((file, line) innermost first, the kernel's own line last)."""
    addr: int
    pred: str
    opcode: str
    operands: str
    target: str | None = None
    chain: tuple = ()

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Sass:
    instrs: list
    labels: dict = field(default_factory=dict)  # label -> index of the instruction it marks


def tool_path(name: str) -> str:
    """A CUDA binary utility bundled with Triton (cuobjdump, nvdisasm), else from PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin with labels and inlined line info (``nvdisasm -gi -c``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([tool_path("nvdisasm"), "-gi", "-c", path], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(path)


def parse_sass(text: str) -> Sass:
    """Instructions, labels and line chains of ``nvdisasm -gi`` output (one kernel)."""
    instrs, labels = [], {}
    chain, pending, in_block = (), [], False
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            if not in_block:
                pending = []
                in_block = True
            pending.append((m.group(1), int(m.group(2))))
            continue
        if in_block:
            chain, in_block = tuple(pending), False
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        pred = ""
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        parts = body.split(None, 1)
        opcode, operands = parts[0], parts[1] if len(parts) > 1 else ""
        t = _TARGET.search(operands)
        instrs.append(Instr(int(m.group(1), 16), pred, opcode, operands,
                            t.group(1) if t else None, chain))
    return Sass(instrs, labels)


@dataclass
class Loop:
    """Instructions head..latch (indices); latch is the backward branch to head."""
    head: int
    latch: int
    depth: int = 0  # number of loops that contain this one


def _is_branch(ins: Instr) -> bool:
    return ins.base in ("BRA", "BRX", "JMP") and ins.target is not None


def _unconditional(ins: Instr) -> bool:
    """A branch that is always taken: no guard predicate, no predicate or register operand
    before its target (``BRA.U !UP0, ...``, ``BRA.DIV UR4, ...`` are conditional)."""
    return (_is_branch(ins) and ins.pred in ("", "@PT") and ins.operands.startswith("`")
            and ".DIV" not in ins.opcode)


def _out_of_line_start(sass: Sass) -> int:
    """Index after the kernel's last unconditional EXIT: code placed there (warp-divergence
    fallbacks that ``BRA.DIV`` jumps to, which branch back into the body) is not a loop."""
    last = len(sass.instrs)
    for i, ins in enumerate(sass.instrs):
        if ins.base == "EXIT" and ins.pred in ("", "@PT"):
            last = i + 1
    return last


def find_loops(sass: Sass) -> list:
    """Loops from backward branches (a branch to a label at or before it, out-of-line code
    excepted); several branches to one head make one loop (the last of them is its latch).
    Sorted by head."""
    latches = {}
    end = _out_of_line_start(sass)
    for i, ins in enumerate(sass.instrs[:end]):
        if _is_branch(ins) and ins.target in sass.labels:
            head = sass.labels[ins.target]
            if head <= i:
                latches[head] = max(i, latches.get(head, i))
    loops = [Loop(h, l) for h, l in sorted(latches.items())]
    for lp in loops:
        lp.depth = sum(o.head <= lp.head and lp.latch <= o.latch and o is not lp for o in loops)
    return loops


def _counted(ins: Instr) -> bool:
    return ins.base != "NOP"


def _path_lengths(sass: Sass, loop: Loop):
    """(fewest, most) counted instructions from the loop head to its latch, over the paths that
    forward branches inside the body allow (inner loops counted once; exits ignored)."""
    lo, hi = loop.head, loop.latch
    best = {lo: (0, 0)}
    for i in range(lo, hi + 1):
        if i not in best:
            continue
        short, long_ = best[i]
        ins = sass.instrs[i]
        short, long_ = short + _counted(ins), long_ + _counted(ins)
        if i == hi:
            return short, long_
        succ = []
        if not (_unconditional(ins) or (ins.base == "EXIT" and ins.pred in ("", "@PT"))):
            succ.append(i + 1)
        if _is_branch(ins) and ins.target in sass.labels:
            t = sass.labels[ins.target]
            if i < t <= hi:
                succ.append(t)
        for s in succ:
            a, b = best.get(s, (None, None))
            best[s] = (short if a is None else min(a, short), long_ if b is None else max(b, long_))
    return None, None


def mma_shape(opcode: str):
    """("HGMMA" | "HMMA", m, n, k) of a tensor-core MMA opcode, else None."""
    parts = opcode.split(".")
    if parts[0] == "HGMMA":
        m, n, k = (int(x) for x in parts[1].split("x"))
        return "HGMMA", m, n, k
    if parts[0] == "HMMA" and parts[1] in _HMMA_SHAPES:
        return ("HMMA",) + _HMMA_SHAPES[parts[1]]
    return None


def mma_flops(opcode: str, num_warps: int) -> int:
    """FLOPs one CTA executes when all its warps issue this MMA instruction: an HGMMA is one
    warpgroup (4 warps) operation, an HMMA one per warp."""
    shape = mma_shape(opcode)
    if shape is None:
        return 0
    kind, m, n, k = shape
    units = num_warps // 4 if kind == "HGMMA" else num_warps
    return 2 * m * n * k * units


def instructions_cost(instrs: list, num_warps: int) -> dict:
    """instrs (non-NOP count), mma (opcode -> count), mma_instrs, ex2 and exec_flops (MMA
    FLOPs the CTA executes) of a list of instructions."""
    body = [ins for ins in instrs if _counted(ins)]
    mma = {}
    for ins in body:
        if mma_shape(ins.opcode):
            mma[ins.opcode] = mma.get(ins.opcode, 0) + 1
    return dict(instrs=len(body), mma=mma, mma_instrs=sum(mma.values()),
                ex2=sum(ins.opcode.startswith("MUFU.EX2") for ins in body),
                exec_flops=sum(mma_flops(op, num_warps) * c for op, c in mma.items()))


def loop_cost(sass: Sass, loop: Loop, num_warps: int) -> dict:
    """Static cost of one iteration of `loop`: instructions_cost of its body, and path_min /
    path_max (instructions along the shortest / longest path through its branches)."""
    short, long_ = _path_lengths(sass, loop)
    return dict(instructions_cost(sass.instrs[loop.head:loop.latch + 1], num_warps),
                path_min=short, path_max=long_)


def mma_summary(sass: Sass) -> dict:
    """opcode -> count of every tensor-core MMA instruction of the kernel."""
    out = {}
    for ins in sass.instrs:
        if mma_shape(ins.opcode):
            out[ins.opcode] = out.get(ins.opcode, 0) + 1
    return out


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> dict:
    """Resident CTAs per SM and what limits them (registers, shared memory, threads, CTA cap)."""
    lim = SM_LIMITS[arch]
    warp_regs = -(-regs * 32 // _REG_UNIT) * _REG_UNIT
    by = dict(regs=(lim["regs"] // warp_regs) // num_warps if warp_regs else lim["ctas"],
              smem=lim["smem"] // (smem + lim["smem_per_cta_reserved"]),
              threads=lim["threads"] // (32 * num_warps), ctas=lim["ctas"])
    ctas = min(by.values())
    return dict(ctas=ctas, warps=ctas * num_warps,
                limit="+".join(k for k, v in by.items() if v == ctas))


# ----------------------------------------------------------------------------------------------
# Attribution of loops to source calls
# ----------------------------------------------------------------------------------------------
@dataclass
class Call:
    """A call inside a kernel: callee name, source lines [first, last] of the call expression,
    and its arguments bound to the callee's parameter names (values evaluated with the kernel's
    constexprs; None where they depend on runtime values)."""
    callee: str
    first: int
    last: int
    args: dict
    sources: dict = None  # the argument expressions as source text, by parameter name


class _Runtime(Exception):
    pass


def _eval(node, env: dict):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        raise _Runtime(node.id)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env), _eval(node.right, env)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.FloorDiv: lambda: a // b, ast.BitAnd: lambda: a & b, ast.BitOr: lambda: a | b}
        if type(node.op) in ops:
            return ops[type(node.op)]()
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env) else node.orelse, env)
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, env) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, env)
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        a, b = _eval(node.left, env), _eval(node.comparators[0], env)
        ops = {ast.Eq: a == b, ast.NotEq: a != b, ast.Lt: a < b, ast.LtE: a <= b,
               ast.Gt: a > b, ast.GtE: a >= b}
        if type(node.ops[0]) in ops:
            return ops[type(node.ops[0])]
    raise _Runtime(ast.dump(node))


def _try_eval(node, env):
    try:
        return _eval(node, env)
    except (_Runtime, TypeError, ZeroDivisionError):
        return None


def _python_fn(fn):
    return getattr(fn, "fn", fn)


def _live_nodes(node, env):
    """The nodes under `node` (as ast.walk) but those of the branches of an `if` that its
    constexpr test (evaluated in env) rules out: code the compiler drops."""
    yield node
    if isinstance(node, ast.If):
        test = _try_eval(node.test, env)
        branches = [node.body] if test is True else [node.orelse] if test is False else [
            [node.test], node.body, node.orelse]
        children = [n for branch in branches for n in branch]
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        yield from _live_nodes(child, env)


def kernel_calls(kernel, constexprs: dict) -> list:
    """Every call in the kernel's body, but in branches its constexprs rule out, to a function
    of its module that has Python parameters (a @triton.jit helper), with the arguments bound
    to parameter names and evaluated."""
    py = _python_fn(kernel)
    module = inspect.getmodule(py)
    lines, start = inspect.getsourcelines(py)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fdef = tree.body[0]
    env = dict(constexprs)
    for node in ast.walk(fdef):  # local constexprs: NAME: tl.constexpr = expr
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            value = _try_eval(node.value, env)
            if value is not None:
                env[node.target.id] = value
    calls = []
    for node in _live_nodes(fdef, env):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        callee = getattr(module, node.func.id, None)
        if callee is None:
            continue
        try:
            params = list(inspect.signature(_python_fn(callee)).parameters)
        except (TypeError, ValueError):
            continue
        args, sources = {}, {}
        for name, a in list(zip(params, node.args)) + [(k.arg, k.value) for k in node.keywords
                                                      if k.arg]:
            args[name] = _try_eval(a, env)
            sources[name] = ast.unparse(a)
        calls.append(Call(node.func.id, node.lineno + start - 1, node.end_lineno + start - 1,
                          args, sources))
    return calls


def _kernel_file(kernel) -> str:
    return os.path.realpath(inspect.getsourcefile(_python_fn(kernel)))


def _kernel_line(ins: Instr, kfile: str):
    """The line of the kernel's own source that an instruction comes from (the outermost frame
    of its inlining chain in the kernel's file), or None."""
    outer = [ln for f, ln in ins.chain if os.path.realpath(f) == kfile]
    return outer[-1] if outer else None


def call_instructions(sass: Sass, kernel, call: Call) -> list:
    """Indices of the instructions that come from `call` (straight-line code of a call whose
    loop the compiler removed, e.g. a one-trip loop)."""
    kfile = _kernel_file(kernel)
    return [i for i, ins in enumerate(sass.instrs)
            if (line := _kernel_line(ins, kfile)) is not None and call.first <= line <= call.last]


def attribute_loop(sass: Sass, loop: Loop, kernel, calls: list):
    """The call of `kernel` (from kernel_calls) that the loop's MMA instructions (else all its
    instructions) come from: the call whose lines hold the kernel-level line of most of them;
    None when no call does (a loop written in the kernel itself)."""
    kfile = _kernel_file(kernel)
    body = sass.instrs[loop.head:loop.latch + 1]
    pick = [i for i in body if mma_shape(i.opcode)] or body
    votes = {}
    for ins in pick:
        line = _kernel_line(ins, kfile)
        if line is None:
            continue
        for c in calls:
            if c.first <= line <= c.last:
                votes[id(c)] = (votes.get(id(c), (0, c))[0] + 1, c)
    if not votes:
        return None
    return max(votes.values(), key=lambda vc: vc[0])[1]


@functools.lru_cache(maxsize=None)
def _function_spans(path: str) -> tuple:
    """(first line, last line, name) of every function defined in a Python source file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return tuple((n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _enclosing_function(path: str, line: int):
    spans = [s for s in _function_spans(path) if s[0] <= line <= s[1]]
    return min(spans, key=lambda s: s[1] - s[0])[2] if spans else None


def loop_breakdown(sass: Sass, loop: Loop, kernel, callee: str) -> dict:
    """Where the loop's instructions come from: helper function called by the loop function
    `callee` (a name of the kernel's module) -> instruction count; `callee` itself for its own
    lines, "other" for instructions outside it (loop control, hoisted code)."""
    module = inspect.getmodule(_python_fn(kernel))
    fn = _python_fn(getattr(module, callee))
    ffile = os.path.realpath(inspect.getsourcefile(fn))
    lines, start = inspect.getsourcelines(fn)
    end = start + len(lines) - 1
    out = {}
    for ins in sass.instrs[loop.head:loop.latch + 1]:
        if not _counted(ins):
            continue
        name = "other"
        for j, (f, ln) in enumerate(ins.chain):
            if os.path.realpath(f) == ffile and start <= ln <= end:
                name = callee if j == 0 else (
                    _enclosing_function(os.path.realpath(ins.chain[j - 1][0]),
                                        ins.chain[j - 1][1]) or "other")
                break
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

