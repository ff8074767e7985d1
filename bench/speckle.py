"""Where the speckle of few-step samples comes from (issue 18, part 4): one model, one set of labels
and one PRNG key, sampled by variants that each change one thing (the sampler's stochasticity,
clipping of the predicted x0, classifier-free guidance, the number of steps), scored by the
speckle measure of bench/steps_quality.py (the energy left after a 3x3 box blur) against real
test images, and drawn as one grid (a row per variant).

    python bench/speckle.py --model runs/default/model [--per-class 8] [--out bench/results]

Writes OUT/speckle.json ({variant: {"high_frequency": h, "seconds": s}, "real_test_images": h})
and OUT/speckle_grid.png; prints a table, and last the line `speckle: ddim50 <h> ddpm40 <h> real <h>`.
"""
from __future__ import annotations

from diffjax import cpu_flags

if __name__ == "__main__":
    cpu_flags.use()  # before JAX starts: sampling's CPU default

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from steps_quality import high_frequency  # noqa: E402

import diffjax  # noqa: E402
from diffjax import data as data_lib  # noqa: E402
from diffjax.conditioning import ClassLabel  # noqa: E402
from diffjax import images as images_lib  # noqa: E402
from diffjax.pipelines.evaluation import classifier as C  # noqa: E402

# name -> diffjax.sample arguments; each differs from "ddim50" or "ddpm40" in one setting.
VARIANTS = {
    "ddpm40": dict(sampler="ddpm", steps=40),  # the default job's grid: ancestral, learned variance
    "ddpm40_no_guidance": dict(sampler="ddpm", steps=40, guidance_scale=1.0),
    "ddim50": dict(sampler="ddim", steps=50),
    "ddim50_eta1": dict(sampler="ddim", steps=50, eta=1.0),
    "ddim50_no_clip": dict(sampler="ddim", steps=50, clip_denoised=False),
    "ddim50_no_guidance": dict(sampler="ddim", steps=50, guidance_scale=1.0),
    "ddim10": dict(sampler="ddim", steps=10),
    "ddim200": dict(sampler="ddim", steps=200),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a saved model (a training run's model/)")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=2.0, help="as the default job's grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    model = diffjax.load(args.model)
    classes = model.conditioning.get(ClassLabel).num_classes
    labels = np.repeat(np.arange(classes), args.per_class)
    key = jax.random.PRNGKey(args.seed)
    results, rows = {}, []
    for name, kwargs in VARIANTS.items():
        kwargs = {"guidance_scale": args.guidance_scale, **kwargs}
        start = time.perf_counter()
        images = np.asarray(diffjax.sample(model, key, len(labels), labels=labels, **kwargs))
        results[name] = {"high_frequency": high_frequency(images),
                         "seconds": time.perf_counter() - start, "settings": kwargs}
        rows.append(images[:: args.per_class][:classes])  # one image per class
        print(f"{name:<22} speckle {results[name]['high_frequency']:.5f}  "
              f"({results[name]['seconds']:.1f} s)", flush=True)
    data = data_lib.DataConfig(source="fashion_mnist", image_size=model.image_shape[0],
                               channels=model.image_shape[2], resize="pad")
    real, _ = C.real_images(data, "test", len(labels), args.seed)
    results["real_test_images"] = high_frequency(real)
    print(f"{'real test images':<22} speckle {results['real_test_images']:.5f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speckle.json").write_text(json.dumps(results, indent=1) + "\n")
    names = list(VARIANTS) + ["real test images"]
    grid = images_lib.grid(np.concatenate(rows + [real[:classes]]), classes, scale=3,
                           row_labels=names)
    grid.save(out / "speckle_grid.png")
    print(f"speckle: ddim50 {results['ddim50']['high_frequency']:.5f} ddpm40 "
          f"{results['ddpm40']['high_frequency']:.5f} real {results['real_test_images']:.5f}")


if __name__ == "__main__":
    main()
