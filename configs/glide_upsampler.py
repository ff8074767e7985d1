"""GLIDE's text-conditional 64 -> 256 upsampler: the ADM super-resolution UNet (2 res blocks,
channel_mult 1,1,2,2,4,4) with the text transformer, on 256x256 crops whose area-downsampled,
8-bit-quantised 64x64 version is the low-resolution input; linear schedule of 1000 steps
(glide-text2im's model_and_diffusion_defaults_upsampler()). At sampling the upsampler takes the
base model's samples with GLIDE's fast27 respacing and initial noise x 0.997.

    python -m diffjax train --config configs/glide_upsampler.py --workdir runs/glide_up \
        --config.data.path=DIR --config.data.tokenizer=/path/to/glide_text2im/tokenizer

`--config.train.inpaint=True` trains the inpainting upsampler (upsample-inpaint).
"""
import importlib.util
import pathlib


def get_config(size: str = "filtered"):
    spec = importlib.util.spec_from_file_location(
        "_glide_text2im_config", pathlib.Path(__file__).with_name("glide_text2im.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(size)
    c.data.update(image_size=256)
    c.model.update(num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4))
    c.diffusion.update(beta_schedule="linear")
    # The upsampler is not guided: no caption dropout; its low-res input is the 8-bit base sample.
    c.conditioning = {"text": dict(dropout=0.0), "low_res": dict(size=64, quantize=True)}
    c.train.update(batch_size=512, total_steps=1_600_000)
    c.eval = dict(per_class=0)
    return c
