"""One rank of the Transformers context-parallel test (tests/test_distributed.py): the saved
tiny model from argv[1] with attn_implementation="fastattn_ring", this rank's zigzag slice of
the input_ids and of their global position_ids; saves the local logits and the gradient of the
whole batch's summed loss with respect to the embedding matrix."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(path: str) -> None:
    from transformers import AutoModelForCausalLM

    from fastattn.distributed import context_parallel, register_transformers, shard_sequence

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    register_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn_ring", dtype=torch.bfloat16)
    ids = torch.load(os.path.join(path, "ids.pt"))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    local_ids, local_pos = (shard_sequence(t, rank, world) for t in (ids, positions))
    with context_parallel(total_seqlen=ids.shape[1]):
        logits = model(input_ids=local_ids, position_ids=local_pos, use_cache=False).logits
        logits.float().sum().backward()
    grad = model.get_input_embeddings().weight.grad.float()
    dist.all_reduce(grad)  # every rank's part of the gradient
    torch.save(dict(logits=logits.detach(), grad=grad), os.path.join(path, f"cp-rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
