"""Generation: chunked prefill then token-by-token decoding from any state (``decode``: ``generate``,
``stream``, CUDA graphs), how each token is chosen from the logits (``sampling``: ``SamplingConfig``, the seeded
draw) and the fused Mamba-1 decode step (``fused_decode``)."""

from .decode import GenerationOutput, TokenStream, clear_graph_cache, generate, stream
from .sampling import SamplingConfig, step_seed

__all__ = ["GenerationOutput", "SamplingConfig", "TokenStream", "generate", "stream", "clear_graph_cache",
           "step_seed"]
