"""torch.library custom ops wrapping the compiled kernels (fake implementations for torch.compile)."""
