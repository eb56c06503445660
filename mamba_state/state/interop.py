"""Reading and writing the state that upstream keeps in ``InferenceParams.key_value_memory_dict``.

Upstream stores ``key_value_memory_dict[layer_idx] = (conv_state, ssm_state)`` for every Mamba / Mamba2 layer and
``(angle_dt_state, ssm_state, k_state, v_state)`` for every Mamba3 layer, allocated on first use by the layer's
``_get_states_from_cache`` (Mamba3: angle and SSM states in float32, the key and value states in the parameters'
dtype). These functions never add methods to upstream classes:
they take the layer (or model) and the ``InferenceParams`` and validate everything before writing anything.

transformers models keep their state in their own cache objects, which these functions do not read: given one
(or a transformers model), they raise ``StateCompatibilityError`` naming what they accept and pointing at
``StatefulMambaLM.from_hf``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateCompatibilityError, StateError, StateShapeError
from .containers import MambaInferenceState, MambaModelState
from .layers import FAMILY_TENSORS, find_mamba_layers, layer_layout

__all__ = [
    "get_inference_state", "set_inference_state", "zero_inference_state",
    "get_model_state", "set_model_state", "zero_model_state",
]


def _from_transformers(obj: Any) -> bool:
    """A transformers object (model, layer or cache), told by its class's module: transformers is never imported."""
    return type(obj).__module__.split(".")[0] == "transformers"


def _refuse_transformers(fn: str, module: Any, inference_params: Any, layer: bool = False) -> None:
    """Name what ``fn`` accepts, and where transformers models go, when given a transformers model or cache.

    transformers keeps its own cache (``MambaCache``, or ``DynamicCache`` in transformers 5) in its own layout,
    which these functions do not read; without this check the call fails later with a message about missing Mamba
    layers or ``key_value_memory_dict``."""
    args = (("layer" if layer else "model", module), ("inference_params", inference_params))
    found = [f"{name} a transformers {type(obj).__name__}" for name, obj in args if _from_transformers(obj)]
    if not found:
        return
    if layer:
        accepts = ("an upstream Mamba, Mamba2 or Mamba3 layer (or a StatefulMamba / StatefulMamba2 / "
                   "StatefulMamba3) with upstream's InferenceParams")
        hint = ("for a transformers MambaMixer use layer = ms.StatefulMamba(mixer), which shares its parameters and "
                "takes and returns the state: y, state = layer(x, state)")
    else:
        accepts = ("an upstream mamba_ssm model (MambaLMHeadModel, or any module holding Mamba / Mamba2 layers, "
                   "StatefulMambaLM included) with upstream's InferenceParams (mamba_ssm.utils.generation)")
        hint = ("for a transformers MambaForCausalLM use lm = StatefulMambaLM.from_hf(hf_model), which shares its "
                "modules and takes and returns the state: logits, state = lm(input_ids, state) (see "
                "docs/howto-pretrained.md)")
    raise StateCompatibilityError(f"{fn}: expected {accepts}, found {' and '.join(found)}; {hint}")


def _cache_dict(inference_params: Any) -> dict:
    d = getattr(inference_params, "key_value_memory_dict", None)
    if not isinstance(d, dict):
        raise StateError(
            "inference_params: expected an object with a dict key_value_memory_dict (upstream InferenceParams), "
            f"found {type(inference_params).__name__}"
        )
    return d


def _layer_info(layer: Any) -> tuple[int, dict[str, Any]]:
    layout = layer_layout(layer)
    if layout is None:
        raise StateCompatibilityError(f"layer: expected a Mamba, Mamba2 or Mamba3 layer, found "
                                      f"{type(layer).__name__}")
    idx = getattr(layer, "layer_idx", None)
    if not isinstance(idx, int):
        raise StateCompatibilityError(f"layer: expected an int layer_idx (upstream needs it for caching), found "
                                      f"{idx!r}")
    return idx, layout


def _names(layout: dict[str, Any]) -> tuple[str, ...]:
    """The tensor names of a layer's cache entry, in upstream's order (its family's)."""
    return FAMILY_TENSORS[layout["kind"]]


