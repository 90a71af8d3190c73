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
* ``target_supervised``: trained on the labelled target pool (the upper bound);
* ``dann``, ``mmd``: the labelled source pool plus the target pool unlabelled,
  through peftjax's ``dann`` and ``mmd`` training strategies at their defaults
  (``ADAPTATION``). The target pool is written as PNGs into one class folder
  (``unlabelled``), the strategy's ``target`` data section reads it, and each
  step adds the strategy's loss term on one source and one target batch, as a
  run of ``peftjax train`` with ``strategies: [{type: dann, target: ...}]``
  does; the network trains under the ``full`` method.

Every arm shares the network's initialisation and the source batches' order per
seed, so an adapted arm differs from ``source_only`` by its loss term only.

    nice -n 10 python experiments/vision_digits/mnist_m.py --out experiments/vision_digits/mnist_m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

import peftjax
from peftjax import data as data_lib
from peftjax import models
from peftjax.config import ExperimentConfig
from peftjax.data.digits import colour_blend, load_digits
from peftjax.strategies.base import attach_modules, build_strategies, stage_optimizer, step_loss
from peftjax.strategies.target_domain import TARGET
from peftjax.train.session import MAIN, RunInfo

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from run import BATCH, IMAGE_SIZE, NETWORK, Trainer, accuracy, normalise, split_per_class  # noqa: E402

DOMAIN_SEED = 0
TEST_PER_CLASS = 30
SEEDS = (0, 1, 2)
STEPS, LEARNING_RATE, WEIGHT_DECAY = 400, 3e-3, 1e-4
# The strategies' own defaults (DANN: lambda rising to weight 1 with gamma 10, a 256-wide
# domain classifier; MMD: weight 1), set once: nothing here was tuned on target accuracy.
ADAPTATION = {"dann": {"type": "dann"}, "mmd": {"type": "mmd"}}
ARMS = ("source_only", "target_supervised", *ADAPTATION)


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
        "target_x": normalise(coloured[target]), "target_y": labels[target], "target_pixels": coloured[target],
        "source_test_x": normalise(images[test]), "target_test_x": normalise(coloured[test]), "test_y": labels[test],
    }


def unlabelled_folder(pixels_nhwc: np.ndarray, root: pathlib.Path) -> dict:
    """The target pool as 8-bit PNGs in ``root/train/unlabelled/`` (one class: no labels),
    and the data section that reads it back (normalised as ``normalise`` does)."""
    folder = root / "train" / "unlabelled"
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(pixels_nhwc):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"{index:04d}.png")
    return {"task": "image_classification", "source": str(root), "image_size": IMAGE_SIZE}


