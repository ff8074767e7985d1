"""CIFAR-10, improved DDPM's recipe (Nichol & Dhariwal 2021; improved-diffusion's README): 128
channels, 3 res blocks, attention at 16 and 8, dropout 0.3, learned sigmas (hybrid loss), cosine
schedule of 4000 steps, lr 1e-4, batch 128, EMA 0.9999, 500K steps (the released
cifar10_uncond_50M_500K.pt). Needs the tfds cifar10 dataset prepared as array_record
(`tfds build cifar10 --file_format=array_record`, once, online) or --config.data.path pointing to its
data_dir; or an image folder with --config.data.source=folder --config.data.path=DIR.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="tfds:cifar10", path="", image_size=32, channels=3, resize="center_crop",
                  random_flip=True, seed=0)
    c.model = dict(model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2),
                   attention_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True,
                   dropout=0.3)
    c.diffusion = dict(beta_schedule="cosine", num_steps=4000, variance="learned_range",
                       loss="hybrid")
    c.conditioning = {}
    c.train = dict(task="diffusion", batch_size=128, total_steps=500_000,
                   ema_rates=(0.9999,), ema_warmup=False, schedule_sampler="uniform", seed=0)
    c.optim = dict(lr=1e-4, weight_decay=0.0, grad_clip=0.0)
    c.checkpoint = dict(every=10_000, keep=3, keep_every=100_000)
    c.eval = dict(per_class=8, rows=8, sampler="ddim", respacing="ddim100", bpd_images=0)
    c.log_every = 100
    c.init_from = ""
    return c
