"""Ahead-of-time compile check of every Triton kernel variant, no GPU needed.

    python -m chunkmem.compile_check [--arch 80 90] [--jobs 2] [--filter SUBSTRING]
    python -m chunkmem.compile_check --cost [--arch 90] [--dtype bf16] [--head-dim 128]
        [--flags ...] [--set NAME=VALUE ...] [--out DIR]

Collects the variants of each module in ``MODULES`` that exposes ``compile_variants()`` (a list
of dicts with keys name, fn, signature, constexprs, num_warps, num_stages and optionally archs,
the targets a variant is launched on), compiles each with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``, and prints registers and spills (REG and STACK from
``cuobjdump -res-usage`` on the cubin), shared memory (compiled metadata) and the number of
wgmma (Hopper warpgroup MMA) instructions in the PTX per variant and target (0 on sm_80; on
sm_90, 0 means the dots run on the slower mma.sync path). Exits 1 on any compile error, any
spill (STACK > 0) or shared memory above the target's per-block limit.

Each variant is compiled as launches specialize it: every pointer marked divisible by 16 (16-byte
aligned tensors: every torch allocation), once with no hint on the integer arguments and once
(row suffix " +i16") with all of them divisible by 16 (e.g. T a multiple of 16); a variant's
optional key int_hints (a tuple of booleans) restricts that.
Register allocation differs between Triton versions (each bundles its own ptxas): CI runs this
check under the newest Triton and under Triton 3.6, the version of the GPU machine's image.

``--cost`` prints a static cost report instead (see :func:`cost_main`): per attention kernel
variant of one dtype and head dim (default sm_90, bf16, D = 128), and per flag set (paths,
RoPE, ranges), registers, spills, shared memory, CTAs per SM, the tensor-core MMA instructions,
and for every loop that holds MMAs the SASS instructions, MMAs and exp2 per iteration, the
useful FLOPs per iteration (``LOOP_DOTS``), executed / useful MMA work and warp-instructions
per useful MFLOP, beside the same numbers for a plain flash-attention yardstick
(bench/flash_yardstick.py). An issue-bound proxy read from SASS (:mod:`chunkmem.sass_cost`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from chunkmem.triton_env import interpreting

MODULES = ("chunkmem.triton_attention", "chunkmem.triton_memory")
# Largest dynamic shared memory per block (opt-in), bytes. The sm_80 entry is sm_86/sm_89's
# 99 KB, not A100's 163 KB: the sm_80 configurations also launch on those GPUs (gpu_arch).
SMEM_LIMIT = {80: 101376, 90: 232448}


def _load_variants(module_name: str):
    """The module's compile_variants(), or None when it is absent or has no such function."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return None
        raise
    fn = getattr(module, "compile_variants", None)
    return None if fn is None else fn()


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _res_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the kernel in a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "-res-usage", path], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if reg is None or stack is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    return int(reg.group(1)), int(stack.group(1))


