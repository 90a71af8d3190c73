"""The transfer commands of ``peftjax``: ``similarity``, ``advise``, ``few-shot`` and
``negative-transfer``. ``register`` adds them to the main parser; their work is
imported when one runs."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _log(line: str) -> None:
    print(time.strftime("%H:%M:%S"), line, file=sys.stderr, flush=True)


def _similarity(args) -> int:
    from peftjax.transfer.similarity import Encoder, read_dataset, similarity

    encoder = Encoder.load(args.model)
    tasks = [encoder.load_data(read_dataset(path)) for path in (args.a, args.b)]
    features = [encoder.embed(task, split=args.split, examples=args.examples, seed=args.seed) for task in tasks]
    found = similarity(*features, seed=args.seed)
    print(json.dumps({"a": args.a, "b": args.b, "model": args.model, "split": args.split, **found}, indent=2))
    return 0


def _advise(args) -> int:
    import pathlib

    from peftjax.transfer.advise import advise, to_yaml

    advice, config = advise(args.data, source_path=args.source, labelled=not args.unlabelled, budget=args.budget,
                            model=args.model, examples=args.examples, seed=args.seed)
    command = " ".join(["peftjax advise", args.data] + (["--source", args.source] if args.source else [])
                       + (["--unlabelled"] if args.unlabelled else []) + ["--budget", args.budget])
    out = pathlib.Path(args.out or f"{pathlib.Path(args.data).stem}_advised.yaml")
    out.write_text(to_yaml(advice, config, command))
    print(json.dumps({"recommendation": advice.summary, "setting": advice.setting, "reasons": list(advice.reasons),
                      "experiment": str(out)}, indent=2))
    return 0


def _few_shot(args) -> int:
    from peftjax.transfer.few_shot import load_few_shot, run_few_shot, table

    config, few_shot = load_few_shot(args.config, args.overrides)
    payload = run_few_shot(config, few_shot, keep=args.keep, log=(lambda line: None) if args.quiet else _log)
    print(table(payload["summary"], few_shot.metric))
    return 0


def _negative_transfer(args) -> int:
    from peftjax.train.runner import load_experiment
    from peftjax.transfer.negative_transfer import report, run_negative_transfer

    seeds = [int(seed) for seed in args.seeds.split(",")]
    result = run_negative_transfer(load_experiment(args.config, args.overrides), seeds, metric=args.metric, keep=args.keep,
                                   log=(lambda line: None) if args.quiet else _log)
    print(report(result, args.metric))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    similarity = commands.add_parser("similarity", help="proxy A-distance and MMD between two datasets' embeddings")
    similarity.add_argument("a", help="a data section or experiment YAML")
    similarity.add_argument("b", help="another one")
    similarity.add_argument("--model", default="minilm", help="the encoder: minilm or a checkpoint folder")
    similarity.add_argument("--split", default="train", choices=("train", "eval", "test"))
    similarity.add_argument("--examples", type=int, default=1000, help="rows embedded from each (a seeded sample)")
    similarity.add_argument("--seed", type=int, default=0)
    similarity.set_defaults(handler=_similarity)

    advise = commands.add_parser("advise", help="recommend a strategy and method for a dataset; write its YAML")
    advise.add_argument("data", help="the dataset: a data section or experiment YAML")
    advise.add_argument("--source", help="a labelled dataset of the same task from another domain")
    advise.add_argument("--unlabelled", action="store_true", help="DATA's labels are not to be used for training")
    advise.add_argument("--budget", choices=("low", "medium", "high"), default="medium", help="compute budget")
    advise.add_argument("--model", default="minilm", help="the encoder: minilm or a checkpoint folder")
    advise.add_argument("--examples", type=int, default=500, help="rows embedded from each for the similarity")
    advise.add_argument("--seed", type=int, default=0)
    advise.add_argument("--out", help="the experiment YAML to write (default: DATA_advised.yaml)")
    advise.set_defaults(handler=_advise)

    few_shot = commands.add_parser("few-shot", help="learning curves over K examples per class, for several arms")
    few_shot.add_argument("config", help="experiment YAML with a few_shot section (shots, seeds, arms)")
    few_shot.add_argument("overrides", nargs="*", help="key.sub=value overrides (few_shot.* included)")
    few_shot.add_argument("--keep", action="store_true", help="keep every run's checkpoints and adapter")
    few_shot.add_argument("--quiet", action="store_true", help="no per-run log lines")
    few_shot.set_defaults(handler=_few_shot)

    negative = commands.add_parser("negative-transfer", help="the same budget from pretrained and random weights")
    negative.add_argument("config", help="experiment YAML")
    negative.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    negative.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    negative.add_argument("--metric", default="test_accuracy", help="the result metric compared")
    negative.add_argument("--keep", action="store_true", help="keep every run's checkpoints and adapter")
    negative.add_argument("--quiet", action="store_true", help="no per-run log lines")
    negative.set_defaults(handler=_negative_transfer)
