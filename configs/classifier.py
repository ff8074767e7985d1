"""guided-diffusion's noisy ImageNet-64 classifier (scripts/classifier_train.py with the README's
flags for the 64x64 model): width 128, depth 4, attention at 32, 16, 8, attention pooling,
BigGAN up/down, scale-shift norm; inputs noised at t ~ U{0..999} of the cosine schedule; AdamW lr
3e-4 annealed linearly to 0, weight decay 0.05, batch 256, 300K iterations. Data: an ImageNet
folder in GD's layout, --config.data.path=/path/to/train.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="folder", path="", image_size=64, channels=3, resize="center_crop",
                  random_flip=True, seed=0)
    c.model = dict(model_channels=128, num_res_blocks=4, channel_mult=(1, 2, 3, 4),
                   attention_resolutions=(32, 16, 8), num_head_channels=64,
                   use_scale_shift_norm=True, resblock_updown=True, pool="attention")
    c.diffusion = dict(beta_schedule="cosine", num_steps=1000, variance="learned_range")
    c.conditioning = {"class": dict(num_classes=1000)}  # the labels it predicts
    c.train = dict(task="classifier", batch_size=256, total_steps=300_000,
                   ema_rates=(), compute_dtype="auto", schedule_sampler="uniform", seed=0)
    c.optim = dict(lr=3e-4, weight_decay=0.05, schedule="linear", end_factor=0.0, grad_clip=0.0)
    c.checkpoint = dict(every=10_000, keep=3)
    c.eval = dict(per_class=0)
    c.log_every = 100
    c.init_from = ""
    return c
