"""splitserve.kernels: Triton kernels over the block-major paged KV pool, each beside its
plain-torch reference (store_kv, decode_attention, prefill_attention, rmsnorm, rotary) and
the `TritonPagedAttention` backend built on them (backend.py). See docs/kernels.md.

Nothing is imported here, so `import splitserve.kernels` works without triton."""
