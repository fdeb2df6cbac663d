"""Numeric precision of the CLIP towers, as named in configs and on the command line."""

from __future__ import annotations

from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]
