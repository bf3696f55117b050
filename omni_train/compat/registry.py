"""What a runtime patch is, which modules hold them, and the check that the installed libraries are the
versions each patch was written for. Standard library only: the patch modules are imported on demand."""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from typing import Callable, List, Sequence, Tuple

ALLOW_UNTESTED = "OMNI_TRAIN_ALLOW_UNTESTED_VERSIONS"

# The modules of omni_train/compat/ that hold patches (each a PATCHES list), in the order they apply.
MODULES = ("megatron_without_te", "megatron_cpu", "megatron_rotary", "transformers_attention", "torch_safe_load")


@dataclass(frozen=True)
class Patch:
    """One change to a third-party library, applied at run time."""

    name: str
    library: str  # the distribution, as importlib.metadata names it: "megatron-core", "torch", "transformers"
    # the releases it was checked against: "0.16.1" that release only, "2.13" any 2.13.x (the patch reads no
    # patch-level API); several where CPU and the GPU image differ (torch 2.13 here, 2.11 on the lent H200s)
    written_for: Tuple[str, ...]
    targets: Tuple[str, ...]  # the dotted upstream attributes it replaces (or, for a registry, extends)
    why: str
    apply: Callable[[], None]
    devices: Tuple[str, ...] = ("cpu", "cuda")  # the device types of the runs that need it


class UntestedVersionError(RuntimeError):
    """An installed library is not the version a patch was written for."""


class UntestedVersionWarning(UserWarning):
    """The same, with OMNI_TRAIN_ALLOW_UNTESTED_VERSIONS=1 set."""


def all_patches() -> List[Patch]:
    patches: List[Patch] = []
    for module in MODULES:
        patches.extend(importlib.import_module(f"omni_train.compat.{module}").PATCHES)
    return patches


def version_matches(installed: str, written_for: str) -> bool:
    """``2.13.0+cu128`` matches "2.13" and "2.13.0"; ``0.16.2`` does not match "0.16.1"."""
    release = installed.split("+")[0]
    return release == written_for or release.startswith(written_for + ".")


def check_versions(patches: Sequence[Patch]) -> None:
    """Raise UntestedVersionError naming each patch whose library is installed at a version it was not
    written for (a warning instead with OMNI_TRAIN_ALLOW_UNTESTED_VERSIONS=1)."""
    problems = []
    for patch in patches:
        installed = installed_version(patch.library)
        written_for = (patch.written_for,) if isinstance(patch.written_for, str) else patch.written_for
        if not any(version_matches(installed, v) for v in written_for):
            problems.append(f"{patch.library} {installed} is installed, but patch '{patch.name}' (replaces "
                            f"{patch.targets[0]}) was written for {patch.library} {' or '.join(written_for)}")
    if not problems:
        return
    message = ("; ".join(problems) + ". Check each such patch in omni_train/compat/ (docs/compat.md) against "
               f"the installed version and update its written_for, or set {ALLOW_UNTESTED}=1 to run anyway.")
    if os.environ.get(ALLOW_UNTESTED) == "1":
        warnings.warn(message, UntestedVersionWarning, stacklevel=3)
    else:
        raise UntestedVersionError(message)


def resolve(target: str):
    """The object a dotted upstream path names: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module in {target}")
