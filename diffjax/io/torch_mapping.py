"""PyTorch state dicts <-> Flax variables: the one mapping, derived from the module itself.

A Flax parameter path spells the PyTorch module path with `_` before each index
(`('input_blocks_1_0', 'in_layers_2', 'kernel')` is `input_blocks.1.0.in_layers.2.weight`), and
`_LEAVES` gives the PyTorch name and axis permutation of each parameter kind. Both directions and
the shape listing are derived from `_param_layout`, an abstract init of the module (nothing is
allocated). Models whose PyTorch names the rule cannot spell list regex `torch_key_renames`;
models whose state_dict() order differs from Flax's creation order give a `torch_key_rank`.

* `load_state_dict(module, state_dict_or_path)`: PyTorch state dict (or a .pt path, read by
  `diffjax.io.torch_pt` without torch) -> Flax variables, strict.
* `state_dict_shapes(module)`: PyTorch key -> shape, in state_dict() order, without allocating.
* `variables_to_state_dict(module, variables)`: Flax variables -> PyTorch state dict.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.io.torch_pt import open_pt


# (Flax leaf name, ndim) -> (PyTorch leaf name, permutation taking the Flax array to PyTorch's).
_LEAVES = {
    ("kernel", 4): ("weight", (3, 2, 0, 1)),   # Conv2d: HWIO -> OIHW
    ("kernel", 3): ("weight", (2, 1, 0)),      # 1x1 Conv1d (qkv, proj_out, ...): [1, I, O] -> [O, I, 1]
    ("kernel", 2): ("weight", (1, 0)),         # Linear: [in, out] -> [out, in]
    ("bias", 1): ("bias", (0,)),
    ("scale", 1): ("weight", (0,)),            # GroupNorm
    ("embedding", 2): ("weight", (0, 1)),      # nn.Embedding, same layout
    ("positional_embedding", 2): ("positional_embedding", (0, 1)),  # AttentionPool2d [C, HW+1]
    ("padding_embedding", 2): ("padding_embedding", (0, 1)),        # GLIDE text [ctx, width]
}


class _Param(NamedTuple):
    key: str                    # PyTorch state-dict key
    path: tuple[str, ...]       # path in variables["params"]
    perm: tuple[int, ...]       # Flax -> PyTorch axes
    torch_shape: tuple[int, ...]


def _torch_key(path: tuple[str, ...], leaf_shape: tuple[int, ...],
               leaves: Mapping = _LEAVES) -> tuple[str, tuple[int, ...]]:
    name, perm = leaves[(path[-1], len(leaf_shape))]
    modules = [re.sub(r"_(\d+)", r".\1", p) for p in path[:-1]]
    return ".".join(modules + [name]), perm


def _param_layout(module) -> list[_Param]:
    """Every parameter of `module`, in PyTorch state_dict() order, from an abstract init.

    The modules create their parameters in PyTorch's registration order, and Flax keeps creation
    order inside `init` (jax.eval_shape's output would be key-sorted, so the order is read while
    tracing). Rematerialisation does not change parameters, so it is switched off here.
    """
    if not hasattr(module, "example_inputs"):
        raise ValueError(f"expected a diffjax UNetModel / SuperResModel / EncoderUNetModel (or a "
                         f"GLIDE model or noised-CLIP encoder), got "
                         f"{type(module).__name__}")
    no_remat = {"use_checkpoint": False} if hasattr(module, "use_checkpoint") else {}
    plain = module.clone(parent=None, **no_remat)
    args, kwargs = plain.example_inputs(1)
    # Models whose parameters are not named as the ADM ones (glide's CLIP: Affine `w`, LayerNorm
    # `g`) give their own (leaf name, ndim) entries on top of _LEAVES.
    leaves = {**_LEAVES, **getattr(plain, "torch_leaves", {})}
    layout: list[_Param] = []

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, path + (k,))
            else:
                key, perm = _torch_key(path + (k,), v.shape, leaves)
                layout.append(_Param(key, path + (k,), perm, tuple(v.shape[i] for i in perm)))

    def init():
        variables = plain.init(jax.random.key(0), *args, **kwargs)
        walk(variables["params"], ())
        return variables

    jax.eval_shape(init)
    # Models whose PyTorch names the `_<index>` rule cannot spell (GLIDE's `ln_1`) list regex
    # renames; models whose state_dict() order differs from Flax's creation order give a sort key.
    renames = getattr(plain, "torch_key_renames", ())
    if renames:
        def rename(key):
            for pattern, repl in renames:
                key = re.sub(pattern, repl, key)
            return key
        layout = [p._replace(key=rename(p.key)) for p in layout]
    rank = getattr(plain, "torch_key_rank", None)
    if rank is not None:
        layout = sorted(layout, key=lambda p: rank(p.key))  # stable: ties keep creation order
    return layout


def state_dict_shapes(module) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> PyTorch shape for every parameter, in state_dict() order. Allocates nothing."""
    return {p.key: p.torch_shape for p in _param_layout(module)}


def _shape_str(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, if the caller has torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_state_dict(module, state_dict_or_path, *, dtype=jnp.float32) -> dict:
    """PyTorch state dict (mapping key -> array, or a .pt path) -> Flax variables {"params": ...}.

    Strict: missing keys, unexpected keys and shape mismatches are collected and raised together in
    one ValueError. Each value of the mapping is read exactly once and converted right away, so a
    lazy mapping that loads tensors on access keeps peak memory near one copy of the weights.
    Parameters are cast to `dtype` (float32 unless asked otherwise). A path is streamed through
    `diffjax.io.torch_pt.open_pt` (no torch, no pickled code executed, one tensor in
    memory at a time besides the result).
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        with open_pt(state_dict_or_path) as lazy:
            return load_state_dict(module, lazy, dtype=dtype)
    state_dict = state_dict_or_path
    layout = _param_layout(module)
    expected = {p.key for p in layout}
    given = list(state_dict.keys())
    given_set = set(given)
    unexpected = [k for k in given if k not in expected]
    missing, mismatched = [], []
    params: dict[str, Any] = {}
    for p in layout:
        if p.key not in given_set:
            missing.append(f"{p.key} {_shape_str(p.torch_shape)}")
            continue
        array = _to_numpy(state_dict[p.key])
        if tuple(array.shape) != p.torch_shape:
            mismatched.append(f"{p.key}: checkpoint {_shape_str(array.shape)}, model "
                              f"{_shape_str(p.torch_shape)}")
            continue
        node = params
        for name in p.path[:-1]:
            node = node.setdefault(name, {})
        # jnp.array copies: the result never aliases the reader's buffers.
        node[p.path[-1]] = jnp.array(np.transpose(array, np.argsort(p.perm)), dtype=dtype)
        del array
    if missing or unexpected or mismatched:
        lines = [f"state dict does not match {type(module).__name__}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensor(s) (check the "
                 f"model flags: they must be those the checkpoint was trained with)"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  unexpected: {u}" for u in unexpected]
        lines += [f"  shape mismatch: {s}" for s in mismatched]
        raise ValueError("\n".join(lines))
    return {"params": params}


def variables_to_state_dict(module, variables) -> dict[str, np.ndarray]:
    """Flax variables (or their "params") -> PyTorch state dict: numpy arrays in PyTorch layout
    (OIHW convs, [out, in] linears) and state_dict() order, in the parameters' dtype."""
    params = variables["params"] if "params" in variables else variables
    out = {}
    for p in _param_layout(module):
        node = params
        for name in p.path:
            node = node[name]
        out[p.key] = np.ascontiguousarray(np.transpose(np.asarray(node), p.perm))
    return out
