"""The command line's shared parts: the parser (errors as one line, a did-you-mean for a misspelt flag, every
default in `--help`), the flag value parsers, settings files, and the entry points' tail (one line for an error,
the exit status it means)."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from mnist_jax.common import log, storage
from mnist_jax.common.errors import ConfigError, MnistJaxError, report
from mnist_jax.common.log import logger
from mnist_jax.common.preemption import INTERRUPTED_STATUS, Preempted

# --- flag values ------------------------------------------------------------------------


def number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer flag >= `low`; an integral float too, as Vertex passes integer parameters (256.0)."""

    def parse(text: str) -> int:
        value = number(text, "an integer")
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return int(value)

    return parse


def float_in(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[[str], float]:
    """A finite number flag in the interval, its ends open or closed."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = number(text, "a number")
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def text(value: str) -> str:
    return value


# --- the parser -------------------------------------------------------------------------


def did_you_mean(name: str, known: Any) -> str:
    """` (did you mean X?)` for the known name nearest to `name`, or nothing when none is near."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class HelpFormatter(argparse.HelpFormatter):
    """Shows every flag's default: appended unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions, so callers print one line, and whose help shows defaults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            parsers = [self] + [
                sub for action in self._actions if isinstance(action, argparse._SubParsersAction)
                for sub in action.choices.values()
            ]  # fmt: skip
            known = [o for parser in parsers for o in parser._option_string_actions if o.startswith("--")]
            unknown = [a.split("=", 1)[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")]
            message += "".join(did_you_mean(a, known).replace(" (", f" ({a}: ", 1) for a in unknown)
        raise ConfigError(message)


def read_mapping(path: str, what: str) -> dict[str, Any]:
    """A YAML (or JSON) mapping from a local or gs:// file; anything else is a ConfigError naming `what`."""
    try:
        document = yaml.safe_load(storage.read_bytes(path))
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{what} {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not JSON or YAML: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{what} {path}: expected a mapping")
    return document


# --- the entry points' tail ---------------------------------------------------------------


def run(body: Callable[[], int | None]) -> int:
    """Runs an entry point's `body`: 0 (or its status) when it returns, 143/130 after SIGTERM/Ctrl-C once the
    work in hand is saved, 2 with a one-line error, 130 with one line for a Ctrl-C before anything was saved."""
    try:
        return body() or 0
    except Preempted as e:
        logger.warning(f"{e.verb}: {e}")
        return e.status
    except MnistJaxError as e:
        return report(e)
    except KeyboardInterrupt:
        logger.warning("interrupted (Ctrl-C)")
        return INTERRUPTED_STATUS


def main(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, body: Callable[[argparse.Namespace], int | None]
) -> int:
    """Parses `argv`, sets up the output flags (`--log-format`, `--verbose`), then runs `body(args)` as `run`
    does."""

    def parsed() -> int | None:
        args = parser.parse_args(argv)
        log.configure(args.log_format, verbose=args.verbose)
        return body(args)

    return run(parsed)
