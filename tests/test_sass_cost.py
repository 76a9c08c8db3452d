"""The static SASS cost parser (chunkmem.sass_cost) on a synthesized nvdisasm listing, and the
flash-attention yardstick of the cost report (bench/flash_yardstick.py) against torch in the
Triton interpreter. No GPU, no compiler: fast."""
import inspect
import sys
from pathlib import Path

import pytest
import torch

from chunkmem import sass_cost as sc

try:
    from bench import flash_yardstick as fy
except ModuleNotFoundError:  # pytest run without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import flash_yardstick as fy


def _listing(kernel_file: str, call_line: int, other_line: int) -> str:
    """nvdisasm -gi style text: a prologue, then a loop (head .L_x_1) whose body has a
    conditional forward branch over 2 instructions, 3 HGMMA, 2 MUFU.EX2, a NOP and a BRA.DIV
    to out-of-line code after the EXIT that branches back into the body (not a loop), a latch
    back to .L_x_1, and a trailing self-loop."""
    loc = (f'\t//## File "{kernel_file}", line 10 inlined at "{kernel_file}", line {call_line}\n'
           f'\t//## File "{kernel_file}", line {call_line}\n')
    return f"""\
\t.target\tsm_90a
\t//## File "{kernel_file}", line {other_line}
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
{loc}        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/              @P0 BRA `(.L_x_2) ;
        /*0050*/                   FMUL R3, R3, R4 ;
        /*0060*/                   FSEL R5, R3, -INF , P1 ;
.L_x_2:
        /*0070*/                   MUFU.EX2 R6, R5 ;
        /*0080*/                   MUFU.EX2 R7, R5 ;
        /*0090*/                   NOP ;
        /*00a0*/                   HGMMA.64x128x16.F32.BF16 R32, gdesc[UR12], R32 ;
        /*00b0*/                   BRA.DIV UR4, `(.L_x_4) ;
.L_x_5:
        /*00c0*/                   ISETP.GE.AND P2, PT, R2, R8, PT ;
        /*00d0*/              @!P2 BRA `(.L_x_1) ;
\t//## File "{kernel_file}", line {other_line}
        /*00e0*/                   EXIT ;
.L_x_4:
        /*00f0*/                   WARPSYNC.ALL ;
        /*0100*/                   BRA `(.L_x_5) ;
.L_x_3:
        /*0110*/                   BRA `(.L_x_3);
"""


def _fwd_calls():
    calls = sc.kernel_calls(fy.flash_fwd_kernel, dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64))
    return [c for c in calls if c.callee == "_fwd_inner"]


def test_loops_paths_mma_and_attribution():
    calls = _fwd_calls()
    assert len(calls) == 2 and [c.args["MASKED"] for c in calls] == [False, True]
    assert calls[0].args["BLOCK_N"] == 64 and calls[0].args["lo"] == 0
    assert calls[0].args["hi"] is None  # a runtime value
    kfile = inspect.getsourcefile(fy.flash_fwd_kernel.fn)
    masked = calls[1]
    def_line = inspect.getsourcelines(fy.flash_fwd_kernel.fn)[1]  # in no call
    sass = sc.parse_sass(_listing(kfile, masked.first, def_line))
    assert len(sass.instrs) == 18 and sass.instrs[4].pred == "@P0"
    assert sass.instrs[2].chain == ((kfile, 10), (kfile, masked.first))

    loops = sc.find_loops(sass)
    assert [(lp.head, lp.latch) for lp in loops] == [(2, 13)]  # none from the out-of-line code
    cost = sc.loop_cost(sass, loops[0], num_warps=8)
    assert cost["instrs"] == 11  # 12 in the body, minus the NOP
    assert (cost["path_min"], cost["path_max"]) == (9, 11)  # the branch skips FMUL, FSEL
    assert cost["mma"] == {"HGMMA.64x64x16.F32.BF16": 2, "HGMMA.64x128x16.F32.BF16": 1}
    assert cost["ex2"] == 2
    # 8 warps = 2 warpgroups, each issuing every HGMMA
    assert cost["exec_flops"] == 2 * (2 * 2 * 64 * 64 * 16 + 2 * 64 * 128 * 16)
    assert sc.attribute_loop(sass, loops[0], fy.flash_fwd_kernel, calls) is masked
    assert sc.attribute_loop(sass, sc.Loop(14, 16), fy.flash_fwd_kernel, calls) is None


def test_mma_shapes_and_occupancy():
    assert sc.mma_shape("HMMA.16816.F32.BF16") == ("HMMA", 16, 8, 16)
    assert sc.mma_shape("HMMA.1688.F32.TF32") == ("HMMA", 16, 8, 8)
    assert sc.mma_shape("HGMMA.64x16x16.F32.BF16") == ("HGMMA", 64, 16, 16)
    assert sc.mma_shape("FFMA") is None
    assert sc.mma_flops("HMMA.16816.F32.BF16", num_warps=4) == 4 * 2 * 16 * 8 * 16
    # 168 regs x 256 threads: 43008 of 65536 registers -> 1 CTA; 96 regs -> 2 CTAs
    assert sc.occupancy(90, 168, 1024, 8) == dict(ctas=1, warps=8, limit="regs")
    assert sc.occupancy(90, 96, 1024, 8)["ctas"] == 2
    # 100 KB of shared memory (+1 KB reserved each): 2 CTAs on sm_90, 1 on sm_80
    assert sc.occupancy(90, 32, 100 * 1024, 4) == dict(ctas=2, warps=8, limit="smem")
    assert sc.occupancy(80, 32, 100 * 1024, 4)["ctas"] == 1


