"""Compile the Triton backward kernels for a GPU target without a GPU (used by test_triton_compile_bwd.py).

Runs as its own process, as _compile_kernels.py does for the forward (whose compile
function and resource reader it reuses). Usage: python tests/_compile_bwd_kernels.py ARCH VARIANT [VARIANT ...];
prints one JSON line per (variant, kernel).
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402

from _compile_kernels import compile_kernel, resource_usage  # noqa: E402
from fastattn.kernels.triton import flash_bwd  # noqa: E402


def backward_variant(kernel, dtype="bf16", E=128, Ev=None, mask=0, mask_rows=True, left=False, right=True,
                     softcap=False, alibi=False, dropout=False, per_seq=None):
    """``per_seq``: the kernels' per-sequence flags (VARLEN_Q, ...) that are on."""
    Ev = E if Ev is None else Ev
    cfg = flash_bwd.block_config(E, Ev)[kernel]
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "DO": dtype, "Lse": "fp32", "Delta": "fp32",
                "DQ": dtype, "DK": dtype, "DV": dtype,
                "Mask": ("u8" if mask == 1 else "fp32") if mask else dtype, "Slopes": "fp32" if alibi else dtype,
                **{name: "i32" if per_seq else dtype for name in ("CuQ", "CuK", "SeqUsedQ", "SeqUsedK")}}
    constexprs = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_D=max(16, triton.next_power_of_2(E)),
                      BLOCK_DV=max(16, triton.next_power_of_2(Ev)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      HAS_LEFT=left, HAS_RIGHT=right, MASK_KIND=mask, MASK_PER_ROW=bool(mask) and mask_rows,
                      HAS_SOFTCAP=softcap, HAS_ALIBI=alibi, HAS_DROPOUT=dropout, UPCAST=False,
                      **dict(flash_bwd._DENSE, **(per_seq or {})))
    return pointers, constexprs, cfg["num_warps"], cfg["num_stages"]


VARIANTS = {
    "bf16_hd128_causal": dict(),
    "fp16_hd64_full": dict(dtype="fp16", E=64, right=False),
    "bf16_hd256_causal": dict(E=256),
    "fp16_hd59_ev40_window": dict(dtype="fp16", E=59, Ev=40, left=True),
    "bf16_hd128_key_padding_causal": dict(mask=1, mask_rows=False),
    "bf16_hd64_row_mask_softcap_alibi": dict(E=64, mask=1, softcap=True, alibi=True, left=True),
    "fp16_hd128_float_mask_dropout": dict(dtype="fp16", mask=2, right=False, dropout=True),
    "bf16_hd128_varlen_causal": dict(per_seq=dict(VARLEN_Q=True, VARLEN_K=True, LOWER_RIGHT=True)),
    "fp16_hd64_varlen_seqused_window": dict(dtype="fp16", E=64, left=True, per_seq=dict(
        VARLEN_Q=True, VARLEN_K=True, SEQUSED_Q=True, SEQUSED_K=True, LOWER_RIGHT=True)),
}
KERNELS = {"dkdv": flash_bwd._flash_bwd_dkdv_kernel, "dq": flash_bwd._flash_bwd_dq_kernel}


def main(argv):
    arch = int(argv[0])
    for name in argv[1:]:
        if name == "preprocess":
            pointers = {"Out": "bf16", "DO": "bf16", "Lse": "fp32", "DLse": "fp32", "Delta": "fp32",
                        "Sinks": "fp32", "SinkPart": "fp32"}
            runs = [("preprocess", flash_bwd._bwd_preprocess_kernel, pointers,
                     dict(HEAD_DIM_V=128, BLOCK_DV=128, BLOCK_M=64, HAS_DLSE=True, HAS_SINKS=True), 4, 1)]
        else:
            runs = []
            for kernel, fn in KERNELS.items():
                pointers, constexprs, warps, stages = backward_variant(kernel, **VARIANTS[name])
                runs.append((kernel, fn, pointers, constexprs, warps, stages))
        for kernel, fn, pointers, constexprs, warps, stages in runs:
            try:
                compiled = compile_kernel(fn, pointers, constexprs, arch, warps, stages)
                ptx = compiled.asm["ptx"]
                print(json.dumps(dict(variant=name, kernel=kernel, ok=True, wgmma="wgmma" in ptx, mma="mma" in ptx,
                                      shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]))),
                      flush=True)
            except Exception as exc:
                print(json.dumps(dict(variant=name, kernel=kernel, ok=False,
                                      error=f"{type(exc).__name__}: {exc}"[:2000])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
