"""``carrot study|train|final|tables|plots|bench``: the command line the Makefile calls.

Bad input (an unknown variant, dataset or backbone, a negative epoch count, an
unwritable store, a missing dataset root) gives one clear line and exit status 2 before
any run is created.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_TRIALS = 6


def build_config(args: argparse.Namespace, variant: str | None = None):
    """Config file, then command-line flags, then ``--set key=value`` overrides."""
    import yaml

    from carrot.config import ConfigError, RunConfig, set_dotted

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {'is a folder' if path.is_dir() else 'not found'}: {path}; expected a "
                              "YAML file of config sections")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader()) or {}
        except _DuplicateKey as exc:
            raise ConfigError(f"config file {path}:{exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ConfigError(f"config file {path} cannot be read ({why}); "
                              "expected a readable UTF-8 YAML file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"config file {where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                              "expected a mapping of config sections") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    flags = {
        "variant.name": variant or getattr(args, "variant", None),
        "data.name": getattr(args, "dataset", None),
        "data.root": getattr(args, "data_root", None),
        "data.workers": getattr(args, "workers", None),
        "data.image_size": getattr(args, "image_size", None),
        "data.batch_size": getattr(args, "batch_size", None),
        "model.backbone": getattr(args, "backbone", None),
        "model.pretrained_path": getattr(args, "pretrained_path", None),
        "optim.epochs": getattr(args, "epochs", None),
        "device": getattr(args, "device", None),
        "seed": getattr(args, "seed", None),
        "experiment": getattr(args, "experiment", None),
    }
    for key, value in flags.items():
        if value is not None and value != "":
            set_dotted(data, key, value)
    if getattr(args, "no_progress", False):
        data["show_progress"] = False
    for key, value in _set_items(args):
        if key == "variant.name" and getattr(args, "variant", None):  # --variant all would study it k times
            raise ConfigError(f"--set variant.name={value} and --variant {args.variant} both name the variant; "
                              "expected one of them")
        set_dotted(data, key, value)
    from carrot.checks import check_names_fast

    cfg = RunConfig.from_dict(data)
    check_names_fast(cfg)  # typos are reported before anything heavy is imported
    return cfg


class _DuplicateKey(Exception):
    """A key given twice in one mapping of a config file (YAML keeps the last silently)."""


def _unique_keys_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                mark = key_node.start_mark
                if key in seen:
                    raise _DuplicateKey(f"{mark.line + 1}:{mark.column + 1}: the key {key!r} is given twice in one "
                                        f"section (first on line {seen[key]}); expected each key once")
                seen[key] = mark.line + 1
            return super().construct_mapping(node, deep)

    return UniqueKeys


def _set_items(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from carrot.config import ConfigError, parse_value

    items = []
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"invalid --set {item!r}: expected key=value, e.g. optim.lr=0.001")
        key, value = item.split("=", 1)
        items.append((key.strip(), parse_value(value)))
    return items


def _tolerance(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (a relative difference), got {text!r}")
    return value


def _int_arg(text: str) -> int:
    from carrot.config import int_argument

    return int_argument()(text)


def _common(p: argparse.ArgumentParser, variant_default: str = "baseline", seed: bool = True) -> None:
    """The run flags; ``seed=False`` leaves ``--seed`` out of the help (final runs refuse it with
    a line of their own)."""
    from carrot.config import RunConfig

    d = RunConfig()
    p.add_argument("--variant", help=f"variant name, see `carrot variants` (default {variant_default})")
    p.add_argument("--dataset", help=f"dataset name (default {d.data.name})")
    p.add_argument("--data-root", help="dataset folder on disk (real datasets; default: none, the built-in data)")
    p.add_argument("--backbone", help=f"timm model name (default {d.model.backbone})")
    p.add_argument("--pretrained-path", help="local backbone weights file (default: none, random initialisation)")
    p.add_argument("--epochs", type=_int_arg, help=f"training epochs per run (default {d.optim.epochs})")
    p.add_argument("--image-size", type=_int_arg,
                   help="input size in pixels (default: the dataset's, 32 for digits; the backbone's for real data)")
    p.add_argument("--batch-size", type=_int_arg,
                   help=f"global training batch (default {d.data.batch_size})")
    p.add_argument("--workers", type=_int_arg, help=f"DataLoader worker processes (default {d.data.workers})")
    p.add_argument("--device", help=f"auto (CUDA when present), cpu or cuda (default {d.device})")
    p.add_argument("--seed", type=_int_arg, help=f"run seed (default {d.seed})" if seed else argparse.SUPPRESS)
    p.add_argument("--experiment", help=f"MLflow experiment name (default {d.experiment})")
    p.add_argument("--config", help="YAML file with config sections, e.g. studies/cub_resnet50.yaml (default: none)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.001 --set variant.hparams.lam=0.5; "
                        "`carrot config --show` lists the keys (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines (default: shown)")
    p.add_argument("--verify-images", action="store_true",
                   help="decode every image before training (default: read each image's header only)")


def _nproc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=_int_arg, default=1,
                   help="DDP processes per trial, started through torchrun: one GPU each (NCCL), or CPU "
                        "processes (gloo); data.batch_size is the global batch (default 1)")


def _variants_arg(name: str | None) -> list[str | None]:
    """The variants of ``--variant``: every one for ``all``; None (the config file's, else
    baseline) when not given."""
    from carrot.checks import variant_names

    if name == "all":
        return variant_names()
    return [name]


def cmd_study(args: argparse.Namespace) -> int:
    if args.trials < 1:
        from carrot.config import ConfigError

        raise ConfigError(f"invalid trials={args.trials}: expected a positive integer")
    if args.jobs < 1:
        from carrot.config import ConfigError

        raise ConfigError(f"invalid jobs={args.jobs}: expected a positive integer (worker processes)")
    if args.jobs > args.trials:  # each worker would run a trial of its own
        print(f"carrot: --jobs {args.jobs} is more than --trials {args.trials}: starting {args.trials} worker(s)",
              file=sys.stderr)
        args.jobs = args.trials
    _check_nproc(args)
    if args.launcher == "slurm":
        import shutil

        from carrot.config import ConfigError

        if shutil.which("srun") is None:
            raise ConfigError("--launcher slurm needs Slurm, and srun is not on this machine's PATH; expected a "
                              "Slurm login node (--launcher submitit-local runs the same path here)")
    if args.nproc > 1 and args.launcher != "local":
        from carrot.config import ConfigError

        raise ConfigError(f"--nproc {args.nproc} runs DDP workers on this machine (--launcher local); "
                          f"--launcher {args.launcher} starts single-process workers")
    configs = [build_config(args, v) for v in _variants_arg(args.variant)]
    if args.study_name and len(configs) > 1:
        from carrot.config import ConfigError

        raise ConfigError("--study-name names one study; use it with one variant, not VARIANT=all")
    from carrot.checks import check_names
    from carrot.study import open_storage, run_study, study_name
    from carrot.tracking import check_store, client, experiment_url

    for cfg in configs:
        check_names(cfg)
    # fail on an unusable dataset or store before any run or store is created
    _preflight_data(configs[0], args)
    check_store()
    open_storage(args.storage)
    mlf = client()
    summaries = []
    for index, cfg in enumerate(configs):
        name = args.study_name or study_name(cfg)
        count = f"[{index + 1}/{len(configs)}] " if len(configs) > 1 else ""
        print(f"{count}study {name}: {args.trials} trial(s) of {cfg.optim.epochs} epoch(s) on "
              f"{_device_name(cfg.device)}", flush=True)
        s = run_study(cfg, args.trials, args.storage, name=args.study_name,
                      keep_checkpoints=args.keep_checkpoints, jobs=args.jobs, launcher=args.launcher,
                      nproc=args.nproc,
                      slurm={"partition": args.slurm_partition, "gpus_per_task": args.slurm_gpus_per_task,
                             "time_min": args.slurm_time})
        other = s.n_trials - s.n_complete - s.n_pruned - s.n_failed  # another worker's, or queued again
        print(f"study {s.name}: {s.n_trials} trials in total ({s.n_complete} complete, {s.n_pruned} pruned, "
              f"{s.n_failed} failed" + (f", {other} running or queued" if other else "") + ")")
        if s.best_number is not None:
            print(f"  best trial {s.best_number}: {cfg.split}/acc={s.best_value:.4f} run {s.best_run_id}")
            print(f"  best params: {s.best_params}")
        print(f"  runs: {s.tracking_uri} (experiment {cfg.experiment!r}, parent run {s.parent_run_id}); "
              f"`make ui` to browse")
        print(f"  study storage: {s.storage}")
        summaries.append((cfg, s))
    if len(summaries) > 1:
        print(f"{len(summaries)} studies:")
        for cfg, s in summaries:
            best = f"{cfg.split}/acc={s.best_value:.4f} (trial {s.best_number})" if s.best_number is not None \
                else "no complete trial"
            print(f"  {cfg.variant.name:<20} {s.n_complete:>3} complete {s.n_pruned:>3} pruned {s.n_failed:>3} failed"
                  f"  best {best}")
    print(f"MLflow UI: {experiment_url(mlf, configs[0].experiment)} (`make ui`)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Join an existing study: its configuration comes from the study."""
    from carrot.config import ConfigError

    if (args.trials is None) == (args.until is None):
        raise ConfigError("carrot worker needs exactly one of --trials N (trials to run) or --until N "
                          "(finished trials the study should hold)")
    for flag, value in (("--trials", args.trials), ("--until", args.until)):
        if value is not None and value < 1:
            raise ConfigError(f"invalid {flag} {value}: expected a positive integer")
    overrides = {key: value for key, value in {"device": args.device, "data.workers": args.workers}.items()
                 if value is not None}
    if args.no_progress:
        overrides["show_progress"] = False
    _check_nproc(args)
    from carrot import ddp
    from carrot.study import join_study, load_existing_study, stored_config
    from carrot.tracking import client

    if args.device is not None:
        from carrot.config import DEVICES
        from carrot.runtime import resolve_device

        if args.device not in DEVICES:
            raise ConfigError(f"invalid --device {args.device!r}: expected one of {DEVICES}")
        resolve_device(args.device)
    stored_config(load_existing_study(args.storage, args.study_name))  # before anything is created
    if args.nproc > 1 and not ddp.launched():  # this command again, as a torchrun group
        return ddp.relaunch(args.nproc, args.argv)
    ddp.init_from_env()
    if not ddp.is_main():  # ranks 1..k-1 train what rank 0 broadcasts
        from carrot.study import follow

        follow()
        return 0
    client()
    try:
        stopped = join_study(args.storage, args.study_name, trials=args.trials, until=args.until,
                             worker=args.worker_index, overrides=overrides, keep_checkpoints=args.keep_checkpoints)
    finally:
        if ddp.active():  # the other ranks stop following
            try:
                ddp.broadcast(None)
            except Exception:  # they are gone already (the group broke down)
                pass
    if stopped:
        raise stopped[0]
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from carrot import contract

    _check_nproc(args)
    cfg = build_config(args)
    from carrot import ddp
    from carrot.checks import check_names

    check_names(cfg)
    _preflight_data(cfg, args)
    if args.nproc > 1 and not ddp.launched():  # this command again, as a torchrun group
        return ddp.relaunch(args.nproc, args.argv)
    ddp.init_from_env()

    from carrot.config import UserError
    from carrot.reference import count_classes, resolve
    from carrot.study import StorageMissing, open_storage
    from carrot.tracking import client, run_url
    from carrot.train import run

    def stores():  # an unusable store fails here, before any run exists (exit 2)
        from carrot.liveness import close_dead_runs

        client()
        close_dead_runs(cfg.experiment, contract.ROLE_TRAIN)  # a run whose command was killed
        try:  # the baseline study's reference pairs, when there is a study storage: a run creates none
            storage = open_storage(args.storage, create=False)
        except StorageMissing:  # a damaged or unreachable one is an error, not "no baseline yet"
            storage = None
        return resolve(cfg, storage, count_classes(cfg))

    try:
        reference = ddp.on_main(stores)
    except ddp.RemoteFailure:  # rank 0 reports it
        return 2
    try:
        result = run(cfg, reference=reference,
                     extra_tags={contract.TAG_ROLE: contract.ROLE_TRAIN})
    except Exception as exc:  # a diverging or broken run (it ended FAILED): one line, exit 1
        from carrot.interrupt import Interrupted

        if isinstance(exc, (UserError, Interrupted)):
            raise
        from carrot.train import failure_reason

        print(f"carrot: error: the run failed: {contract.redact(failure_reason(exc))}", file=sys.stderr)
        return 1
    if not ddp.is_main():
        return 0
    print(f"run {result.run_id}: {cfg.split}/acc={result.objective:.4f} after {result.epochs_done} "
          f"epoch{'s' if result.epochs_done != 1 else ''} "
          f"({result.seconds:.0f} s)")
    _print_headline(result.metrics, cfg.split)
    print(f"  MLflow UI: {run_url(client(), result.run_id)} (`make ui`)")
    return 0