def test_loop_dots_tables_cover_the_yardstick_loops():
    (masked,) = [c for c in _fwd_calls() if c.args["MASKED"]]
    dots = fy.LOOP_DOTS["_fwd_inner"](dict(dict(HEAD_DIM=128, BLOCK_M=128), **masked.args))
    assert dots == [("QK^T", 128, 64, 128), ("PV", 128, 64, 128)]
    cx = dict(HEAD_DIM=128, BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32,
              BLK_SLICE_FACTOR=2)
    calls = sc.kernel_calls(fy.flash_bwd_kernel, cx)
    blocks = [(c.callee, c.args["BLOCK_M"], c.args["BLOCK_N"], c.args["MASKED"]) for c in calls
              if c.callee in fy.LOOP_DOTS]
    assert blocks == [("_bwd_dkdv_inner", 16, 128, True), ("_bwd_dkdv_inner", 32, 128, False),
                      ("_bwd_dq_inner", 128, 16, True), ("_bwd_dq_inner", 128, 32, False)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_yardstick_matches_torch_causal_attention(dtype):
    """The yardstick is a real flash attention: forward = SDPA causal, gradients = autograd."""
    torch.manual_seed(0)
    B, H, T, D, scale = 1, 2, 64, 16, 0.3
    q, k, v = (torch.randn(B, H, T, D).to(dtype) for _ in range(3))
    out, lse = fy.flash_forward(q, k, v, scale, block_m=32, block_n=16, num_warps=4,
                                num_stages=1)
    qf, kf, vf = (t.double().requires_grad_() for t in (q, k, v))
    ref = fy.reference_attention(qf, kf, vf, scale)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)

    dout = torch.randn(B, H, T, D).to(dtype)
    ref.backward(dout.double())
    grads = fy.flash_backward(q, k, v, out, lse, dout, scale,
                              dict(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32,
                                   num_warps=4, num_stages=1))
    gtol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for got, want in zip(grads, (qf.grad, kf.grad, vf.grad)):
        torch.testing.assert_close(got.double(), want, **gtol)


def test_attention_loop_calls_resolve_to_useful_dots():
    """Every loop call of the shipped sm_90 bf16 D=128 attention kernels has a LOOP_DOTS entry
    whose flags evaluate to constants and whose tiles are the call's (dk/dv's masked loop runs
    BLOCK_W-query tiles): the forward's five loops (global unmasked and before the chunks, chunk
    inside and around, memory) each do QK^T + PV (calls in branches the constexprs rule out,
    such as the ranges' first tile, are not listed)."""
    from chunkmem.compile_check import LOOP_DOTS
    from chunkmem.triton_attention import compile_variants

    seen = {}
    fwd_tiles, expected_tiles = [], None
    for v in compile_variants():
        if not v["name"].endswith("_sm90") or "_bf16_d128_" not in v["name"]:
            continue
        calls = [c for c in sc.kernel_calls(v["fn"], v["constexprs"]) if c.callee in LOOP_DOTS]
        assert calls, v["name"]
        for c in calls:
            assert c.args["DO_1"] is not None and c.args["DO_2"] is not None
            args = dict(v["constexprs"], **{k: x for k, x in c.args.items() if x is not None})
            dots = LOOP_DOTS[c.callee](args)
            cx = v["constexprs"]
            tile = (cx["BLOCK_M"], cx["BLOCK_N"], 128)
            if v["name"].startswith("attn_fwd"):  # the global loops' BLOCK_N-key tiles, the
                # chunk loops' BLOCK_W (beside the global state), the memory loop's BLOCK_S
                fwd_tiles.append(c.args["BLOCK_N"])
                tile = (cx["BLOCK_M"], c.args["BLOCK_N"], 128)
                expected_tiles = [cx["BLOCK_N"]] * 2 + [cx["BLOCK_W"]] * 2 + [cx["BLOCK_S"]]
            elif v["name"].startswith("attn_bwd_dkdv") and c.args.get("MASKED"):
                tile = (cx.get("BLOCK_W"), cx["BLOCK_N"], 128)
            assert all(d[1:] == tile for d in dots), (v["name"], c.args, dots, tile)
            seen.setdefault(v["name"].split("_bf16")[0], []).append(
                (c.args.get("MEM"), c.args.get("MASKED"), [d[0] for d in dots]))
    # global: unmasked, masked before the chunks; chunk: unmasked inside it, masked; memory
    assert fwd_tiles == expected_tiles and expected_tiles == [128, 128, 64, 64, 16]
    assert sorted(seen["attn_fwd"]) == [(False, False, ["QK^T", "PV"]),
                                        (False, False, ["QK^T", "PV"]),
                                        (False, True, ["QK^T", "PV"]),
                                        (False, True, ["QK^T", "PV"]),
                                        (True, True, ["QK^T", "PV"])]
    assert set(seen) == {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dq", "attn_bwd_dkdv",
                         "attn_bwd_dmem"}
