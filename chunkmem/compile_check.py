"""Ahead-of-time compile check of every Triton kernel variant, no GPU needed.

    python -m chunkmem.compile_check [--arch 80 90] [--jobs 2] [--filter SUBSTRING]

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
(row suffix " +i16") with all of them divisible by 16 (e.g. T a multiple of 16).
Register allocation differs between Triton versions (each bundles its own ptxas): CI runs this
check under the newest Triton and under Triton 3.6, the version of the GPU machine's image.
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
# Largest dynamic shared memory per block (opt-in), bytes.
SMEM_LIMIT = {80: 166912, 90: 232448}


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


def _compile_one(job):
    """Compile variant `index` of `module_name` for `arch`; returns a result row (dict)."""
    module_name, index, arch, int_hints = job
    import triton
    from triton.backends.compiler import GPUTarget

    v = _load_variants(module_name)[index]
    name = v["name"] + (" +i16" if int_hints else "")
    row = dict(name=name, arch=arch, reg=None, stack=None, smem=None, wgmma=None, error=None)
    t0 = time.time()
    try:
        # As a launch with 16-byte-aligned tensors (any torch allocation) compiles it: Triton
        # then marks every pointer argument divisible by 16, which changes the generated code;
        # int_hints: also every integer argument, as when they are all multiples of 16.
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, t in enumerate(v["signature"].values())
                 if t.startswith("*") or (int_hints and t[0] in "iu")}
        src = triton.compiler.ASTSource(fn=v["fn"], signature=v["signature"],
                                        constexprs=v["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=v["num_warps"],
                                               num_stages=v["num_stages"]))
        row["smem"] = int(compiled.metadata.shared)
        row["reg"], row["stack"] = _res_usage(compiled.asm["cubin"])
        row["wgmma"] = compiled.asm["ptx"].count("wgmma.mma_async")
    except Exception as exc:  # reported in the table, makes the check fail
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    row["seconds"] = time.time() - t0
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    args = parser.parse_args(argv)
    if interpreting():
        print("compile_check compiles for real GPUs: unset TRITON_INTERPRET", file=sys.stderr)
        return 2

    jobs = []
    for module_name in MODULES:
        variants = _load_variants(module_name)
        if variants is None:
            print(f"# {module_name}: no compile_variants(), skipped")
            continue
        for i, v in enumerate(variants):
            if args.filter in v["name"]:
                jobs.extend((module_name, i, arch, int_hints) for arch in args.arch
                            if arch in v.get("archs", args.arch) for int_hints in (False, True))
    t0 = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_compile_one, jobs))
    else:
        rows = [_compile_one(j) for j in jobs]

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


if __name__ == "__main__":
    sys.exit(main())