def _cached_pair(cache: dict, idx: int, names: tuple[str, ...] = FAMILY_TENSORS["mamba1"]
                 ) -> tuple[torch.Tensor, ...] | None:
    """The cached tensors of layer ``idx`` (``names``: the family's; a pair for Mamba-1/2), or None."""
    entry = cache.get(idx)
    if entry is None:
        return None
    if not (isinstance(entry, (tuple, list)) and len(entry) == len(names)
            and all(isinstance(t, torch.Tensor) for t in entry)):
        found = (f"a {type(entry).__name__} of {len(entry)}" if isinstance(entry, (tuple, list))
                 else type(entry).__name__)
        what = "pair" if len(names) == 2 else "tuple"
        raise StateCompatibilityError(
            f"inference cache of layer {idx}: expected a ({', '.join(names)}) {what}, found {found}"
        )
    return tuple(entry)


def _check_fits(idx: int, layout: dict[str, Any], state: Any, cache: dict) -> None:
    if not isinstance(state, MambaInferenceState):
        raise StateError(f"layer {idx}: expected a MambaInferenceState, found {type(state).__name__}")
    if state.device.type == "meta":  # caught here, not half way through writing the layers
        raise StateError(f"layer {idx}: expected a state with data (any real device), found a {state.device} state")
    got = state.layout()
    for key in ["kind"] + [k for k in layout if k != "kind"]:  # the kind first: other families, other keys
        if got.get(key) != layout[key]:
            raise StateCompatibilityError(f"layer {idx} {key}: expected {layout[key]} (layer), found {got.get(key)} "
                                          "(state)")
    names = _names(layout)
    pair = _cached_pair(cache, idx, names)
    _check_dtypes(idx, state, pair)
    _check_writable(idx, pair, names)
    if pair is None:
        return
    ssm_pos = names.index("ssm_state")
    if pair[ssm_pos].shape[0] != state.batch_size:
        raise StateShapeError(
            f"layer {idx}: expected batch size {pair[ssm_pos].shape[0]} (the existing cache), found "
            f"{state.batch_size}; use a fresh InferenceParams for another batch size"
        )
    # a cache made by hand can disagree with its layer; caught before any layer is written
    for name, t in zip(names, pair):
        want = state.tensors[name]
        if t.shape != want.shape:
            raise StateShapeError(f"layer {idx} cached {name}: expected {list(want.shape)} (the layer's layout), "
                                  f"found {list(t.shape)} in the existing cache")


def _check_writable(idx: int, pair: tuple[torch.Tensor, ...] | None,
                    names: tuple[str, ...] = FAMILY_TENSORS["mamba1"]) -> None:
    """Refuse, before anything is written, a cache tensor that ``copy_`` cannot write: an inference tensor outside
    inference mode, or one whose elements share memory (a stride-0 view such as ``expand``'s: the overlap
    ``copy_`` itself refuses)."""
    if pair is None:
        return
    for name, t in zip(names, pair):
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise StateCompatibilityError(
                f"inference cache of layer {idx} {name}: expected a tensor that can be written in place, found an "
                "inference tensor (made under torch.inference_mode; write it inside inference_mode, or use a fresh "
                "InferenceParams)")
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise StateCompatibilityError(
                f"inference cache of layer {idx} {name}: expected a tensor that can be written in place, found one "
                f"whose elements share memory (strides {list(t.stride())} for shape {list(t.shape)}, as expand() "
                "makes)")


def _check_dtypes(idx: int, state: MambaInferenceState, pair: tuple[torch.Tensor, ...] | None) -> None:
    """Every tensor real floating (complex, integer and bool are refused: ``copy_`` would drop parts of them), and
    so is an existing cache. Floating dtypes may differ: ``_write`` casts into the cache's dtype like ``copy_``."""
    for k, (name, t) in enumerate(state.tensors.items()):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():  # is_floating_point is False for complex
            found = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise StateCompatibilityError(
                f"layer {idx} {name} dtype: expected a real floating dtype (cast into the cache's "
                f"{pair[k].dtype if pair is not None else 'dtype'}), found {found}"
            )
        if pair is not None and not pair[k].is_floating_point():
            raise StateCompatibilityError(
                f"inference cache of layer {idx} {name} dtype: expected a real floating dtype, found {pair[k].dtype}"
            )


