"""The fused Mamba-1 decode step's kernels (conv window step, SSM step); the model-level loop that calls them is
:class:`mamba_state.generation.fused_decode.FusedDecoder`."""

from .launcher import conv_step, ssm_step

__all__ = ["conv_step", "ssm_step"]
