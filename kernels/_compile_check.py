"""Compile every kernel for real GPU targets without a GPU: a check the interpreter cannot make.

The Triton interpreter runs kernels as numpy code, so it never meets the compiler: a kernel that
passes every CPU test can still fail to lower, spill registers or overflow shared memory on a
GPU. This script compiles the kernels through Triton's full pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin, with the ptxas that ships with triton) for sm_80 and sm_90 and prints registers,
spills and shared memory per kernel and config. No device is needed; nothing is run.

    TRITON_INTERPRET=0 python -m fastvq.kernels._compile_check [--arch 80,90] [--quick]

Exit status 1 when a compile fails or needs more shared memory than the target has; spills are
reported, not failed. ``--quick`` compiles one config per kernel variant, ``--only search`` a
subset. The search kernel is compiled for the configs its autotune pruning keeps for a large
problem.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from ._common import interpreter_active

# Opt-in shared memory per block (bytes): A100 (sm_80) and H100 (sm_90).
_SMEM_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Case:
    """One kernel specialisation to compile."""

    name: str
    fn: object
    pointers: dict[str, str]  # pointer args -> element type ("fp32", "bf16", "i64", ...)
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    floats: tuple[str, ...] = field(default_factory=tuple)  # fp32 scalar args; the other args are i32


# Inner (per-element) strides of contiguous tensors: the JIT specialises an int equal to 1 into a
# constant, which lets loads vectorise; row strides and sizes are usually multiples of 16.
_UNIT_STRIDES = ("stride_xd", "stride_cd", "stride_qd", "stride_gd", "stride_zd", "stride_od", "stride_pd", "stride_sd")
_DIV16 = ("stride_xn", "stride_ck", "stride_qn", "stride_gn", "stride_zn", "stride_on", "stride_pk", "stride_sk",
          "stride_ok", "D")  # fmt: skip


def _signature(case: Case) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    sig, attrs = {}, {}
    for i, name in enumerate(case.fn.arg_names):
        if name in case.constexprs:
            sig[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            sig[name] = "constexpr"
            case.constexprs[name] = 1
        elif name in _DIV16:
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in case.pointers:
            sig[name] = "*" + case.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in case.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, attrs


def compile_case(case: Case, arch: int) -> dict:
    """Compile ``case`` for sm_<arch>; return registers, spill bytes and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    sig, attrs = _signature(case)
    src = ASTSource(case.fn, sig, dict(case.constexprs), attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps, "num_stages": case.num_stages}
    )
    # Ask ptxas for its resource report on the PTX triton produced (same flags as triton's own call).
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"].replace(f".target sm_{arch}\n", f".target {gpu}\n"))
        f.flush()
        log = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={gpu}", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "spills": int(spills.group(1)) if spills else 0,
        "smem": kernel.metadata.shared,
    }