def _allocate(layer: Any, batch_size: int) -> tuple[torch.Tensor, ...]:
    """A zero cache as upstream's ``_get_states_from_cache`` makes it (devices, dtypes and strides)."""
    mod = layer  # upstream layers and our adapters both expose conv1d / dt_proj / in_proj
    layout = layer_layout(layer)
    assert layout is not None
    if layout["kind"] == "mamba3":  # angle and SSM states in float32, key and value in the parameters' dtype
        w = mod.in_proj.weight
        f32 = {"device": w.device, "dtype": torch.float32}
        return (torch.zeros(batch_size, *layout["angle_shape"], **f32),
                torch.zeros(batch_size, *layout["ssm_shape"], **f32),
                torch.zeros(batch_size, *layout["k_shape"], device=w.device, dtype=w.dtype),
                torch.zeros(batch_size, *layout["v_shape"], device=w.device, dtype=w.dtype))
    channels, width = layout["conv_shape"]
    conv_w = mod.conv1d.weight
    if layout["kind"] == "mamba1":
        conv = torch.zeros(batch_size, channels, width, device=conv_w.device, dtype=conv_w.dtype)
        ref = mod.dt_proj.weight
    else:  # upstream Mamba2 keeps the conv state channel-last in memory
        conv = torch.zeros(batch_size, width, channels, device=conv_w.device, dtype=conv_w.dtype).transpose(1, 2)
        ref = mod.in_proj.weight
    ssm = torch.zeros(batch_size, *layout["ssm_shape"], device=ref.device, dtype=ref.dtype)
    return conv, ssm


def _write(layer: Any, idx: int, state: MambaInferenceState, cache: dict) -> None:
    pair = _cached_pair(cache, idx, state.tensor_names)
    if pair is None:
        pair = _allocate(layer, state.batch_size)
        cache[idx] = pair
    with torch.no_grad():
        for t, src in zip(pair, state.tensors.values()):
            t.copy_(src)


# ---------------------------------------------------------------------------------------------- one layer
def get_inference_state(layer: Any, inference_params: Any) -> MambaInferenceState | None:
    """A detached clone of ``layer``'s cached state, or ``None`` when upstream has not cached it yet."""
    _refuse_transformers("get_inference_state", layer, inference_params, layer=True)
    idx, layout = _layer_info(layer)
    names = _names(layout)
    pair = _cached_pair(_cache_dict(inference_params), idx, names)
    if pair is None:
        return None
    return MambaInferenceState.from_tensors({n: t.detach().clone() for n, t in zip(names, pair)})


def set_inference_state(layer: Any, state: MambaInferenceState, inference_params: Any) -> None:
    """Validate ``state`` against ``layer``, then copy it into the cache in place (allocating it if missing).

    Shapes must match exactly. Dtypes may differ: both tensors must be real floating point (complex, integer or bool
    tensors raise ``StateCompatibilityError`` naming expected and found, before anything is written), and they are
    cast into the cache's dtype the way ``Tensor.copy_`` casts. The cache keeps upstream's dtype (the layer's
    parameter dtype when it is allocated here): a float32 state written into a bfloat16 model's cache is rounded to
    bfloat16, and a narrowing cast turns values out of the target's range into ``inf``.
    """
    _refuse_transformers("set_inference_state", layer, inference_params, layer=True)
    idx, layout = _layer_info(layer)
    cache = _cache_dict(inference_params)
    _check_fits(idx, layout, state, cache)
    _write(layer, idx, state, cache)


def zero_inference_state(layer: Any, inference_params: Any) -> None:
    """Zero ``layer``'s cached state in place (nothing to do when none is cached)."""
    _refuse_transformers("zero_inference_state", layer, inference_params, layer=True)
    idx, layout = _layer_info(layer)
    pair = _cached_pair(_cache_dict(inference_params), idx, _names(layout))
    if pair is not None:
        for t in pair:
            t.zero_()


