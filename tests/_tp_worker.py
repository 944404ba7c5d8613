"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), launched as torchrun
would launch it: loads the saved tiny model from argv[1] with tp_plan="auto" and
attn_implementation="fastattn" in the dtype argv[2], records the (query, key) shapes each
attention call sees, and saves this rank's logits and those shapes."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402


def main(path: str, dtype_name: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import fastattn  # noqa: F401  (registers attn_implementation="fastattn")
    from fastattn.integrations.transformers import record_backends

    shapes = []
    attend = ALL_ATTENTION_FUNCTIONS["fastattn"]

    def recording(module, query, key, value, *args, **kwargs):
        shapes.append((tuple(query.shape), tuple(key.shape), type(query).__name__))
        return attend(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["fastattn"] = recording
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation="fastattn",
                                                 dtype=getattr(torch, dtype_name))
    with record_backends() as calls, torch.no_grad():
        logits = model(torch.load(os.path.join(path, "ids.pt"))).logits
    backends = sorted({c.backend for c in calls})
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    torch.save(dict(logits=logits, shapes=shapes, backends=backends),
               os.path.join(path, f"{dtype_name}-rank{dist.get_rank()}.pt"))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