def cases(quick: bool = False) -> list[Case]:
    """The specialisations that matter: every search config on bf16 / fp32 / tf32, and the rest."""
    from . import _segment, quantize, search, stats

    out = []
    io = {"a_ptr": "fp32", "b_ptr": "fp32", "idx_ptr": "i64", "dist_ptr": "fp32"}
    variants = [  # (label, dtype, constexprs beyond the block sizes)
        ("bf16 l2 D<=64 zq", "bf16", dict(COSINE=False, WRITE_ZQ=True, DOT_FP32=False, INPUT_PRECISION="ieee",
                                          RERANK=False, HOIST_X=True, BLOCK_D=64)),
        ("fp16 cos D>64", "fp16", dict(COSINE=True, WRITE_ZQ=False, DOT_FP32=False, INPUT_PRECISION="ieee",
                                       RERANK=False, HOIST_X=False, BLOCK_D=64)),
        ("fp32 ieee l2 D=8 fma", "fp32", dict(COSINE=False, WRITE_ZQ=False, DOT_FP32=False, INPUT_PRECISION="ieee",
                                              RERANK=False, HOIST_X=True, BLOCK_D=16, FMA_D=8)),
        ("fp32 ieee cos D=16", "fp32", dict(COSINE=True, WRITE_ZQ=False, DOT_FP32=False, INPUT_PRECISION="ieee",
                                            RERANK=False, HOIST_X=True, BLOCK_D=16)),
        ("fp32 ieee l2 D>32", "fp32", dict(COSINE=False, WRITE_ZQ=True, DOT_FP32=False, INPUT_PRECISION="ieee",
                                           RERANK=False, HOIST_X=False, BLOCK_D=search.block_d_for(256, 4))),
        ("fp32 tf32 rerank", "fp32", dict(COSINE=False, WRITE_ZQ=False, DOT_FP32=False, INPUT_PRECISION="tf32",
                                          RERANK=True, HOIST_X=False, BLOCK_D=search.block_d_for(256, 4))),
    ]  # fmt: skip
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for label, dt, cx in variants:
        # The configs the autotuner would keep for a large problem of this kind.
        named = {"x_ptr": torch.empty(0, dtype=torch_dtype[dt]), "N": 1 << 16, "K": 1 << 16}
        configs = search._prune_search_configs(search._search_configs(), named, **{"FMA_D": 0, **cx})
        for cfg in configs[:1] if quick else configs:
            meta = {"FMA_D": 0, **cx, "TOPK": search.RERANK_TOPK, **cfg.kwargs}
            name = (
                f"search {label} N{cfg.kwargs['BLOCK_N']} K{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
            )
            ptrs = {"x_ptr": dt, "c_ptr": dt, "zq_ptr": dt, **io}
            out.append(Case(name, search._search_fwd_kernel, ptrs, meta, cfg.num_warps, cfg.num_stages))
    out.append(Case("code_norms", search._code_norms_kernel, {"c_ptr": "bf16", "a_ptr": "fp32", "b_ptr": "fp32"},
                    dict(COSINE=True, BLOCK_K=128, BLOCK_D=64)))  # fmt: skip
    block_r, block_d, nw = _segment.segment_blocks(64)
    seg = dict(SEG_DOT=False, BLOCK_R=block_r, BLOCK_D=block_d)
    bwd_ptrs = {p: "bf16" for p in ("grad_zq_ptr", "z_ptr", "c_ptr", "grad_z_ptr", "grad_c_ptr")}
    bwd_ptrs.update(grad_loss_ptr="fp32", sidx_ptr="i64", perm_ptr="i64", head_ptr="fp32", tail_ptr="fp32")
    floats = ("two_over_numel", "commitment_weight", "codebook_weight")
    for scatter in (True, False):
        out.append(Case(f"vq_bwd scatter={scatter}", quantize._vq_bwd_kernel, bwd_ptrs,
                        dict(SCATTER=scatter, **seg), nw, 1, floats))  # fmt: skip
    stats_ptrs = {"x_ptr": "fp16", "sidx_ptr": "i64", "perm_ptr": "i64"}
    stats_ptrs.update(
        {p: "fp32" for p in ("sums_ptr", "head_ptr", "tail_ptr", "cnt_ptr", "head_cnt_ptr", "tail_cnt_ptr")}
    )
    out.append(Case("code_stats", stats._code_stats_fwd_kernel, stats_ptrs, seg, nw, 1))
    fin_ptrs = {"sidx_ptr": "i64", "out_ptr": "bf16"}
    fin_ptrs.update(
        {p: "fp32" for p in ("head_ptr", "tail_ptr", "grad_loss_ptr", "head_cnt_ptr", "tail_cnt_ptr", "cnt_ptr")}
    )
    for grad, counts in ((True, False), (False, True)):
        out.append(Case(f"segment_finish grad={grad} counts={counts}", _segment._segment_finish_kernel, fin_ptrs,
                        dict(HAS_GRAD_LOSS=grad, HAS_COUNTS=counts, BLOCK_R=block_r, BLOCK_D=block_d), 1, 1,
                        ("scale_a", "scale_b")))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (80, 90)")
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
    parser.add_argument("--only", default="", help="comma-separated name prefixes of the cases to compile")
    args = parser.parse_args(argv)
    if interpreter_active():
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled; run with TRITON_INTERPRET=0")
        return 2
    failed = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for case in (c for c in cases(args.quick) if c.name.startswith(tuple(args.only.split(",")))):
            try:
                r = compile_case(case, arch)
            except Exception as exc:  # report every failure, then exit 1
                failed += 1
                print(f"sm_{arch}  {case.name:58s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            over = r["smem"] > _SMEM_LIMIT[arch]
            failed += over
            flag = "  <-- shared memory over the limit" if over else ("  (spills)" if r["spills"] else "")
            print(
                f"sm_{arch}  {case.name:58s} regs {r['regs']:3d}  spill {r['spills']:5d} B  smem {r['smem']:6d} B{flag}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