# ---------------------------------------------------------------------------------------------- whole model
def get_model_state(model: Any, inference_params: Any) -> MambaModelState | None:
    """Detached clones of every Mamba layer's cache, with ``seqlen_offset``, in the cache's dtypes.

    ``model``: an upstream ``MambaLMHeadModel`` (or any module holding upstream Mamba / Mamba2 layers, a
    :class:`StatefulMambaLM` included); ``inference_params``: upstream's ``InferenceParams``. A transformers model
    or cache (``MambaForCausalLM``, ``MambaCache``, ``DynamicCache``) raises ``StateCompatibilityError`` saying so:
    wrap a transformers model with ``StatefulMambaLM.from_hf``, whose forward returns the state.

    Returns ``None`` when no Mamba layer of ``model`` has a cache in ``inference_params`` yet (a fresh
    ``InferenceParams``, before the first forward or :func:`set_model_state`). Raises
    ``StateCompatibilityError`` when only some layers have a cache (an interrupted forward).
    """
    _refuse_transformers("get_model_state", model, inference_params)
    layers = find_mamba_layers(model)
    _cache_dict(inference_params)  # validate before walking layers
    states = {idx: get_inference_state(layer, inference_params) for idx, layer in layers.items()}
    missing = [idx for idx, s in states.items() if s is None]
    if len(missing) == len(states):
        return None
    if missing:
        raise StateCompatibilityError(f"inference cache: expected every Mamba layer cached, found layers {missing} "
                                      "missing")
    return MambaModelState(states, seqlen_offset=int(getattr(inference_params, "seqlen_offset", 0)))  # type: ignore[arg-type]


def set_model_state(model: Any, state: MambaModelState, inference_params: Any) -> None:
    """Validate every layer first, then copy all of them in and set ``inference_params.seqlen_offset``.

    The state must cover exactly the model's Mamba layers, with exact shapes and one batch size in every tensor.
    All or nothing: every check, including that each existing cache tensor can be written in place (not an
    inference tensor outside ``torch.inference_mode``, not a stride-0 view), is done before the first copy. Dtypes
    follow
    :func:`set_inference_state`: real floating tensors are cast into the cache's dtype like ``Tensor.copy_`` (a
    float32 adapter state into a bfloat16 model's cache is rounded to bfloat16; values beyond a narrower dtype's
    range become ``inf``); a complex, integer or bool tensor in any layer raises ``StateCompatibilityError`` before
    any layer is written. Upstream continues with ``step()`` only when ``seqlen_offset > 0``; the state's own
    ``seqlen_offset`` is written (set it to the tokens consumed).
    """
    _refuse_transformers("set_model_state", model, inference_params)
    if not isinstance(state, MambaModelState):
        raise StateError(f"state: expected a MambaModelState, found {type(state).__name__}")
    layers = find_mamba_layers(model)
    cache = _cache_dict(inference_params)
    if set(layers) != set(state.layer_indices):
        raise StateCompatibilityError(
            f"state layers: expected the model's Mamba layers {sorted(layers)}, found {state.layer_indices}"
        )
    # each tensor's own batch size: the container checks its layers agree when it is built, but its layers'
    # tensors can be replaced afterwards, and a fresh cache would take whatever batch each layer brings
    sizes = {(idx, name): t.shape[0] for idx in state.layer_indices for name, t in state[idx].tensors.items()}
    if len(set(sizes.values())) != 1:
        found = ", ".join(f"layer {i} {n} {b}" for (i, n), b in sizes.items())
        raise StateShapeError(f"batch size: expected one batch size in every layer of the state, found {found}")
    max_batch = getattr(inference_params, "max_batch_size", None)
    if isinstance(max_batch, int) and state.batch_size > max_batch:
        raise StateShapeError(f"batch size: expected at most max_batch_size={max_batch}, found {state.batch_size}")
    for idx, layer in layers.items():  # validate everything before writing anything
        _check_fits(idx, _layer_info(layer)[1], state[idx], cache)
    for idx, layer in layers.items():
        _write(layer, idx, state[idx], cache)
    inference_params.seqlen_offset = state.seqlen_offset


def zero_model_state(model: Any, inference_params: Any) -> None:
    """Zero every Mamba layer's cache and set ``seqlen_offset`` to 0."""
    _refuse_transformers("zero_model_state", model, inference_params)
    layers = find_mamba_layers(model)
    for layer in layers.values():
        zero_inference_state(layer, inference_params)
    inference_params.seqlen_offset = 0