def _error_text(exc: Exception) -> str:
    """One line for a compile error: its type and the last line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def _compile(v, arch: int, int_hints: bool):
    """triton.compile of variant v for sm_`arch`, specialized as a launch specializes it."""
    import triton
    from triton.backends.compiler import GPUTarget

    # As a launch with 16-byte-aligned tensors (any torch allocation) compiles it: Triton
    # then marks every pointer argument divisible by 16, which changes the generated code;
    # int_hints: also every integer argument, as when they are all multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, t in enumerate(v["signature"].values())
             if t.startswith("*") or (int_hints and t[0] in "iu")}
    src = triton.compiler.ASTSource(fn=v["fn"], signature=v["signature"],
                                    constexprs=v["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=v["num_warps"], num_stages=v["num_stages"]))


def _compile_one(job):
    """Compile variant `index` of `module_name` for `arch`; returns a result row (dict)."""
    module_name, index, arch, int_hints = job
    v = _load_variants(module_name)[index]
    name = v["name"] + (" +i16" if int_hints else "")
    row = dict(name=name, arch=arch, reg=None, stack=None, smem=None, wgmma=None, error=None)
    t0 = time.time()
    try:
        compiled = _compile(v, arch, int_hints)
        row["smem"] = int(compiled.metadata.shared)
        row["reg"], row["stack"] = _res_usage(compiled.asm["cubin"])
        row["wgmma"] = compiled.asm["ptx"].count("wgmma.mma_async")
    except Exception as exc:  # reported in the table, makes the check fail
        row["error"] = _error_text(exc)
    row["seconds"] = time.time() - t0
    return row


def _run(fn, jobs: list, n_jobs: int) -> list:
    """fn over jobs, in n_jobs worker processes when n_jobs > 1; results in job order."""
    if n_jobs > 1:
        with ProcessPoolExecutor(n_jobs) as pool:
            return list(pool.map(fn, jobs))
    return [fn(j) for j in jobs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=None, choices=sorted(SMEM_LIMIT),
                        help="compile targets (default: 80 90; with --cost: 90)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    cost = parser.add_argument_group("static cost report (--cost)")
    cost.add_argument("--cost", action="store_true", help="print the static cost report")
    cost.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    cost.add_argument("--head-dim", type=int, default=128)
    cost.add_argument("--flags", default=",".join(FLAG_SETS),
                      help=f"comma-separated flag sets to compile each kernel with, of "
                           f"{', '.join(FLAG_SETS)}")
    cost.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="override a constexpr (or num_warps, num_stages) of every attention "
                           "variant (repeatable), e.g. --set num_warps=4 --filter fwd")
    cost.add_argument("--no-int-hints", action="store_true",
                      help="compile without the divisible-by-16 hints on integer arguments")
    cost.add_argument("--no-yardstick", action="store_true")
    cost.add_argument("--out", default=None,
                      help="also write cost_sm{arch}_{dtype}_d{D}.md and .json to this folder")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if interpreting():
        print("compile_check compiles for real GPUs: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if args.cost:
        return cost_main(args)
    args.arch = args.arch or [80, 90]

    jobs = []
    for module_name in MODULES:
        variants = _load_variants(module_name)
        if variants is None:
            print(f"# {module_name}: no compile_variants(), skipped")
            continue
        for i, v in enumerate(variants):
            if args.filter in v["name"]:
                jobs.extend((module_name, i, arch, int_hints) for arch in args.arch
                            if arch in v.get("archs", args.arch)
                            for int_hints in v.get("int_hints", (False, True)))
    t0 = time.time()
    rows = _run(_compile_one, jobs, args.jobs)

    failed = 0
    print(f"{'variant':<44} {'sm':>3} {'REG':>4} {'STACK':>5} {'SMEM(B)':>8} {'WGMMA':>5} "
          f"{'s':>5}  status")
    for r in rows:
        problems = []
        if r["error"]:
            problems.append(r["error"])
        else:
            if r["stack"] > 0:
                problems.append(f"spills {r['stack']} B")
            if r["smem"] > SMEM_LIMIT[r["arch"]]:
                problems.append(f"smem > {SMEM_LIMIT[r['arch']]}")
        failed += bool(problems)
        print(f"{r['name']:<44} {r['arch']:>3} {r['reg'] if r['reg'] is not None else '-':>4} "
              f"{r['stack'] if r['stack'] is not None else '-':>5} "
              f"{r['smem'] if r['smem'] is not None else '-':>8} "
              f"{r['wgmma'] if r['wgmma'] is not None else '-':>5} {r['seconds']:>5.1f}  "
              f"{'; '.join(problems) or 'ok'}")
    import triton

    print(f"# {len(rows)} compiles with triton {triton.__version__}, {failed} failed, "
          f"{time.time() - t0:.0f} s")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# Static cost report (--cost)
# ----------------------------------------------------------------------------------------------
# Flag sets each attention kernel is compiled with (from its plain-rows variant of
# compile_variants(); only the constexprs a kernel has are set; duplicates are dropped). The
# ranges and packed sets are the other row layouts that launches compile (per-row key ranges,
# packed documents), with every path on; chunk+mem+rope is the linear-cost mode
# (use_global=False).
_THREE_PATHS = dict(USE_GLOBAL=True, HAS_CHUNK=True, HAS_MEM=True, ROPE=True)
FLAG_SETS = {
    "global": dict(USE_GLOBAL=True, HAS_CHUNK=False, HAS_MEM=False, ROPE=False, RANGES=False,
                   PACKED=False),
    "global+rope": dict(USE_GLOBAL=True, HAS_CHUNK=False, HAS_MEM=False, ROPE=True, RANGES=False,
                        PACKED=False),
    "3paths+rope": dict(_THREE_PATHS, RANGES=False, PACKED=False),
    "3paths+rope+ranges": dict(_THREE_PATHS, RANGES=True, PACKED=False),
    "3paths+rope+packed": dict(_THREE_PATHS, RANGES=False, PACKED=True),
    "chunk+mem+rope": dict(USE_GLOBAL=False, HAS_CHUNK=True, HAS_MEM=True, ROPE=True,
                           RANGES=False, PACKED=False),
}
_FLAG_NAMES = (("USE_GLOBAL", "G"), ("HAS_CHUNK", "C"), ("HAS_MEM", "M"), ("ROPE", "rope"),
               ("RANGES", "ranges"), ("PACKED", "packed"))


def _tile(a):
    return a["BLOCK_M"], a["BLOCK_N"], a["HEAD_DIM"]


def _on(a, flag):
    """A flag argument of a loop call: True when on or decided at run time (None)."""
    return a.get(flag) is not False


# Useful dots per iteration of each loop function of the attention kernels: (dot, M, N, K),
# 2 M N K FLOPs each; the arguments are the loop call's constexprs over the kernel's. Queries
# BLOCK_M x keys (or memory slots) BLOCK_N x HEAD_DIM, whatever the tile's orientation.
LOOP_DOTS = {
    # one QK^T per key tile, shared by the global and chunk states; one PV per state on
    "_fwd_loop": lambda a: [("QK^T",) + _tile(a)] + [("PV",) + _tile(a)] * (
        _on(a, "DO_1") + _on(a, "DO_2")),
    # recomputed QK^T and dP = dO V^T; dQ += dS K when GRAD_Q (not in the preprocess kernel)
    "_bwd_q_loop": lambda a: [(n,) + _tile(a) for n in ("QK^T", "dP")] + (
        [("dQ",) + _tile(a)] if _on(a, "GRAD_Q") else []),
    # QK^T, dP, dV += P^T dO, dK += dS^T Q (the chunk state adds no dot)
    "_bwd_kv_loop": lambda a: [(n,) + _tile(a) for n in ("QK^T", "dP", "dV", "dK")],
}
# The yardstick loop each kernel kind is compared with: (yardstick kind, loop function), its
# unmasked main loop.
_YARDSTICK_LOOP = {"fwd": ("fwd", "_fwd_inner"), "bwd_dq": ("bwd", "_bwd_dq_inner"),
                   "bwd_preprocess": ("bwd", "_bwd_dq_inner"),
                   "bwd_dkdv": ("bwd", "_bwd_dkdv_inner"), "bwd_dmem": ("bwd", "_bwd_dkdv_inner")}

COST_LIMITS = (
    "Static, issue-bound proxy read from SASS compiled ahead of time (no GPU run): it counts the "
    "instructions of one loop iteration, not their latency, and ignores memory bandwidth and "
    "latency, occupancy effects (CTAs/SM is listed, not applied), trip counts, how often masked "
    "tiles and runtime branches run, and everything outside the loops (prologue, epilogue; a "
    "loop call the compiler made straight-line, such as a one-tile diagonal, is listed with the "
    "instructions attributed to it, without a multiple). instr/iter is the longest path "
    "through the loop body (the shortest after '/' where a runtime branch can skip code); "
    "'instructions by helper' splits the body by the function the loop calls that each "
    "instruction comes from (from the line table). warp-instr / useful MFLOP = "
    "instr/iter x warps per CTA / useful MFLOP per iteration, lower is better; x yardstick "
    "divides it by the same figure of the yardstick's unmasked main loop of that direction "
    "(fwd: forward loop; dq and preprocess: dQ loop; dk/dv and dmem: dK/dV loop). exec/useful: "
    "MMA work the SASS executes (HGMMA shape x count x warpgroups, HMMA shape x count x warps) "
    "over the useful dots (table below); above 1 means replicated or padded MMAs.")


def _yardstick_module():
    """bench.flash_yardstick (the repository root joins sys.path when needed)."""
    try:
        from bench import flash_yardstick
    except ModuleNotFoundError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench import flash_yardstick
    return flash_yardstick


def _kind(v) -> str:
    name = getattr(v["fn"], "__name__", "") or getattr(getattr(v["fn"], "fn", None), "__name__", "")
    return v.get("kind") or re.sub(r"^hybrid_attention_|_kernel$", "", name)


def _flag_label(constexprs: dict) -> str:
    paths = "".join(s for k, s in _FLAG_NAMES[:3] if constexprs.get(k))
    extra = [s for k, s in _FLAG_NAMES[3:] if constexprs.get(k)]
    return "+".join(([paths] if paths else []) + extra) or "-"


def _state_1_source(call) -> str:
    """Source text of the state-1 argument of a loop call (the forward's m1, the dq loop's
    lse1), '' for the others."""
    sources = call.sources or {}
    return sources.get("m1") or sources.get("lse1") or ""


def _loop_role(a: dict) -> str:
    """Which paths and masking a loop call computes, from its constexpr arguments."""
    if a.get("MEM"):
        return "memory slots"
    parts = []
    # state 1 is the global path, but for the loops that pass the chunk path's state or
    # statistics there (named *_c: m_c, lse_c; the dk/dv loops: path index P1 = 1)
    first = "chunk" if a.get("P1") == 1 or a.get("STATE_1", "").endswith("_c") else "global"
    if "DO_1" in a:
        parts.append("+".join(n for f, n in (("DO_1", first), ("DO_2", "chunk"))
                              if a.get(f) is not False))
    if a.get("PRE"):
        parts.append("before the chunks")
    if "MASKED" in a:
        parts.append("masked" if a["MASKED"] else "unmasked")
    elif "DO_1" in a:
        parts.append("masked")
    if a.get("GRAD_Q") is False:
        parts.append("no dQ")
    return ", ".join(p for p in parts if p) or "-"


def _parse_sets(items) -> dict:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        low = value.strip().lower()
        out[name.strip()] = (True if low == "true" else False if low == "false"
                             else int(value) if value.strip().lstrip("-").isdigit() else value)
    return out


def _layout(flags: dict) -> str:
    """The ROW_LAYOUTS suffix of a flag set."""
    return "_ranges" if flags.get("RANGES") else "_packed" if flags.get("PACKED") else ""


def _cost_jobs(args) -> list:
    from chunkmem import triton_attention

    sets = [f.strip() for f in args.flags.split(",") if f.strip()]
    unknown = [f for f in sets if f not in FLAG_SETS]
    if unknown:
        raise SystemExit(f"unknown flag sets {unknown}; known: {list(FLAG_SETS)}")
    overrides = _parse_sets(args.set)
    hints = not args.no_int_hints
    jobs = []
    for arch in args.arch:
        seen = {}
        for v in triton_attention.compile_variants():
            if (not v["name"].startswith("attn_")
                    or arch not in v.get("archs", (arch,)) or args.filter not in v["name"]
                    or v["constexprs"].get("HEAD_DIM") != args.head_dim
                    or next(iter(v["signature"].values())) != "*" + args.dtype):
                continue
            for fs in sets:
                if (v.get("layout", "") != _layout(FLAG_SETS[fs]) or v.get("mode", "")
                        != triton_attention.path_mode(_kind(v), FLAG_SETS[fs])):
                    continue  # the set compiles the variant of its own row layout and path set
                cx = dict(v["constexprs"])
                cx.update({k: x for k, x in FLAG_SETS[fs].items() if k in cx})
                cx.update({k: x for k, x in overrides.items() if k in cx})
                key = (v["name"], tuple(sorted(cx.items())))
                if key in seen:  # the same kernel: it also stands for this flag set
                    seen[key]["sets"].append(fs)
                    continue
                launch = {k: overrides.get(k, v[k]) for k in ("num_warps", "num_stages")}
                seen[key] = dict(source="attn", name=v["name"], arch=arch, constexprs=cx,
                                 label=_flag_label(cx), sets=[fs], int_hints=hints, **launch)
                jobs.append(seen[key])
        if not args.no_yardstick:
            for i, _v in enumerate(_yardstick_module().compile_variants(args.dtype, args.head_dim,
                                                                        arch)):
                jobs.append(dict(source="yardstick", index=i, arch=arch, constexprs=None,
                                 label="causal", sets=[], int_hints=hints, dtype=args.dtype,
                                 head_dim=args.head_dim))
    return jobs


def _cost_one(job) -> dict:
    """Compile one job of _cost_jobs and measure it (runs in a worker process)."""
    from chunkmem import sass_cost as sc

    if job["source"] == "attn":
        from chunkmem import triton_attention

        (v,) = [v for v in triton_attention.compile_variants() if v["name"] == job["name"]]
        v = dict(v, constexprs=job["constexprs"], num_warps=job["num_warps"],
                 num_stages=job["num_stages"])
        table = LOOP_DOTS
    else:
        fy = _yardstick_module()
        v = fy.compile_variants(job["dtype"], job["head_dim"], job["arch"])[job["index"]]
        table = fy.LOOP_DOTS
    arch, warps = job["arch"], v["num_warps"]
    row = dict(source=job["source"], name=v["name"], kind=_kind(v), label=job["label"],
               sets=job["sets"], arch=arch,
               num_warps=warps, num_stages=v["num_stages"], int_hints=job["int_hints"],
               constexprs={k: x for k, x in v["constexprs"].items()}, error=None, loops=[])
    t0 = time.time()
    try:
        compiled = _compile(v, arch, job["int_hints"])
        cubin = compiled.asm["cubin"]
        row["smem"] = int(compiled.metadata.shared)
        row["reg"], row["stack"] = _res_usage(cubin)
        sass = sc.parse_sass(sc.disassemble(cubin))
        row["mma"] = sc.mma_summary(sass)
        row["occupancy"] = sc.occupancy(arch, row["reg"], row["smem"], warps)
        calls = sc.kernel_calls(v["fn"], v["constexprs"])
        looped = set()
        for lp in sc.find_loops(sass):
            cost = sc.loop_cost(sass, lp, warps)
            if cost["mma_instrs"]:
                call = sc.attribute_loop(sass, lp, v["fn"], calls)
                looped.add(id(call))
                where = sc.loop_breakdown(sass, lp, v["fn"], call.callee) if call else {}
                row["loops"].append(_loop_entry(dict(cost, depth=lp.depth, breakdown=where),
                                                call, v, table))
        # loop calls the compiler turned into straight-line code (one trip, e.g. a diagonal tile)
        for call in calls:
            if call.callee in table and id(call) not in looped:
                idx = sc.call_instructions(sass, v["fn"], call)
                cost = sc.instructions_cost([sass.instrs[i] for i in idx], warps)
                if cost["mma_instrs"]:
                    n = cost["instrs"]
                    row["loops"].append(_loop_entry(dict(cost, path_min=n, path_max=n,
                                                         depth=None, straight=True),
                                                    call, v, table))
    except Exception as exc:  # reported in the table
        row["error"] = _error_text(exc)
    row["seconds"] = time.time() - t0
    return row


def _loop_entry(cost: dict, call, v: dict, table: dict) -> dict:
    """A report entry for one loop (or straight-line loop call) of variant v: its cost, the
    source call, the useful dots from `table` and the derived ratios."""
    loop = dict(cost, callee=call.callee if call else None, line=call.first if call else None,
                role=_loop_role(dict(call.args, STATE_1=_state_1_source(call)))
                if call else "-", dots=None, useful_flops=None)
    if call is not None and call.callee in table:
        args = dict(v["constexprs"])
        args.update({k: x for k, x in call.args.items() if x is not None})
        args.update({k: None for k, x in call.args.items() if x is None and k.isupper()})
        loop["masked"] = call.args.get("MASKED")
        loop["dots"] = table[call.callee](args)
        loop["useful_flops"] = sum(2 * m * n * k for _d, m, n, k in loop["dots"])
    if loop["useful_flops"]:
        instr = cost["path_max"] or cost["instrs"]
        loop["exec_ratio"] = cost["exec_flops"] / loop["useful_flops"]
        loop["wi_per_mflop"] = instr * v["num_warps"] / (loop["useful_flops"] / 1e6)
    return loop


def _add_yardstick_multiples(rows):
    """Set loop["x_yardstick"] (and the reference loop's name) for every attention loop."""
    refs = {}
    for r in rows:
        if r["source"] == "yardstick" and not r["error"]:
            for lp in r["loops"]:
                if (lp.get("masked") is False and lp.get("wi_per_mflop")
                        and not lp.get("straight")):
                    refs[(r["arch"], r["kind"], lp["callee"])] = lp
    for r in rows:
        if r["source"] != "attn" or r["error"]:
            continue
        ref = refs.get((r["arch"],) + _YARDSTICK_LOOP.get(r["kind"], ("", "")))
        for lp in r["loops"]:
            if ref is not None and lp.get("wi_per_mflop") and not lp.get("straight"):
                lp["x_yardstick"] = lp["wi_per_mflop"] / ref["wi_per_mflop"]
                lp["yardstick_loop"] = ref["callee"]


def _mma_text(mma: dict) -> str:
    parts = []
    for op, count in sorted(mma.items(), key=lambda kv: -kv[1]):
        shape = op.split(".")
        parts.append(f"{count}x {shape[0]}.{shape[1]}")
    return ", ".join(parts) or "-"


def _dots_text(dots) -> str:
    if not dots:
        return "?"
    tiles = {d[1:] for d in dots}
    names = "+".join(d[0] for d in dots)
    if len(tiles) == 1:
        m, n, k = next(iter(tiles))
        return f"{names} @ {m}x{n}x{k}"
    return ", ".join(f"{d[0]} {d[1]}x{d[2]}x{d[3]}" for d in dots)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _tool_version(name: str) -> str:
    from chunkmem.sass_cost import tool_path

    try:
        out = subprocess.run([tool_path(name), "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except (OSError, IndexError):
        return "unknown"


def _source_state() -> str:
    """The git commit the kernels were read at, and whether their files had local changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels",
                                "chunkmem/triton_attention.py", "bench/flash_yardstick.py"],
                               cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty.splitlines() if line.strip()]
    if not changed:
        return head
    import hashlib

    digests = []
    for path in changed:
        full = os.path.join(root, path)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                digests.append(f"{path} sha256 {hashlib.sha256(f.read()).hexdigest()[:12]}")
    return f"{head} with uncommitted changes ({'; '.join(digests) or ', '.join(changed)})"


def _cost_markdown(rows, meta) -> str:
    arches = ", ".join(f"sm_{a}" for a in meta["arch"])
    out = [f"# Static SASS cost of the attention kernels ({arches}, {meta['dtype']}, "
           f"D={meta['head_dim']})", "",
           f"Generated by `{meta['command']}` on {meta['date']} with Triton {meta['triton']} "
           f"(ptxas: {meta['ptxas']}; nvdisasm: {meta['nvdisasm']}); kernel sources at "
           f"{meta['source']}. Integer-argument hints: {meta['int_hints']} "
           "(as launches with T, S multiples of 16 compile).", "",
           "Limits: " + COST_LIMITS, "",
           "Flag sets (constexprs set where a kernel has them): " + "; ".join(
               f"{k} = {', '.join(f'{n}={x}' for n, x in v.items())}"
               for k, v in FLAG_SETS.items() if k in meta["flag_sets"]) + ". Kernel flags "
           "column: G, C, M = global, chunk, memory path on; rope; ranges = per-row key ranges; "
           "packed = packed documents; '-' = none of these.", "",
           "## Main-loop cost vs yardstick", "",
           "Warp-instructions per useful MFLOP of each loop over the yardstick's (x, lower is "
           "better; '-': the loop is absent with these flags).", ""]
    out += _summary_markdown(rows, meta["flag_sets"])
    out += ["", "## Kernels", "",
           "| kernel | flags | sm | REG | STACK | SMEM (B) | warps/stages | CTAs/SM (limit) "
           "| MMA instructions in the kernel |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            out.append(f"| {r['name']} | {r['label']} | {r['arch']} | error: {r['error']} "
                       "| | | | | |")
            continue
        occ = r["occupancy"]
        out.append(f"| {r['name']} | {r['label']} | {r['arch']} | {r['reg']} | {r['stack']} | "
                   f"{r['smem']} | {r['num_warps']}/{r['num_stages']} | "
                   f"{occ['ctas']} ({occ['limit']}) | {_mma_text(r['mma'])} |")
    out += ["", "## Loops holding MMAs (per iteration)", "",
            "| kernel | flags | loop (line) | what | instr/iter | MMA/iter | EX2/iter "
            "| useful dots | useful MFLOP | exec/useful | warp-instr / useful MFLOP "
            "| x yardstick | instructions by helper (top 4) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for lp in r["loops"] if not r["error"] else []:
            instr = f"{lp['path_max']}" + (f"/{lp['path_min']}" if lp["path_min"] != lp["path_max"]
                                           else "")
            role = lp["role"] + (" (no loop in SASS: straight-line, one tile)"
                                 if lp.get("straight") else "")
            top = list(lp.get("breakdown", {}).items())[:4]
            useful = lp.get("useful_flops")
            out.append(
                f"| {r['name']} | {r['label']} | {lp['callee']} ({lp['line']}) | {role} "
                f"| {instr} | {lp['mma_instrs']}: {_mma_text(lp['mma'])} | {lp['ex2']} "
                f"| {_dots_text(lp['dots'])} | {_fmt(useful and useful / 1e6, '.3f')} "
                f"| {_fmt(lp.get('exec_ratio'), '.2f')} | {_fmt(lp.get('wi_per_mflop'), '.0f')} "
                f"| {_fmt(lp.get('x_yardstick'), '.2f')} "
                f"| {', '.join(f'{k} {n}' for k, n in top)} |")
    out += ["", "## Useful dots per loop", "",
            "FLOPs = 2 M N K per dot; M x N is the (query x key) tile, K the head dim.", "",
            "| kernel kind | loop function | dots per iteration |", "|---|---|---|",
            "| fwd | _fwd_loop | QK^T (shared by global and chunk) + PV per state on "
            "(global, chunk; memory loop: QK^T + PV) |",
            "| bwd_preprocess | _bwd_q_loop (GRAD_Q off) | QK^T + dP (recomputation of the memory "
            "and chunk paths' rowsum(P dP)) |",
            "| bwd_dq | _bwd_q_loop | QK^T + dP + dQ |",
            "| bwd_dkdv, bwd_dmem | _bwd_kv_loop | QK^T + dP + dV + dK |",
            "| yardstick fwd | _fwd_inner | QK^T + PV |",
            "| yardstick bwd | _bwd_dkdv_inner | KQ^T + dV + dP^T + dK |",
            "| yardstick bwd | _bwd_dq_inner | QK^T + dP + dQ |", ""]
    return "\n".join(out)


def _summary_markdown(rows, sets) -> list:
    """x yardstick of every attention loop: one row per loop call site, one column per flag set
    (the kernel compiled with that set; '-' where the loop is absent)."""
    arches = sorted({r["arch"] for r in rows})
    cols = [(a, fs) for a in arches for fs in sets]
    sites = {}
    for r in rows:
        if r["source"] != "attn" or r["error"]:
            continue
        for lp in (lp for lp in r["loops"] if not lp.get("straight")):
            site = sites.setdefault((r["arch"], r["kind"], lp["callee"], lp["line"]),
                                    dict(role=lp["role"], cells={}))
            if len(lp["role"]) > len(site["role"]):
                site["role"] = lp["role"]
            for fs in r["sets"]:
                site["cells"][(r["arch"], fs)] = lp.get("x_yardstick")
    heads = [f"sm_{a} {fs}" if len(arches) > 1 else fs for a, fs in cols]
    out = ["| kernel | loop (line): what | " + " | ".join(heads) + " |",
           "|---|---|" + "---|" * len(heads)]
    for (arch, kind, callee, line), site in sites.items():
        cells = [_fmt(site["cells"].get(c), ".1f") for c in cols]
        out.append(f"| {kind} | {callee} ({line}): {site['role']} | " + " | ".join(cells) + " |")
    return out


def cost_main(args) -> int:
    """The --cost report: compile, measure, print (and write with --out); 1 on compile errors."""
    import datetime
    import json

    import triton

    args.arch = args.arch or [90]
    jobs = _cost_jobs(args)
    t0 = time.time()
    # A fresh Triton cache: the loops are attributed through the SASS line table, whose file
    # paths are those of the compile that filled the cache (Triton keys it by source hash, not
    # path), so a kernel compiled earlier from another checkout would attribute no loop.
    with tempfile.TemporaryDirectory(prefix="chunkmem-cost-cache-") as cache:
        saved = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            rows = _run(_cost_one, jobs, args.jobs)
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    _add_yardstick_multiples(rows)
    meta = dict(arch=args.arch, dtype=args.dtype, head_dim=args.head_dim,
                flag_sets=[f.strip() for f in args.flags.split(",") if f.strip()],
                int_hints="on" if not args.no_int_hints else "off",
                command=" ".join(["python -m chunkmem.compile_check"] + args.argv),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                triton=triton.__version__, ptxas=_tool_version("ptxas"),
                nvdisasm=_tool_version("nvdisasm"), source=_source_state(),
                seconds=round(time.time() - t0, 1))
    text = _cost_markdown(rows, meta)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"cost_sm{'_'.join(map(str, args.arch))}_{args.dtype}"
                                      f"_d{args.head_dim}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=meta, limits=COST_LIMITS, rows=rows), f, indent=1, default=str)
        print(f"# wrote {stem}.md and .json")
    errors = sum(bool(r["error"]) for r in rows)
    print(f"# {len(rows)} compiles, {errors} errors, {time.time() - t0:.0f} s", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
