"""The Triton backward kernels compile for real GPUs (sm_80, sm_90), not only in the interpreter.

As test_triton_compile.py does for the forward: compiling ahead of time for a GPU
target (no driver needed) catches what the interpreter never sees (types across
constexpr branches, layouts, shared memory), and reads register use and spills.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("_compile_bwd_kernels.py")

pytestmark = pytest.mark.slow  # a compile for each GPU target: the slow tier (--full)
SM90 = ["bf16_hd128_causal", "fp16_hd64_full", "bf16_hd256_causal", "fp16_hd59_ev40_window",
        "bf16_hd128_key_padding_causal", "bf16_hd64_row_mask_softcap_alibi", "fp16_hd128_float_mask_dropout",
        "bf16_hd128_varlen_causal", "fp16_hd64_varlen_seqused_window", "preprocess"]
SM80 = ["bf16_hd128_causal", "fp16_hd128_float_mask_dropout"]
KERNELS = ["dkdv", "dq"]
# block_config()'s choices must not spill registers for the main training shapes.
NO_SPILLS = ["bf16_hd128_causal", "fp16_hd64_full", "bf16_hd256_causal"]


def _compile(arch, variants):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HELPER), str(arch), *variants], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["variant"], r["kernel"]): r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.fixture(scope="module")
def sm90():
    return _compile(90, SM90)


@pytest.fixture(scope="module")
def sm80():
    return _compile(80, SM80)


@pytest.mark.parametrize("variant", SM90)
def test_backward_compiles_for_sm90(sm90, variant):
    for kernel in ["preprocess"] if variant == "preprocess" else KERNELS:
        result = sm90[(variant, kernel)]
        assert result["ok"], f"{kernel}: {result.get('error')}"
        if kernel != "preprocess":
            assert result["mma"], f"{kernel}: the matrix products did not lower to tensor-core MMA"
            if "hd256" not in variant:
                assert result["wgmma"], f"{kernel}: the matrix products did not lower to Hopper's wgmma"


@pytest.mark.parametrize("variant", NO_SPILLS)
def test_backward_has_no_register_spills_on_sm90(sm90, variant):
    for kernel in KERNELS:
        result = sm90[(variant, kernel)]
        assert result["ok"], result.get("error")
        if "stack" not in result:
            pytest.skip("Triton ships no cuobjdump here: register use cannot be read")
        assert result["stack"] == 0, f"{kernel}: {result['stack']} bytes of stack per thread (spills), " \
                                     f"{result['registers']} registers"


@pytest.mark.parametrize("variant", SM80)
def test_backward_compiles_for_sm80(sm80, variant):
    for kernel in KERNELS:
        result = sm80[(variant, kernel)]
        assert result["ok"], f"{kernel}: {result.get('error')}"
        assert result["mma"] and not result["wgmma"]
