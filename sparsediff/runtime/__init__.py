"""Runtime machinery under the methods: where generation stands (``step_state``), the per-layer step cache and
CUDA-graph step runner (``step_cache``), and split-KV scheduling from the GPU's size (``split_kv``)."""
