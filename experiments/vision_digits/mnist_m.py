"""Domain shift on images: the textbooks' MNIST -> MNIST-M setup, built from scikit-learn's digits.

Source domain: grey digits (all ten classes). Target domain: other digits,
blended onto random colour patches as MNIST-M does
(``peftjax.data.digits.colour_blend``, construction seed ``DOMAIN_SEED``: each
patch a 4x4 grid of uniform random RGB colours upsampled to 32x32 plus pixel
noise, written ``|patch - digit|`` per channel). The images are split once:
30 per digit held out as the test set (scored in both domains), the rest
halved per digit into disjoint source and target pools, so no digit image
appears in both domains.

Arms, each a small ResNet trained from scratch, 3 seeds:

* ``source_only``: trained on the labelled source pool alone;
* ``target_supervised``: trained on the labelled target pool (the upper bound).

DANN and MMD are not run here: see this folder's README.

    nice -n 10 python experiments/vision_digits/mnist_m.py --out experiments/vision_digits/mnist_m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import optax
from flax import nnx

import peftjax
from peftjax import models
from peftjax.data.digits import colour_blend, load_digits

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from run import BATCH, IMAGE_SIZE, NETWORK, Trainer, accuracy, normalise, split_per_class  # noqa: E402

DOMAIN_SEED = 0
TEST_PER_CLASS = 30
SEEDS = (0, 1, 2)
STEPS, LEARNING_RATE = 400, 3e-3
ARMS = ("source_only", "target_supervised")


def domains() -> dict[str, np.ndarray]:
    images, labels = load_digits(image_size=IMAGE_SIZE)
    test, pool = split_per_class(labels, TEST_PER_CLASS, seed=1234)
    rng = np.random.default_rng(DOMAIN_SEED)
    halves = [rng.permutation(pool[labels[pool] == c]) for c in range(10)]
    source = np.sort(np.concatenate([h[: len(h) // 2] for h in halves]))
    target = np.sort(np.concatenate([h[len(h) // 2:] for h in halves]))
    coloured = colour_blend(images, seed=DOMAIN_SEED)
    return {
        "source_x": normalise(images[source]), "source_y": labels[source],
        "target_x": normalise(coloured[target]), "target_y": labels[target],
        "source_test_x": normalise(images[test]), "target_test_x": normalise(coloured[test]), "test_y": labels[test],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for results.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args()
    started = time.time()
    data = domains()
    network = dataclasses.replace(NETWORK, num_labels=10)
    trainer = Trainer()
    rows = []
    for seed in args.seeds:
        for arm in ARMS:
            began = time.time()
            pool = "source" if arm == "source_only" else "target"
            model = models.from_config(network, task="image-classification", rngs=nnx.Rngs(seed))
            tx = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, STEPS), weight_decay=1e-4)
            optimizer = peftjax.make_optimizer(model, tx, rules=[(nnx.Param, "trainable")])
            model, loss = trainer.fit("scratch", model,  # both arms: one compiled step
                                       optimizer, data[f"{pool}_x"], data[f"{pool}_y"], STEPS, seed)
            row = {"arm": arm, "seed": seed, "train_images": len(data[f"{pool}_y"]),
                   "target_test_accuracy": accuracy(model, data["target_test_x"], data["test_y"]),
                   "source_test_accuracy": accuracy(model, data["source_test_x"], data["test_y"]),
                   "final_loss": loss, "seconds": round(time.time() - began, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {"image_size": IMAGE_SIZE, "network": network.to_hf_dict(), "batch": BATCH, "steps": STEPS,
             "learning_rate": LEARNING_RATE, "domain_seed": DOMAIN_SEED, "test_per_class": TEST_PER_CLASS,
             "test_images": len(data["test_y"])}
    result = {"setup": setup, "runs": rows, "wall_seconds": round(time.time() - started, 1)}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'results.json'} ({result['wall_seconds']} s)")


if __name__ == "__main__":
    main()