def _print_headline(metrics: dict, split: str) -> None:
    from carrot.run_report import headline

    for label, value in headline(metrics, split)[1:]:
        print(f"  {label}: {value}")


def cmd_final(args: argparse.Namespace) -> int:
    from carrot.config import ConfigError

    set_seed = [value for key, value in _set_items(args) if key == "seed"]
    if args.seed is not None or set_seed:  # the seeds of final runs are 0 .. S-1
        given = f"--seed {args.seed}" if args.seed is not None else f"--set seed={set_seed[0]}"
        raise ConfigError(f"{given} has no effect on final runs, which use seeds 0 .. S-1; "
                          "expected --seeds S (how many)")
    cfg = build_config(args, "baseline")
    if args.seeds < 1:
        raise ConfigError(f"invalid seeds={args.seeds}: expected a positive integer")
    from carrot.checks import check_backbone
    from carrot.final import FinalRunsFailed, run_final
    from carrot.tracking import client

    check_backbone(cfg)  # a typo would find no study
    variants = None if not args.variant or args.variant == "all" else [args.variant]
    if variants:
        build_config(args, args.variant)  # an unknown variant: one line, with the closest name
    overrides = {key: value for key, value in {  # on top of each study's best trial, as --set
        "optim.epochs": args.epochs, "device": args.device, "data.workers": args.workers,
        "data.root": args.data_root, "data.image_size": args.image_size, "data.batch_size": args.batch_size,
        "model.pretrained_path": args.pretrained_path}.items() if value is not None}
    overrides["show_progress"] = not args.no_progress
    for key, value in _set_items(args):  # --set applies on top of the best trial's configuration
        overrides[key] = value
    _preflight_data(cfg, args)
    try:
        plans = run_final(cfg, seeds=args.seeds, variants=variants, storage=args.storage, overrides=overrides)
    except FinalRunsFailed as exc:
        print(f"carrot: error: {exc}", file=sys.stderr)
        return 1
    from carrot.final import summary_lines
    from carrot.tracking import experiment_url

    print(f"final runs ({cfg.data.dataset_id}, {cfg.model.backbone}):")
    for line in summary_lines(plans, cfg.experiment):
        print(line)
    print(f"  tables: `make tables`; MLflow UI: {experiment_url(client(), cfg.experiment)} (`make ui`)")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from analysis.tables import main as tables_main

    return tables_main(args.rest)


