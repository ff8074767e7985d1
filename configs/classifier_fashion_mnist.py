"""A noisy Fashion-MNIST classifier for classifier guidance of the bundled default (CPU-sized):
GD's classifier_train recipe (noised inputs, AdamW with linear annealing, weight decay 0.05) on a
32-channel encoder with the default's diffusion (cosine, 1000 steps).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="fashion_mnist", path="", image_size=32, channels=1, resize="pad",
                  random_flip=True, seed=0)
    c.model = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                   attention_resolutions=(8,), num_head_channels=32,
                   use_scale_shift_norm=True, resblock_updown=True, pool="attention")
    c.diffusion = dict(beta_schedule="cosine", num_steps=1000, variance="learned_range")
    c.conditioning = {"class": dict(num_classes=10)}  # the labels it predicts
    c.train = dict(task="classifier", batch_size=64, total_steps=1000,
                   ema_rates=(), schedule_sampler="uniform", seed=0)
    c.optim = dict(lr=1e-3, weight_decay=0.05, schedule="linear", end_factor=0.0, warmup_steps=20)
    c.checkpoint = dict(every=500, keep=2)
    c.eval = dict(per_class=0)
    c.log_every = 50
    c.init_from = ""
    return c
