"""Fine-tuning: a training run's initial parameters from a loaded model (`init_from`).

When the run's conditioning needs another network class than the loaded model's (GLIDE's
text2im -> inpainting, upsampler -> inpainting upsampler), the weights are carried over and the
new input channels start at zero, so the new model computes exactly the old function until
training moves them (GLIDE paper, sec. 4).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffjax.models.registry import build_network


def _is_inpaint(module) -> bool:
    return bool(getattr(type(module), "_inpaint", False))


def input_layout(module) -> list[tuple[str, int]]:
    """The (name, channels) blocks a GLIDE model concatenates before its first convolution:
    x, [inpaint_image * mask, inpaint_mask], [low_res] (glide-text2im's order)."""
    c = module.in_channels
    layout = [("x", c)]
    if _is_inpaint(module):
        layout += [("inpaint_image", c), ("inpaint_mask", 1)]
    if getattr(type(module), "_super_res", False):
        layout.append(("low_res", c))
    return layout


INPUT_CONV = "input_blocks_0_0"


def with_class(module, cls):
    """The same model's sizes in another GLIDE class (e.g. Text2ImUNet -> InpaintText2ImUNet)."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return cls(**fields)


def expand_input_channels(new_module, new_params, old_module, old_params):
    """Fine-tuning initialisation (GLIDE paper, sec. 4: the inpainting model starts from the
    text2im one with the new input channels' weights zero): every parameter of `old_params` is
    copied into `new_params` (same tree), and the first convolution's kernel [3, 3, C_in, C_out]
    gets the old input blocks at their positions in the new layout (`input_layout`) and ZERO
    weights for the blocks the old model lacks (inpaint_image, inpaint_mask). The new model then
    computes exactly the old function until training moves those weights. -> new params"""
    old_layout, new_layout = input_layout(old_module), input_layout(new_module)
    missing = {n for n, _ in old_layout} - {n for n, _ in new_layout}
    if missing:
        raise ValueError(f"cannot initialise {type(new_module).__name__} from "
                         f"{type(old_module).__name__}: the new model has no {sorted(missing)} "
                         f"input")
    flat_new = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_leaves_with_path(new_params)}
    flat_old = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_leaves_with_path(old_params)}
    if set(flat_new) != set(flat_old):
        diff = sorted(set(flat_new) ^ set(flat_old))[:6]
        raise ValueError(f"the two models' parameters differ beyond the input channels ({diff}): "
                         f"build the new model with the old one's sizes")
    kernel_key = jax.tree_util.keystr((jax.tree_util.DictKey(INPUT_CONV),
                                       jax.tree_util.DictKey("kernel")))
    starts, offset = {}, 0
    for name, channels in new_layout:
        starts[name], offset = offset, offset + channels

    def merge(path, new):
        key = jax.tree_util.keystr(path)
        old = flat_old[key]
        if key != kernel_key:
            if old.shape != new.shape:
                raise ValueError(f"parameter {key}: {old.shape} in the old model, {new.shape} "
                                 f"in the new one: build the new model with the old one's sizes")
            return jnp.asarray(old, jnp.float32)
        kernel = jnp.zeros(new.shape, jnp.float32)
        src = 0
        for name, channels in old_layout:
            block = old[:, :, src:src + channels]
            kernel = kernel.at[:, :, starts[name]:starts[name] + channels].set(block)
            src += channels
        return kernel

    return jax.tree_util.tree_map_with_path(merge, new_params)


def initial_params(module, init_model):
    """The parameters `module` starts from: `init_model`'s (its selected weights), expanded with
    zero input channels when `module` is another class of the same network."""
    params = init_model.params
    loaded = build_network(init_model.network)
    if type(loaded) is type(module):
        return params
    args, kwargs = module.example_inputs(1)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    return expand_input_channels(module, shapes, loaded, params)
