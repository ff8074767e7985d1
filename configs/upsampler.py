"""guided-diffusion's 64 -> 256 class-conditional upsampler (the released 64_256_upsampler.pt):
192 channels, 2 res blocks, 4 heads, attention at 32, 16, 8, BigGAN up/down, scale-shift norm,
learned sigmas, linear schedule of 1000 steps; the low-resolution input is the batch
area-downsampled to 64 (GD's super_res_train); lr 1e-4, batch 256, EMA 0.9999. Data: an ImageNet
folder in GD's layout, --config.data.path=/path/to/train.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="folder", path="", image_size=256, channels=3, resize="center_crop",
                  random_flip=True, seed=0)
    c.model = dict(model_channels=192, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                   attention_resolutions=(32, 16, 8), num_heads=4, use_scale_shift_norm=True,
                   resblock_updown=True)
    c.diffusion = dict(beta_schedule="linear", num_steps=1000, variance="learned_range",
                       loss="hybrid")
    c.conditioning = {"class": dict(num_classes=1000), "low_res": dict(size=64)}
    c.train = dict(task="diffusion", batch_size=256, total_steps=500_000, ema_rates=(0.9999,), ema_warmup=False,
                   compute_dtype="auto", schedule_sampler="uniform", seed=0)
    c.optim = dict(lr=1e-4, weight_decay=0.0, grad_clip=0.0)
    c.checkpoint = dict(every=5_000, keep=3, keep_every=50_000)
    c.eval = dict(per_class=0)
    c.log_every = 100
    c.init_from = ""
    return c
