"""Generation: chunked prefill then token-by-token decoding from any state (``decode``: ``generate``,
``stream``, sampling, CUDA graphs) and the fused Mamba-1 decode step (``fused_decode``)."""

from .decode import GenerationOutput, TokenStream, clear_graph_cache, generate, step_seed, stream

__all__ = ["GenerationOutput", "TokenStream", "generate", "stream", "clear_graph_cache", "step_seed"]