def cmd_plots(args: argparse.Namespace) -> int:
    from analysis.plots import main as plots_main

    return plots_main(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    from carrot import interrupt

    try:
        if args.rest[:1] == ["throughput"]:
            from carrot.throughput import main as throughput_main

            return throughput_main(args.rest[1:])
        from carrot.bench import main as bench_main

        return bench_main(args.rest)
    except interrupt.Interrupted as exc:  # between two repeats: nothing of the run is kept
        print(f"carrot: {exc}: the bench stopped{' (--json not written)' if '--json' in args.rest else ''}",
              file=sys.stderr)
        return exc.exit_code


def cmd_variants(args: argparse.Namespace) -> int:
    from carrot.variants import get_variant_class, list_variants

    print(f"{'variant':<20} {'knob':<20} {'recommended':<14} searched over")
    for name in list_variants():
        cls = get_variant_class(name)
        recommended, space = cls.recommended(), cls.full_search_space()
        knobs = list(dict.fromkeys([*recommended, *space]))
        if not knobs:
            print(f"{name:<20} {'(none: cross-entropy only)':<20}")
        for i, knob in enumerate(knobs):
            print(f"{name if i == 0 else '':<20} {knob:<20} {_show(recommended.get(knob, '')):<14} "
                  f"{_describe_distribution(space.get(knob))}")
    print("every study also searches optim.lr, optim.weight_decay and the sampler (data.sampler, "
          "data.m_per_class) around the configured values; pin a knob with --set variant.hparams.<knob>=v")
    return 0


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe_distribution(dist) -> str:
    if dist is None:
        return "fixed"
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(_show(c) for c in dist.choices) + "}"
    scale = ", log" if getattr(dist, "log", False) else ""
    return f"[{_show(dist.low)}, {_show(dist.high)}{scale}]"


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved configuration as YAML: defaults, the config file, flags and --set."""
    import yaml

    from carrot.checks import check_names

    cfg = build_config(args)
    check_names(cfg)  # what a command would refuse is refused here too
    data = cfg.resolved().to_dict() if args.resolve else cfg.to_dict()
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from carrot.reevaluate import main as evaluate_main

    return evaluate_main(args.run_id, args.split, args.device, args.tolerance)


def _check_nproc(args: argparse.Namespace) -> None:
    if args.nproc < 1:
        from carrot.config import ConfigError

        raise ConfigError(f"invalid nproc={args.nproc}: expected a positive integer (DDP processes per trial)")


def _device_name(device: str) -> str:
    from carrot.runtime import resolve_device

    return resolve_device(device).type


def _preflight_data(cfg, args: argparse.Namespace) -> None:
    """Build the dataset once, check its classes and image files, and that a training batch
    can be filled, so bad data fails before any run exists."""
    from carrot.data import preflight
    from carrot.loaders import check_batch
    from carrot.runtime import resolve_device

    resolve_device(cfg.device)  # cuda where there is none: one line before anything is created
    if cfg.model.pretrained_path or cfg.model.kwargs:  # bad weights or arguments, before the stores
        from carrot.model import create_backbone

        create_backbone(cfg.model.backbone, pretrained_path=cfg.model.pretrained_path, extra=cfg.model.kwargs)
    splits = preflight(cfg.data, verify_images=getattr(args, "verify_images", False))
    # a run trains with its resolved sampler; a study searches the sampler when it is "auto"
    check_batch(cfg.resolved() if getattr(args, "command", "") == "train" else cfg, splits,
                world=getattr(args, "nproc", 1) or 1)


def _is_nproc(argv: list[str], i: int) -> bool:
    """``argv[i]`` is ``--nproc``, ``--nproc=k`` or the value after ``--nproc``."""
    a = argv[i]
    return a == "--nproc" or a.startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


def _leave_group(wait: bool) -> None:
    """Close the DDP process group of a torchrun rank (nothing to do, and nothing imported, otherwise)."""
    if "carrot.ddp" in sys.modules:
        sys.modules["carrot.ddp"].shutdown(wait=wait)


PASSTHROUGH = {"tables": "cmd_tables", "plots": "cmd_plots", "bench": "cmd_bench"}
# what running an interrupted command again does (`carrot train` starts a new run)
RESUME = {
    "cmd_study": "; run the same command again to resume (the trial goes on from its last checkpoint)",
    "cmd_worker": "; run the same command again to resume (the trial goes on from its last checkpoint)",
    "cmd_final": "; run the same command again to go on (seeds that finished are not run again)",
}


STORE_ERRNOS = {"EROFS", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EIO"}  # a store that can no longer be written


def store_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or what it was raised from or during) when it says a
    file can no longer be written: Optuna reports a journal it cannot append to as an
    AssertionError raised while handling the OSError."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and errno.errorcode.get(exc.errno or 0) in STORE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    try:  # a Ctrl-C while the command is still starting (before its handlers are in place)
        from carrot.malloc import keep_freed_blocks

        keep_freed_blocks()  # before the first training buffer (carrot/malloc.py)
        code = _main(argv)
    except KeyboardInterrupt:
        print("carrot: interrupted", file=sys.stderr)
        return 130
    if "carrot.ddp" in sys.modules:  # a torchrun rank of `--nproc`: rank 0's status is the command's
        return sys.modules["carrot.ddp"].exit_status(code)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The command line: every subcommand and flag, each with its help and its default."""
    from carrot import contract

    parser = contract.ArgumentParser(prog="carrot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("study", help="Optuna search over one variant's hyperparameters (or all)")
    _common(p)
    p.add_argument("--trials", type=_int_arg, default=DEFAULT_TRIALS, help="trials to add (default %(default)s)")
    p.add_argument("--storage", help="Optuna storage: journal file path or URL (default studies/optuna.journal)")
    p.add_argument("--study-name", help="study name (default <dataset>-<backbone>-<variant>); a new name forks "
                                        "a new study")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished trial's last checkpoint (default: removed when the trial ends)")
    p.add_argument("--jobs", type=_int_arg, default=1,
                   help="worker processes on this machine, one GPU each where there are GPUs (default 1)")
    p.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local",
                   help="local: worker processes here; slurm: a Slurm job array through submitit (requeued on "
                        "pre-emption); submitit-local: the same through submitit's local executor (default local)")
    p.add_argument("--slurm-partition", help="Slurm partition (--launcher slurm; default: the cluster's default partition)")
    p.add_argument("--slurm-gpus-per-task", type=_int_arg, default=1, help="GPUs per worker (default %(default)s)")
    p.add_argument("--slurm-time", type=_int_arg, default=24 * 60, help="minutes per job before requeue "
                                                                           "(default 1440)")
    _nproc_flag(p)
    p.set_defaults(fn=cmd_study)
    p = sub.add_parser("worker", help="join an existing study from any machine and run its trials")
    p.add_argument("--storage", help="the study's Optuna storage, e.g. postgresql://user:pass@head/db "
                                     "(default studies/optuna.journal)")
    p.add_argument("--study-name", required=True, help="the study to join (see `carrot study`'s output; required)")
    p.add_argument("--trials", type=_int_arg,
                   help="trials to run (exactly one of --trials and --until is required; no default)")
    p.add_argument("--until", type=_int_arg, help="run until the study holds this many finished trials "
                                                  "(exactly one of --trials and --until is required; no default)")
    p.add_argument("--worker-index", type=contract.int_argument(0), default=1,
                   help="this worker's number, which moves its sampler seed (default %(default)s)")
    p.add_argument("--device", help="auto (CUDA when present), cpu or cuda (default: the study's)")
    p.add_argument("--workers", type=_int_arg, help="DataLoader worker processes (default: the study's)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished trial's last checkpoint (default: removed when the trial ends)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines (default: shown)")
    _nproc_flag(p)
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("train", help="one run at the recommended setting")
    _common(p)
    p.add_argument("--storage", help="Optuna storage whose baseline study supplies the reference pairs "
                                     "(default studies/optuna.journal)")
    _nproc_flag(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("final", help="best configuration of each variant, several seeds, test split")
    _common(p, variant_default="all studied variants", seed=False)
    p.add_argument("--seeds", type=_int_arg, default=5, help="seeds per variant (default %(default)s)")
    p.add_argument("--storage", help="Optuna storage holding the studies (default studies/optuna.journal)")
    p.set_defaults(fn=cmd_final)
    for name, fn, help_ in (("tables", cmd_tables, "ablation and paper tables from finished runs"),
                            ("plots", cmd_plots, "sanity-check plots from finished runs"),
                            ("bench", cmd_bench, "variant cost as a ratio to the CE head")):
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
    p = sub.add_parser("variants", help="the registered variants: their knobs, recommended values and search ranges")
    p.set_defaults(fn=cmd_variants)
    p = sub.add_parser("config", help="print the configuration a command would run with (defaults, --config, "
                                      "flags and --set applied)")
    _common(p)
    p.add_argument("--show", action="store_true", help="print it (the default action)")
    p.add_argument("--resolve", action="store_true",
                   help="fill in the variant's recommended hyperparameters and its sampler (default: as given)")
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("evaluate", help="rebuild a run's model from its weights, recompute its diagnostics and "
                                        "report where they differ from what it logged")
    p.add_argument("run_id", help="an MLflow run that kept its weights (final runs do)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="split to evaluate (default: the run's own, test for final runs)")
    p.add_argument("--device", help="auto, cpu or cuda (default: the run's)")
    p.add_argument("--tolerance", type=_tolerance, default=1e-6,
                   help="relative difference reported as a mismatch (default %(default)g)")
    p.set_defaults(fn=cmd_evaluate)
    return parser


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # their own parsers take every flag that follows
        args = argparse.Namespace(rest=argv[1:], fn=globals()[PASSTHROUGH[argv[0]]])
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser, whose --help lists what it takes
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
            commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        args.argv = [a for i, a in enumerate(argv) if not _is_nproc(argv, i)]  # what a torchrun relaunch runs
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)

    from carrot import interrupt
    from carrot.config import UserError
    from carrot.contract import redact, remember_url

    remember_url(getattr(args, "storage", None))  # its password is masked in every message

    try:
        with interrupt.graceful():
            code = args.fn(args)
        _leave_group(wait=code == 0)  # a torchrun rank: once every rank is done
        return code
    except UserError as exc:
        print(f"carrot: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except interrupt.Interrupted as exc:
        if exc.before_stores:
            print(f"carrot: {exc} before any store or run was made", file=sys.stderr)
        elif not interrupt.relaunched_rank() or os.environ.get("RANK") == "0":  # one line, not one per rank
            print(f"carrot: {exc}: the current run ended KILLED{RESUME.get(getattr(args.fn, '__name__', ''), '')}",
                  file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("carrot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `carrot variants | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        cause = store_os_error(exc)
        if cause is None:
            raise
        where = f" {cause.filename}" if cause.filename else ""
        print(redact(f"carrot: error: cannot write{where}: {cause.strerror or cause}; expected a store this user can "
                     "write (a trial left RUNNING is failed and queued again by the next command once it can)"),
              file=sys.stderr)
        return 1
    finally:
        _leave_group(wait=False)


if __name__ == "__main__":
    sys.exit(main())
