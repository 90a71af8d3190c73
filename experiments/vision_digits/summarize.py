"""Tables (markdown) and the plot of experiments/vision_digits' results.json files.

    python experiments/vision_digits/summarize.py experiments/vision_digits
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # mnist_m, beside this file


def _groups(rows, keys, value):
    found = collections.defaultdict(list)
    for row in rows:
        found[tuple(row[k] for k in keys)].append(row[value])
    return found


def transfer_table(result: dict) -> str:
    rows = result["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    shots = sorted({r["shots_per_class"] for r in rows})
    accuracy = _groups(rows, ("arm", "shots_per_class"), "test_accuracy")
    params = {r["arm"]: r["trainable_params"] for r in rows}
    lines = ["| arm | trainable params | " + " | ".join(f"{s}/class" for s in shots) + " |",
             "| --- | ---: |" + " ---: |" * len(shots)]
    for arm in arms:
        cells = []
        for s in shots:
            values = np.array(accuracy[(arm, s)])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f} (n={len(values)})")
        lines.append(f"| {arm} | {params[arm]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def domain_table(result: dict) -> str:
    rows = result["runs"]
    lines = ["| arm | train images | target test accuracy | source test accuracy |", "| --- | ---: | ---: | ---: |"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        target = np.array([r["target_test_accuracy"] for r in mine])
        source = np.array([r["source_test_accuracy"] for r in mine])
        images = f"{mine[0]['train_images']}"
        if "unlabelled_target_images" in mine[0]:
            images += f" + {mine[0]['unlabelled_target_images']} unlabelled"
        lines.append(f"| {arm} | {images} | {target.mean():.3f} ± {target.std():.3f} (n={len(mine)}) "
                     f"| {source.mean():.3f} ± {source.std():.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    rows = result["runs"]
    accuracy = _groups(rows, ("arm", "shots_per_class"), "test_accuracy")
    shots = sorted({r["shots_per_class"] for r in rows})
    figure, axes = plt.subplots(figsize=(6, 4))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        means = [np.mean(accuracy[(arm, s)]) for s in shots]
        spreads = [np.std(accuracy[(arm, s)]) for s in shots]
        axes.errorbar(shots, means, yerr=spreads, marker="o", capsize=3, label=arm)
    axes.set_xscale("log")
    axes.set_xticks(shots, [str(s) for s in shots])
    axes.set_xlabel("labelled target images per class (digits 5-9)")
    axes.set_ylabel("test accuracy (250 images)")
    axes.set_title("Small ResNet pretrained on digits 0-4; mean ± std of 3 seeds")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def domain_samples(path: pathlib.Path, count: int = 10) -> None:
    """The first ``count`` test digits in both domains, source above target."""
    from PIL import Image

    from mnist_m import domains

    data = domains()
    rows = [np.concatenate(list(data[f"{name}_test_x"][:count] * 0.5 + 0.5), axis=1) for name in ("source", "target")]
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=pathlib.Path)
    args = parser.parse_args()
    transfer = json.loads((args.folder / "results.json").read_text())
    print(transfer_table(transfer))
    plot(transfer, args.folder / "accuracy_vs_shots.png")
    print(f"\nplot: {args.folder / 'accuracy_vs_shots.png'}")
    domain_file = args.folder / "mnist_m" / "results.json"
    if domain_file.exists():
        print("\n" + domain_table(json.loads(domain_file.read_text())))
        domain_samples(domain_file.parent / "samples.png")
        print(f"samples: {domain_file.parent / 'samples.png'}")


if __name__ == "__main__":
    main()
