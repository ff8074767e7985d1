"""ImageNet 64x64 class-conditional ADM (Dhariwal & Nichol 2021, guided-diffusion's 64x64 model):
192 channels, 3 res blocks, attention at 32, 16, 8 with 64-channel heads (new order), BigGAN
up/down resblocks, scale-shift norm, dropout 0.1, learned sigmas, cosine schedule of 1000 steps,
bfloat16 compute on accelerators (GD: fp16), lr 3e-4, batch 2048, EMA 0.9999 (the paper's Table
11 / guided-diffusion's README). Data: an ImageNet folder in GD's layout (class = file-name prefix):
--config.data.path=/path/to/train. Shard parameters with --config.train.fsdp=N on big pods.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(source="folder", path="", image_size=64, channels=3, resize="center_crop",
                  random_flip=True, seed=0)
    c.model = dict(model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                   attention_resolutions=(32, 16, 8), num_head_channels=64,
                   use_new_attention_order=True, use_scale_shift_norm=True, resblock_updown=True,
                   dropout=0.1)
    c.diffusion = dict(beta_schedule="cosine", num_steps=1000, variance="learned_range",
                       loss="hybrid")
    c.conditioning = {"class": dict(num_classes=1000)}
    c.train = dict(task="diffusion", batch_size=2048,
                   total_steps=540_000, ema_rates=(0.9999,), ema_warmup=False,
                   compute_dtype="auto", fsdp=1, schedule_sampler="uniform", seed=0)
    c.optim = dict(lr=3e-4, weight_decay=0.0, grad_clip=0.0)
    c.checkpoint = dict(every=5_000, keep=3, keep_every=50_000)
    c.eval = dict(per_class=1, sampler="ddim", respacing="ddim50", bpd_images=0)
    c.log_every = 100
    c.init_from = ""
    return c
