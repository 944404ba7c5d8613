"""One rank of a multi-process ring-attention test, launched by tests/test_distributed.py
as torchrun would launch it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

Reads the cases (full-sequence inputs) from argv[1], runs each rank's slice through
fastattn.distributed.ring_flash_attn_func forward and backward over gloo, and saves this
rank's out, dq, dk, dv to argv[2]/rank{RANK}.pt for the parent to put together."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(cases_path: str, out_dir: str) -> None:
    from fastattn.distributed import ring_flash_attn_func, shard_sequence

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, case in torch.load(cases_path).items():
        layout = case["layout"]
        q, k, v, do = (shard_sequence(case[n], rank, world, layout=layout).requires_grad_(n != "do")
                       for n in ("q", "k", "v", "do"))
        out, lse = ring_flash_attn_func(q, k, v, causal=case["causal"], layout=layout,
                                        total_seqlen=case["q"].shape[1] if case["pass_total"] else None,
                                        return_lse=True)
        out.backward(do)
        results[name] = dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
