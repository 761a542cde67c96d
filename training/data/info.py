"""What a model needs to know about its data set, independent of the data itself.

``DataInfo`` travels into ``run.json`` (``to_json``) so that pruning, export and verification can
rebuild the normalisation and class names without touching the data files again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.errors import SwatError

_KEYS = ("name", "num_classes", "in_channels", "image_size", "mean", "std", "class_names")


@dataclass(frozen=True)
class DataInfo:
    """Static description of a data set.

    ``mean`` / ``std`` are per channel and apply to images already scaled to [0, 1]
    (``normalize`` computes ``(x - mean) / std``).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        # Coerce lists (from JSON) to tuples so equality and hashing behave.
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "class_names", tuple(str(v) for v in self.class_names))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "in_channels", int(self.in_channels))
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width) >= 1, got {self.image_size}")
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be >= 1, got {self.in_channels}, {self.num_classes}"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.in_channels}), "
                f"got {len(self.mean)} / {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries, num_classes is {self.num_classes}"
            )

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict (lists, not tuples)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataInfo:
        """Inverse of ``to_json``; a damaged dict (e.g. a hand-edited run.json) is a SwatError."""
        if not isinstance(d, dict):
            raise SwatError(f"data set info must be a JSON object, got {type(d).__name__}; "
                            "train the run again")
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise SwatError(f"data set info is missing {', '.join(missing)}; "
                            "train the run again")
        try:
            return cls(**{k: d[k] for k in _KEYS})
        except (TypeError, ValueError) as exc:
            raise SwatError(f"data set info is invalid ({exc}); train the run again") from exc
