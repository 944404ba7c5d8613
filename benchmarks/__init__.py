"""fastattn benchmarks: timings against torch SDPA, FlexAttention and flash-attn.

    python -m benchmarks.attention --cpu          # dispatch overhead on this CPU (+ a Triton-interpreter run)
    python -m benchmarks.attention --grid key     # on a GPU: the short list of key cases
    python -m benchmarks.sweep                    # Triton block-size sweep (GPU)
    python -m benchmarks.model                    # Llama-shaped model, sdpa vs fastattn (GPU)
    bash benchmarks/gpu_check.sh OUTDIR           # everything the GPU check runs, in one command

See benchmarks/README.md.
"""