def adapted_run(arm: str, target: dict, network, seed: int) -> tuple[ExperimentConfig, nnx.Module]:
    """The experiment config of an adapted arm, and its model with the strategy's module attached."""
    strategy = {**ADAPTATION[arm], "target": target}
    config = ExperimentConfig.from_dict({
        "name": f"mnist_m_{arm}", "model": {"name": "resnet-digits", "init": "random"},
        "methods": [{"type": "full"}], "strategies": [strategy],
        "data": {"task": "image_classification", "source": "source-pool", "image_size": IMAGE_SIZE},
        "optim": {"learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "max_grad_norm": None},
        "schedule": {"decay": "cosine"}, "train": {"batch_size": BATCH, "steps": STEPS, "seed": seed},
    })
    model = models.from_config(network, task="image_classification", rngs=nnx.Rngs(seed))
    peftjax.apply(model, peftjax.registered_methods()["full"]())
    return config, model


def adapt(arm: str, target: dict, network, data: dict, seed: int, trainer: Trainer,
          steps: dict) -> tuple[nnx.Module, dict]:
    """Source batches as ``Trainer.fit`` draws them plus shuffled unlabelled target batches,
    trained on the task loss plus the strategy's term."""
    config, model = adapted_run(arm, target, network, seed)
    strategies = build_strategies(config.strategy_dicts())
    attach_modules(model, strategies, seed=seed)
    info = RunInfo(config=config, total_steps=STEPS, steps_per_epoch=len(data["source_y"]) // BATCH,
                   batch_size=BATCH)
    tx = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, STEPS), weight_decay=WEIGHT_DECAY)
    optimizer = stage_optimizer(model, tx, strategies, [0], info)
    if arm not in steps:  # the term reads the step count and the schedule's length only, the same for every seed
        steps[arm] = peftjax.make_train_step(step_loss("image_classification", strategies, info))
    state = trainer.state(arm, model, optimizer)
    unlabelled = data_lib.load_data(strategies[0].target)["train"].images
    source_order = trainer.order(len(data["source_y"]), STEPS, seed)
    target_order = np.concatenate([np.random.default_rng((seed, 8)).permutation(len(unlabelled))
                                   for _ in range(STEPS * BATCH // len(unlabelled) + 1)])
    ones = jnp.ones(BATCH, jnp.float32)
    for i in range(STEPS):
        rows, target_rows = source_order[i * BATCH:(i + 1) * BATCH], target_order[i * BATCH:(i + 1) * BATCH]
        batches = {MAIN: {"pixel_values": jnp.asarray(data["source_x"][rows]),
                          "labels": jnp.asarray(data["source_y"][rows]), "weights": ones},
                   TARGET: {"pixel_values": jnp.asarray(unlabelled[target_rows])}}
        state, metrics = steps[arm](state, batches)
    last = {"final_loss": float(metrics["loss"]),
            **{f"final_{arm}_{k}": float(v) for k, v in metrics["terms"][arm].items()}}
    return state.model(), last


@nnx.jit
def _refresh_statistics(model: nnx.Module, pixel_values_bhwc: jnp.ndarray) -> None:
    model(jnp.transpose(pixel_values_bhwc, (0, 3, 1, 2)))


def target_statistics_accuracy(model: nnx.Module, data: dict) -> float:
    """Target test accuracy after the batch norms' running statistics are re-estimated on the
    unlabelled target pool (AdaBN, Li et al. 2016): 60 training-mode passes over the pool, so
    the statistics of training (at momentum 0.1) are left with weight 0.9^60 < 0.002. Changes ``model``."""
    model.train()
    pool = jnp.asarray(data["target_x"])
    for _ in range(60):
        _refresh_statistics(model, pool)
    return accuracy(model, data["target_test_x"], data["test_y"])


def write_results(path: pathlib.Path, setup: dict, rows: list[dict], arms: list[str], seconds: float) -> str:
    """results.json with ``rows``, keeping the runs of other arms an earlier command wrote
    (``--arms`` runs a subset); the wall time is kept per command's arms."""
    earlier = json.loads(path.read_text()) if path.exists() else {"runs": [], "wall_seconds": {}}
    kept = [row for row in earlier["runs"] if row["arm"] not in arms]
    walls = {key: value for key, value in earlier["wall_seconds"].items() if not set(key.split()) & set(arms)}
    result = {"setup": setup, "runs": kept + rows, "wall_seconds": {**walls, " ".join(arms): round(seconds, 1)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return f"{path} ({round(seconds, 1)} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for results.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    args = parser.parse_args()
    started = time.time()
    data = domains()
    network = dataclasses.replace(NETWORK, num_labels=10)
    trainer = Trainer()
    setup = {"image_size": IMAGE_SIZE, "network": network.to_hf_dict(), "batch": BATCH, "steps": STEPS,
             "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "adaptation": ADAPTATION,
             "domain_seed": DOMAIN_SEED, "test_per_class": TEST_PER_CLASS, "test_images": len(data["test_y"])}
    target = unlabelled_folder(data["target_pixels"], pathlib.Path(tempfile.mkdtemp(prefix="mnist-m-target-")))
    rows, steps = [], {}
    for seed in args.seeds:
        for arm in args.arms:
            began = time.time()
            if arm in ADAPTATION:
                model, last = adapt(arm, target, network, data, seed, trainer, steps)
                images = {"train_images": len(data["source_y"]), "unlabelled_target_images": len(data["target_y"])}
            else:
                pool = "source" if arm == "source_only" else "target"
                model = models.from_config(network, task="image_classification", rngs=nnx.Rngs(seed))
                tx = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, STEPS), weight_decay=WEIGHT_DECAY)
                optimizer = peftjax.make_optimizer(model, tx, rules=[(nnx.Param, "trainable")])
                model, loss = trainer.fit("scratch", model,  # both arms: one compiled step
                                           optimizer, data[f"{pool}_x"], data[f"{pool}_y"], STEPS, seed)
                last, images = {"final_loss": loss}, {"train_images": len(data[f"{pool}_y"])}
            row = {"arm": arm, "seed": seed, **images,
                   "target_test_accuracy": accuracy(model, data["target_test_x"], data["test_y"]),
                   "source_test_accuracy": accuracy(model, data["source_test_x"], data["test_y"]),
                   **last, "seconds": round(time.time() - began, 2)}
            # The last measurement: it changes the model's statistics.
            row["target_test_accuracy_target_statistics"] = target_statistics_accuracy(model, data)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(args.out / "results.json", setup, rows, args.arms, time.time() - started)
    print(f"wrote {write_results(args.out / 'results.json', setup, rows, args.arms, time.time() - started)}")


if __name__ == "__main__":
    main()
