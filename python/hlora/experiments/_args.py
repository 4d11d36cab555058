"""argparse value types shared by the command lines: a bad number is a one-line usage error,
never a run that records nothing or a traceback from deep inside."""

from __future__ import annotations

import argparse
import math
import os


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def block_length(text: str) -> int:
    """Tokens per block: at least 2 (a one-token block predicts no token)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a one-token block predicts nothing), got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def existing_file(text: str) -> str:
    """An input file, checked when the command starts rather than after minutes of work."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def saved_adapter(text: str) -> str:
    """A PEFT adapter folder (``save_pretrained``'s, with its adapter_config.json), checked before
    the model loads; ``hlora record --out DIR`` saves it as DIR/adapter, which is hinted."""
    if os.path.isfile(os.path.join(text, "adapter_config.json")):
        return text
    inner = os.path.join(text, "adapter")
    if os.path.isfile(os.path.join(inner, "adapter_config.json")):
        raise argparse.ArgumentTypeError(f"{text} holds no adapter_config.json; did you mean {inner}?")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    raise argparse.ArgumentTypeError(f"{text} is no PEFT adapter folder (it has no adapter_config.json)")


def require_device(parser: argparse.ArgumentParser, device: str) -> None:
    """A usage error for ``--device cuda`` where torch sees no GPU (not torch's driver traceback)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
