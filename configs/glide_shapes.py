"""A tiny GLIDE on synthetic captioned shapes ("red square", "blue circle", ...; data.source
"shapes", made on the fly) with the byte-level tokenizer: the whole text-to-image recipe - text
transformer, caption dropout, classifier-free guidance - with no download, in minutes on a CPU.

    python -m diffjax train --config configs/glide_shapes.py --workdir runs/glide_shapes

Samples of eval.prompts with guidance scale 3 go to workdir/samples.png. tests/test_glide_train.py
trains this recipe (smaller) and checks that guidance makes the samples follow their prompts.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="shapes", image_size=32, channels=3, resize="pad", random_flip=True,
                  seed=0, captions="caption", tokenizer="bytes", text_ctx=16)
    # The text-conditional UNet's own fields (attention_resolutions are resolutions).
    c.model = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), num_heads=1,
                   num_head_channels=-1, attention_resolutions=(8,), dropout=0.0, xf_width=64,
                   xf_layers=2, xf_heads=4, xf_final_ln=True, xf_padding=True,
                   use_scale_shift_norm=True, resblock_updown=False)
    c.diffusion = dict(beta_schedule="cosine", num_steps=1000, variance="learned_range",
                       loss="hybrid")
    c.conditioning = {"text": dict(dropout=0.2)}
    c.train = dict(task="diffusion", batch_size=16,
                   total_steps=1500, ema_rates=(0.9999,), ema_warmup=True, compute_dtype="auto",
                   seed=0)
    c.optim = dict(lr=1e-3, warmup_steps=50, schedule="cosine", end_factor=0.05, grad_clip=1.0)
    c.checkpoint = dict(every=500, keep=2)
    c.eval = dict(per_class=8, sampler="ddpm", respacing="50", guidance_scale=3.0, bpd_images=0,
                  prompts=("red square", "green circle", "blue square", "red circle"))
    c.log_every = 50
    c.init_from = ""
    return c
