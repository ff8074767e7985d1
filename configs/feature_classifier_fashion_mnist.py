"""The evaluation classifier of the bundled default: a small CNN trained on clean Fashion-MNIST
(32x32, padded with black as the default's data), whose 128 penultimate features give a Fréchet
distance and whose predictions give the accuracy of class-conditional samples (the offline
stand-in for FID; see diffjax/evaluate/classifier.py). Not a guidance classifier: that one is
noise-conditioned (configs/classifier_fashion_mnist.py).

    python -m diffjax feature-classifier --config configs/feature_classifier_fashion_mnist.py \
        --workdir runs/fmnist_classifier
    python -m diffjax evaluate --classifier runs/fmnist_classifier --samples samples.npz

1.6 epochs (1500 steps of 64 images with flips, AdamW, cosine decay): ~0.2 s a step on a
busy 2-core CPU.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # The default's data: the same padding, so that its samples are scored as they are written.
    c.data = dict(source="fashion_mnist", path="", image_size=32, channels=1, resize="pad",
                  random_flip=True, seed=0)
    c.model = dict(widths=(16, 32, 64), features=128)
    c.train = dict(num_classes=10, batch_size=64, total_steps=1500, test_images=10000,
                   log_every=250, seed=0)
    c.optim = dict(lr=2e-3, warmup_steps=50, schedule="cosine", end_factor=0.0,
                   weight_decay=1e-4, grad_clip=0.0)
    return c
