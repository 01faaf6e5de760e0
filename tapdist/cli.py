"""Command line: `tapdist train|demo|data|config|model-info|models`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tapdist import __version__
from tapdist.config import ConfigError, describe, dump_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["TAPDIST_DEBUG"] = "1"
    try:
        return args.func(args)
    except Exception as err:
        from tapdist.errors import USER_ERRORS, exit_code, report

        if not isinstance(err, USER_ERRORS):
            raise
        report(err)
        return exit_code(err)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapdist",
        description=(
            "Distributed runtime for TAP, personalized federated fine-tuning of multi-modal, "
            "multi-task foundation models."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tapdist {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of configuration and data errors too (or TAPDIST_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a federation (under any launcher)")
    _config_args(train)
    train.add_argument(
        "--run-dir", type=Path, help="output folder (default: run.run_dir, else runs/<run.name>)"
    )
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest complete checkpoint",
    )
    train.set_defaults(func=_train)

    config = sub.add_parser("config", help="print the resolved config, or every key")
    config.add_argument("config", nargs="?", help="YAML file (omit for the defaults)")
    config.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    config.add_argument(
        "--describe",
        action="store_true",
        help="list every section and key with its default and accepted values",
    )
    config.set_defaults(func=_config)

    info = sub.add_parser("model-info", help="parameter counts, bytes per round, memory")
    _config_args(info)
    info.set_defaults(func=_model_info)

    demo = sub.add_parser(
        "demo",
        help="TAP vs baselines on shipped real data, 3 local processes (builds its data once)",
    )
    demo.add_argument("--run-dir", type=Path, help="output folder (default: runs/demo)")
    demo.add_argument("--processes", type=int, default=3, help="local processes (default 3)")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    demo.add_argument("--rebuild", action="store_true", help="rebuild the federation file")
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="federation data files")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="build an HDF5 federation file from a spec")
    build.add_argument("spec", type=Path, help="YAML build spec (see docs/data.md)")
    build.add_argument("--out", type=Path, required=True, help="federation file to write")
    build.set_defaults(func=_data_build)

    models = sub.add_parser("models", help="list registered models and algorithms")
    models.add_argument("--plugin", action="append", default=[], help="module or .py to import")
    models.set_defaults(func=_models)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (repeatable)",
    )


def _train(args: argparse.Namespace) -> int:
    from tapdist.train import train

    cfg = load_config(args.config, args.overrides)
    if args.resume is not None and args.run_dir is not None and args.run_dir != args.resume:
        raise ConfigError(f"--resume {args.resume} and --run-dir {args.run_dir}: give one folder")
    train(cfg, args.resume or args.run_dir or cfg.run_dir, resume=args.resume is not None)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tapdist.demo import demo

    return demo(args.run_dir, args.processes, args.overrides, args.rebuild)


def _data_build(args: argparse.Namespace) -> int:
    from tapdist.data.build import build_federation

    meta = build_federation(args.spec, args.out)
    print(f"{args.out}: {len(meta.clients)} clients, {len(meta.tasks)} tasks")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from tapdist.info import model_info

    print(model_info(load_config(args.config, args.overrides)))
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.describe:
        print(describe(), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _models(args: argparse.Namespace) -> int:
    from tapdist.registry import ALGORITHMS, MODELS, load_builtins, load_plugins

    load_builtins()
    load_plugins(args.plugin, Path.cwd())
    print("models:     " + (", ".join(MODELS.names()) or "none"))
    print("algorithms: " + ", ".join(ALGORITHMS.names()))
    return 0
