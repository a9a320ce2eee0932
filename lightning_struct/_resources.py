"""Where the Hydra config root (``conf/``) and the recipes (``recipes/``) live.

In a source checkout (editable install) they sit at the repository root, next to the
package. In a wheel they are shipped inside the package (see ``pyproject.toml``,
``force-include``). Both layouts resolve through these two functions.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"lightning_struct: cannot find the '{name}/' directory (looked in {_PKG / name} and "
        f"{_PKG.parent / name}); the installation is incomplete - reinstall the package."
    )


def config_dir() -> Path:
    """Absolute path of the Hydra config root (holds ``config.yaml``)."""
    return _find("conf")


def recipes_dir() -> Path:
    """Absolute path of the recipes directory (experiment configs, group ``recipe``)."""
    return _find("recipes")
