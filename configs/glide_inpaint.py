"""GLIDE inpainting fine-tuning (Nichol et al. 2021, sec. 4.3): the text2im base model gets four
more input channels (the masked image and the mask) whose weights start at ZERO, so training
starts from exactly the base model; random regions of the training images are erased
(diffjax.conditioning.random_inpaint_masks) and the model sees the rest through those channels.

    python -m diffjax convert --preset base --pt base.pt --out ckpt/glide_base
    python -m diffjax train --config configs/glide_inpaint.py --workdir runs/glide_inpaint \
        --config.init_from=ckpt/glide_base --config.data.path=DIR \
        --config.data.tokenizer=/path/to/glide_text2im/tokenizer

Without init_from a model is trained from scratch with the glide_text2im sizes.
"""
import importlib.util
import pathlib


def _base():
    spec = importlib.util.spec_from_file_location(
        "_glide_text2im_config", pathlib.Path(__file__).with_name("glide_text2im.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(size: str = "filtered"):
    c = _base().get_config(size)
    c.conditioning = {"text": dict(dropout=0.2), "inpaint": {}}
    c.train.update(total_steps=100_000, batch_size=256)
    c.optim.update(lr=3e-5, warmup_steps=500)
    return c
