"""Run-time settings, read once from the environment and changeable from Python.

| setting | environment variable | default | meaning |
| --- | --- | --- | --- |
| ``reference_max_bytes`` | ``LISA_REFERENCE_MAX_BYTES`` | 1 GiB | largest dense B*H*M*N*N weight tensor the reference backend builds |
| ``fft_workspace_bytes`` | ``LISA_FFT_WORKSPACE_BYTES`` | 256 MiB | workspace budget of one chunk of the fft backend |
| ``direct_block_bytes`` | ``LISA_DIRECT_BLOCK_BYTES`` | 32 MiB | size of one query block's weight tile in the direct backend |

Use :func:`lisa_kernels.set_config` to change them in a running program::

    lisa_kernels.set_config(fft_workspace_bytes=64 * 2**20)
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["Config", "get_config", "set_config"]


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number of bytes, got {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"environment variable {name} must be positive, got {raw!r}")
    return value


@dataclasses.dataclass
class Config:
    reference_max_bytes: int = dataclasses.field(
        default_factory=lambda: _env_bytes("LISA_REFERENCE_MAX_BYTES", 2**30))
    fft_workspace_bytes: int = dataclasses.field(
        default_factory=lambda: _env_bytes("LISA_FFT_WORKSPACE_BYTES", 256 * 2**20))
    direct_block_bytes: int = dataclasses.field(
        default_factory=lambda: _env_bytes("LISA_DIRECT_BLOCK_BYTES", 32 * 2**20))


_CONFIG = Config()


def get_config() -> Config:
    """The settings in force (a live object: prefer :func:`set_config` to change it)."""
    return _CONFIG


def set_config(**changes: int) -> Config:
    """Change settings by name, e.g. ``set_config(reference_max_bytes=4 * 2**30)``; returns the old ones."""
    old = dataclasses.replace(_CONFIG)
    names = {f.name for f in dataclasses.fields(Config)}
    for key, value in changes.items():
        if key not in names:
            raise ValueError(f"set_config: unknown setting {key!r}; expected one of {sorted(names)}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"set_config: {key} must be a positive int (bytes), got {value!r}")
        setattr(_CONFIG, key, value)
    return old
