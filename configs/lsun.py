"""LSUN bedroom 256x256, guided-diffusion's unconditional recipe (lsun_bedroom.pt): 256 channels, 2
res blocks, attention at 32, 16, 8 with 64-channel heads, BigGAN up/down, scale-shift norm, dropout
0.1, learned sigmas, linear schedule of 1000 steps, bfloat16 compute on accelerators, lr 1e-4,
batch 256, EMA 0.9999. Data: tfds "lsun/bedroom" prepared as array_record, or an image folder
(--config.data.source=folder --config.data.path=DIR).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="tfds:lsun/bedroom", path="", image_size=256, channels=3,
                  resize="center_crop", random_flip=True, seed=0)
    c.model = dict(model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                   attention_resolutions=(32, 16, 8), num_head_channels=64,
                   use_scale_shift_norm=True, resblock_updown=True, dropout=0.1)
    c.diffusion = dict(beta_schedule="linear", num_steps=1000, variance="learned_range",
                       loss="hybrid")
    c.conditioning = {}
    c.train = dict(task="diffusion", batch_size=256, total_steps=500_000,
                   ema_rates=(0.9999,), ema_warmup=False, compute_dtype="auto", remat=False,
                   schedule_sampler="uniform", seed=0)
    c.optim = dict(lr=1e-4, weight_decay=0.0, grad_clip=0.0)
    c.checkpoint = dict(every=5_000, keep=3, keep_every=50_000)
    c.eval = dict(per_class=4, rows=4, sampler="ddim", respacing="ddim50", bpd_images=0)
    c.log_every = 100
    c.init_from = ""
    return c
