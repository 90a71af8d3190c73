"""The ``peftjax`` command (also ``python -m peftjax``): ``train``, ``eval``, ``fisher``,
``rank-search``, ``bench``, ``convert-adapter``, ``combine-adapters`` and the transfer
commands (``similarity``, ``advise``, ``few-shot``, ``negative-transfer``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import warnings


def _load(path: str, overrides: list[str]):
    from peftjax.train.runner import load_experiment  # lazy: `peftjax --help` does not import jax

    return load_experiment(path, overrides)


def _train(args) -> int:
    from peftjax.train.runner import run

    result = run(_load(args.config, args.overrides), resume=args.resume, progress=not args.quiet, fsdp=args.fsdp)
    print(json.dumps({"metrics": result["metrics"], "params": result["params"],
                      "wall_time_s": round(result["wall_time_s"], 1)}, indent=2))
    return 0


def _eval(args) -> int:
    from peftjax.train.runner import build_model, load_task
    from peftjax.train.sharding import make_mesh
    from peftjax.train.tasks import evaluate, loss_and_stats

    config = _load(args.config, args.overrides)
    task, _ = load_task(config)
    model = build_model(config, task.num_labels, adapter=args.checkpoint)
    loss_fn, mesh = loss_and_stats(config.data.task), make_mesh()
    scores = {}
    for split in ("eval", "test"):
        if split in task.splits:
            found = evaluate(model, task.eval_loader(config.train.eval_batch_size, split), loss_fn, mesh)
            scores.update({f"{split}_{k}": v for k, v in found.items()})
    print(json.dumps(scores, indent=2))
    return 0


def _fisher(args) -> int:
    from peftjax.strategies.ewc import fisher_for_config

    summary = fisher_for_config(_load(args.config, args.overrides), args.checkpoint, args.out, split=args.split,
                                examples=args.examples, labels=args.labels)
    print(json.dumps(summary, indent=2))
    return 0


def _log_line(line: str) -> None:
    """A progress line with the time of day, flushed: long runs are followed in a log file."""
    import time

    print(time.strftime("%H:%M:%S"), line, flush=True)


def _rank_search(args) -> int:
    from peftjax.rank_search import SweepError, load_rank_search, run_comparison, run_rank_search

    config, sweep = load_rank_search(args.config, args.overrides)
    if args.mode:
        sweep = dataclasses.replace(sweep, mode=args.mode)
    flags = ["--mode", args.mode] if args.mode else []
    flags += ["--compare-sequential"] if args.compare_sequential else []
    flags += ["--resume"] if args.resume else []
    command = " ".join(["peftjax", "rank-search", args.config, *args.overrides, *flags])  # recorded in the report
    log = (lambda line: None) if args.quiet else _log_line
    if sweep.searches == ("grid",):
        payload = run_rank_search(config, sweep, compare_sequential=args.compare_sequential, overwrite=args.overwrite,
                                  resume=args.resume, log=log, command=command)
    elif args.compare_sequential:
        raise SweepError("--compare-sequential times the grid alone; drop it or set sweep.searches: [grid]",
                         "sweep.searches")
    else:
        payload = run_comparison(config, sweep, overwrite=args.overwrite, resume=args.resume, log=log,
                                 command=command)
    picked = [{k: e.get(k) for k in ("search", "target_set", "picked_rank", "mean", "points_from_grid_best",
                                     "flops_fraction_of_grid")} for e in payload.get("comparison", {}).get("entries", [])]
    print(json.dumps({"output_dir": config.output_dir, "points": len(payload["rows"]),
                      "pareto": payload.get("pareto"), "timing_ratio": payload.get("timing", {}).get(
                          "batched_over_sequential"), "comparison": picked}, indent=2))
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from peftjax.bench import BenchSpec, charts, run_bench, table, write_json

    for flag, folder in (("--json", args.json and Path(args.json).parent), ("--charts", args.charts)):
        if folder:
            _check_writable(Path(folder), flag)
    spec = BenchSpec(model=args.model, methods=tuple(args.methods.split(",")), batch=args.batch, seq=args.seq,
                     image_size=args.image_size, dtype=args.dtype, param_dtype=args.param_dtype, abstract=args.abstract, steps=args.steps,
                     warmup=args.warmup, task=args.task, dropout=args.dropout)
    rows = run_bench(spec, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(rows))
    if args.json:
        write_json(rows, args.json)
    if args.charts:
        prefix = args.chart_prefix or (Path(args.json).stem if args.json else Path(args.model).name)
        for path in charts(rows, args.charts, prefix):
            print(f"chart: {path}", file=sys.stderr)
    return 0


def _check_writable(folder, flag: str) -> None:
    """Before a long benchmark: its output folder can be written."""
    from peftjax.errors import BenchError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise BenchError(f"{flag}: cannot write to {folder} ({err.strerror or err}); choose a writable folder") from None


def _convert_adapter(args) -> int:
    from peftjax.core.adapter_io import load_adapter, save_adapter
    from peftjax.models import from_pretrained

    model = load_adapter(from_pretrained(args.model), args.adapter)
    print(save_adapter(model, args.out, format=args.format))
    return 0


def _combine_adapters(args) -> int:
    from peftjax.arithmetic import combine_saved
    from peftjax.core.adapter_io import save_adapter
    from peftjax.errors import ConfigError
    from peftjax.models import from_pretrained

    weights = {}
    for item in args.adapters:
        folder, _, weight = item.rpartition("=")
        try:
            weights[folder] = float(weight)
        except ValueError:
            folder = ""
        if not folder:
            raise ConfigError(f"{item!r}: give each adapter as FOLDER=WEIGHT, e.g. runs/a/adapter=0.5")
    model = combine_saved(from_pretrained(args.model), weights, combination=args.combination, svd_rank=args.svd_rank,
                          density=args.density, majority_sign=args.majority_sign, seed=args.seed)
    print(save_adapter(model, args.out, format=args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftjax", description=__doc__)
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host; see README); on SLURM, "
                             "Open MPI and TPU pods it finds the cluster by itself")
    parser.add_argument("--coordinator", help="with --distributed: host:port of process 0")
    parser.add_argument("--num-processes", type=int, help="with --distributed: how many processes in all")
    parser.add_argument("--process-id", type=int, help="with --distributed: this process's index")
    parser.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS",
                        help="with --distributed: a process that sends no heartbeat for this long is dead, and "
                             "the others stop (default: 100, as JAX's)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an experiment config")
    train.add_argument("config", help="experiment YAML")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--resume", action="store_true", help="continue from the output folder's latest checkpoint")
    train.add_argument("--fsdp", type=int, default=1, help="devices per FSDP group (the rest are data-parallel)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter on the config's eval/test splits")
    evaluate.add_argument("config")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.add_argument("--checkpoint", required=True, help="an adapter folder (OUTPUT/best or OUTPUT/adapter)")
    evaluate.set_defaults(handler=_eval)

    fisher = commands.add_parser("fisher", help="diagonal Fisher of a trained adapter on a task's data, for EWC")
    fisher.add_argument("config", help="the experiment YAML the adapter was trained with")
    fisher.add_argument("overrides", nargs="*")
    fisher.add_argument("--checkpoint", required=True, help="the trained adapter folder (OUTPUT/adapter)")
    fisher.add_argument("--out", required=True, help="the safetensors file to write (strategies: ewc.fisher)")
    fisher.add_argument("--split", default="train", choices=("train", "eval", "test"), help="the data split")
    fisher.add_argument("--examples", type=int, default=1000, help="the first N examples of the split")
    fisher.add_argument("--labels", default="model", choices=("model", "empirical"),
                        help="labels drawn from the model (the Fisher) or the data's (the empirical Fisher)")
    fisher.set_defaults(handler=_fisher)

    search = commands.add_parser("rank-search", help="train LoRA at many ranks x target sets x seeds; report")
    search.add_argument("config", help="experiment YAML with one LoRA method and a 'sweep:' section")
    search.add_argument("overrides", nargs="*", help="key.sub=value overrides (sweep.* included)")
    search.add_argument("--mode", choices=("batched", "sequential"), help="override sweep.mode")
    search.add_argument("--compare-sequential", action="store_true",
                        help="also train every point the other way, for the wall-time ratio batched/sequential")
    search.add_argument("--overwrite", action="store_true", help="replace an earlier rank search in output_dir")
    search.add_argument("--resume", action="store_true",
                        help="continue a rank search in output_dir: finished points are read back, not trained again")
    search.add_argument("--quiet", action="store_true", help="no per-program log lines")
    search.set_defaults(handler=_rank_search)

    bench = commands.add_parser("bench", help="per-method counts, XLA FLOPs and memory plan, step time")
    bench.add_argument("--model", default="bert-base", help="a preset (bert-base, llama-8b, resnet-50, ...), minilm, or a folder")
    bench.add_argument("--methods", default="all",
                       help="comma-separated YAML method types, with settings as type:field=value "
                            "(full,lora,lora:rank=16,ia3,bottleneck:variant=pfeiffer,...), or 'all'")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--seq", type=int, default=128, help="tokens per example (text models)")
    bench.add_argument("--image-size", type=int, default=224, help="side of the square images (image models)")
    bench.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    bench.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32", help="parameter storage dtype")
    bench.add_argument("--task", choices=("classification", "causal_lm", "image_classification"),
                       help="default: the model family's own")
    bench.add_argument("--abstract", action="store_true", help="shapes only: FLOPs and memory plan, no timing")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    bench.add_argument("--dropout", action="store_true", help="keep the model's dropout rates (default: 0)")
    bench.add_argument("--json", help="write the rows to this JSON file")
    bench.add_argument("--charts", help="write PNG charts to this folder")
    bench.add_argument("--chart-prefix", help="chart file names' prefix (default: the JSON file's stem)")
    bench.set_defaults(handler=_bench)

    convert = commands.add_parser("convert-adapter", help="rewrite a saved adapter in HF PEFT's format or peftjax's")
    convert.add_argument("adapter", help="an adapter folder (peftjax's or HF PEFT's)")
    convert.add_argument("out", help="the folder to write")
    convert.add_argument("--model", required=True, help="the base model's checkpoint folder")
    convert.add_argument("--format", choices=("peft", "peftjax"), default="peft")
    convert.set_defaults(handler=_convert_adapter)

    combine = commands.add_parser("combine-adapters", help="combine saved LoRA adapters into one (weighted)")
    combine.add_argument("adapters", nargs="+", help="FOLDER=WEIGHT for each adapter (peftjax's or HF PEFT's format)")
    combine.add_argument("--out", required=True, help="the folder to write the combined adapter to")
    combine.add_argument("--model", required=True, help="the base model's checkpoint folder")
    combine.add_argument("--combination", default="svd",
                         choices=("svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"))
    combine.add_argument("--svd-rank", type=int, help="svd: the result's rank (default: the largest input rank)")
    combine.add_argument("--density", type=float, help="ties, dare_*, magnitude_prune: the share of entries kept")
    combine.add_argument("--majority-sign", choices=("total", "frequency"), default="total")
    combine.add_argument("--seed", type=int, default=0, help="seeds DARE's random masks")
    combine.add_argument("--format", choices=("peft", "peftjax"), default="peft")
    combine.set_defaults(handler=_combine_adapters)

    from peftjax.transfer.cli import register as register_transfer_commands

    register_transfer_commands(commands)

    for command in commands.choices.values():
        command.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                             help="import this module first: methods and strategies it registers become usable "
                                  "(repeatable; see peftjax.plugins)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a ``PeftError`` becomes one line on stderr and exit
    code 2, a preempted run exits 128 + the signal's number. Any other
    exception is a bug and keeps its traceback."""
    from peftjax.errors import PeftError, PeftWarning, Preempted
    from peftjax.plugins import load_plugins

    args = build_parser().parse_args(argv)
    show_warning = warnings.showwarning

    def show(message, category, *rest, **kwargs):
        if issubclass(category, PeftWarning):
            print(f"peftjax: warning: {message}", file=sys.stderr, flush=True)
        else:
            show_warning(message, category, *rest, **kwargs)

    warnings.showwarning = show
    try:
        if args.distributed:
            from peftjax.train.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id,
                       heartbeat_timeout_s=args.heartbeat_timeout)
        load_plugins(args.plugin)
        return args.handler(args)
    except PeftError as err:
        print(f"peftjax: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:
        print(f"peftjax: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # outside a run's loop, where Ctrl-C stops with a checkpoint instead
        print("peftjax: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
