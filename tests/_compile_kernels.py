"""Compile the Triton kernels for a GPU target without a GPU (used by test_triton_compile.py).

Runs as its own process: the test session has TRITON_INTERPRET=1 set, under which
Triton hands out interpreted functions that cannot be compiled.
Usage: python tests/_compile_kernels.py ARCH VARIANT [VARIANT ...]; prints one JSON line per variant.
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastattn.kernels.triton import flash_fwd  # noqa: E402

# The forward's and the backward's (tests/_compile_bwd_kernels.py compiles with this function too).
FLOAT_ARGS = {"qk_scale", "softcap_in", "softcap_out", "sm_scale", "dropout_p"}
INT64_ARGS = {"dropout_seed", "dropout_offset"}  # a training run's Philox offset outgrows int32


UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_pd", "stride_mn",
                "stride_dod", "stride_dqd", "stride_dkd", "stride_dvd", "stride_lm", "stride_glm"}


def compile_kernel(fn, pointers: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile as a launch on contiguous-last-dim tensors would: unit strides become
    constants (Triton specializes ints equal to 1) and pointers and the other strides
    are known multiples of 16 (so loads can be 16 bytes wide)."""
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for name in fn.arg_names:
        index = (fn.arg_names.index(name),)
        if name in UNIT_STRIDES and name not in constexprs:
            constexprs[name] = 1
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[index] = [["tt.divisibility", 16]]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i64" if name in INT64_ARGS else "i32"
            if name.startswith("stride_"):
                attrs[index] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


INDEX_POINTERS = ("CuQ", "CuK", "SeqUsedQ", "SeqUsedK", "KStart", "BatchIdx", "BlockTable")


def forward_variant(dtype="bf16", E=128, Ev=None, L=4096, mask=0, mask_dtype="i8", left=False, right=True,
                    softcap=False, alibi=False, sinks=False, split=False, pack=False, mask_rows=True, per_seq=None,
                    dropout=False):
    """``per_seq``: the kernel's per-sequence flags (VARLEN_Q, PAGE_SIZE, ...) that are on."""
    Ev = E if Ev is None else Ev
    cfg = flash_fwd.block_config(E, Ev, L)
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "Out": "fp32" if split else dtype, "Lse": "fp32",
                "Mask": mask_dtype if mask else dtype, "Slopes": "fp32" if alibi else dtype,
                "Sinks": "fp32" if sinks else dtype}
    pointers.update({name: "i32" if per_seq else dtype for name in INDEX_POINTERS})
    constexprs = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_D=max(16, triton.next_power_of_2(E)),
                      BLOCK_DV=max(16, triton.next_power_of_2(Ev)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      HAS_LEFT=left, HAS_RIGHT=right, MASK_KIND=mask, MASK_PER_ROW=bool(mask) and mask_rows, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi,
                      HAS_SINKS=sinks, SPLIT=split, PACK_GQA=pack, HAS_DROPOUT=dropout, UPCAST=False,
                      **dict(flash_fwd._DENSE, **(per_seq or {})))
    return pointers, constexprs, cfg["num_warps"], cfg["num_stages"]


VARIANTS = {
    "bf16_hd128_causal": dict(),
    "fp16_hd64_full": dict(dtype="fp16", E=64, right=False),
    "bf16_hd256": dict(E=256),
    "fp16_hd59_ev40_window": dict(dtype="fp16", E=59, Ev=40, left=True),
    "bf16_bool_mask_softcap_alibi_sinks": dict(mask=1, softcap=True, alibi=True, sinks=True, left=True),
    "fp16_float_mask": dict(dtype="fp16", mask=2, mask_dtype="fp32", right=False),
    "bf16_decode_split": dict(L=1, right=False, split=True, sinks=True),
    "bf16_decode_pack_gqa": dict(L=4, split=True, pack=True, mask=1, alibi=True, sinks=True),
    "bf16_hd64_causal": dict(E=64),
    "bf16_hd128_dropout": dict(dropout=True),
    "bf16_decode_pack_gqa_dropout": dict(L=4, split=True, pack=True, dropout=True),
    "bf16_hd64_key_padding": dict(E=64, mask=1, right=False, mask_rows=False),
    "bf16_hd128_key_padding_causal": dict(E=128, mask=1, mask_rows=False),
    "bf16_hd64_full_mask": dict(E=64, mask=1, right=False),
    "bf16_hd256_full": dict(E=256, right=False),
    "bf16_hd128_row_mask_causal": dict(E=128, mask=1),
    "fp16_hd128_row_mask_short": dict(dtype="fp16", E=128, L=48, mask=1, right=False),
    # Per-sequence layouts (fastattn.kernels.triton.flash_fwd.Sequences)
    "bf16_hd128_varlen_causal": dict(per_seq=dict(VARLEN_Q=True, VARLEN_K=True, LOWER_RIGHT=True)),
    "bf16_hd128_varlen_paged256": dict(per_seq=dict(VARLEN_Q=True, SEQUSED_K=True, PAGE_SIZE=256, LOWER_RIGHT=True)),
    "bf16_decode_paged16_split": dict(L=1, right=False, split=True, pack=True,
                                      per_seq=dict(SEQUSED_K=True, PAGE_SIZE=16, LOWER_RIGHT=True)),
    "bf16_decode_paged256_split": dict(L=1, right=False, split=True, pack=True,
                                       per_seq=dict(SEQUSED_K=True, PAGE_SIZE=256, LOWER_RIGHT=True)),
    "fp16_decode_leftpad_batch_idx": dict(dtype="fp16", E=64, L=1, split=True,
                                          per_seq=dict(SEQUSED_K=True, LEFTPAD=True, BATCH_IDX=True, LOWER_RIGHT=True)),
}




def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spilled registers) per thread, read by the cuobjdump that ships
    with Triton; empty when it is missing."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return dict(registers=int(found.group(1)), stack=int(found.group(2))) if found else {}


def main(argv):
    arch = int(argv[0])
    for name in argv[1:]:
        try:
            if name == "combine":
                pointers = {"PartOut": "fp32", "PartLse": "fp32", "Out": "bf16", "Lse": "fp32", "Sinks": "fp32"}
                constexprs = dict(HEAD_DIM_V=128, BLOCK_DV=128, BLOCK_S=16, HAS_SINKS=True, UPCAST=False)
                kernel = compile_kernel(flash_fwd._combine_splits_kernel, pointers, constexprs, arch, 4, 1)
                block_m = 0
            else:
                pointers, constexprs, warps, stages = forward_variant(**VARIANTS[name])
                kernel = compile_kernel(flash_fwd._flash_fwd_kernel, pointers, constexprs, arch, warps, stages)
                block_m = constexprs["BLOCK_M"]
            ptx = kernel.asm["ptx"]
            print(json.dumps(dict(variant=name, ok=True, wgmma="wgmma" in ptx, mma="mma" in ptx,
                                  block_m=block_m, shared=kernel.metadata.shared,
                                  **resource_usage(kernel.asm["cubin"]))), flush=True)
        except Exception as exc:
            print(json.dumps(dict(variant=name, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
