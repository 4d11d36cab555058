"""The PEP 517 build backend of `pip install ./hlora`: maturin's, deciding which providers to
compile in from the torch the build can see.

- With pip's build isolation (the default) the build environment has no torch: the module gets
  the view provider only — no libtorch linkage, so one wheel works with every torch.
- With `--no-build-isolation` in an environment that has torch 2.11.0 (the libtorch tch 0.24
  binds) it gets the tch provider too (`--features tch`; this needs a C++ compiler). Any other
  torch there: the view provider only — never a build against a libtorch tch does not bind.

`HLORA_PROVIDERS=view` keeps the tch provider out in any case (a machine without a C++ compiler);
`HLORA_PROVIDERS=tch,view` insists on both (the build fails without torch 2.11.0). The choice is
printed to stderr (`pip install -v` shows it).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from maturin import build_editable as _maturin_build_editable
from maturin import (  # noqa: F401 — the hooks pip calls, as maturin has them
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)
from maturin import build_wheel as _maturin_build_wheel

#: The torch whose libtorch tch 0.24 links against (Cargo.toml pins tch 0.24.0).
TCH_TORCH = "2.11.0"


def _torch_here() -> str | None:
    try:
        return importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def providers() -> list:
    """The providers to compile in, from HLORA_PROVIDERS or the torch the build can see."""
    wanted = os.environ.get("HLORA_PROVIDERS", "").replace(" ", "")
    torch = _torch_here()
    if wanted in ("view", "tch,view", "view,tch"):
        chosen = ["view"] if wanted == "view" else ["tch", "view"]
        if "tch" in chosen and torch != TCH_TORCH:
            raise RuntimeError(f"HLORA_PROVIDERS={wanted}: the tch provider builds against torch {TCH_TORCH} only, "
                               f"and this build environment has {torch or 'no torch'}")
    elif wanted:
        raise RuntimeError(f"HLORA_PROVIDERS must be 'view' or 'tch,view', got {wanted!r}")
    else:
        chosen = ["tch", "view"] if torch == TCH_TORCH else ["view"]
    reason = (f"torch {torch} in the build environment" if torch == TCH_TORCH and "tch" in chosen else
              f"torch {torch} in the build environment, not {TCH_TORCH}" if torch else
              "no torch in the build environment: build isolation")
    sys.stderr.write(f"hlora: compiling the {' and '.join(chosen)} provider{'s' if len(chosen) > 1 else ''} "
                     f"({reason})\n")
    return chosen


def _with_providers(build, *args, **kwargs):
    if "tch" in providers():
        os.environ["MATURIN_PEP517_ARGS"] = (os.environ.get("MATURIN_PEP517_ARGS", "") + " --features tch").strip()
        os.environ.setdefault("LIBTORCH_USE_PYTORCH", "1")
    return build(*args, **kwargs)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _with_providers(_maturin_build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _with_providers(_maturin_build_editable, wheel_directory, config_settings, metadata_directory)
