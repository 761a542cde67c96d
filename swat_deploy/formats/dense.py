"""Dense storage: the fallback format when sparse indices would cost more than the zeros.

It shares the CSR / BSR interface (`nbytes`, `to_dense`, `to_state` / `from_state`) so code
that saves or loads a layer never special-cases it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .csr import _key


@dataclass(frozen=True)
class DenseWeight:
    values: torch.Tensor  # the weight in its own shape

    format = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def to_dense(self) -> torch.Tensor:
        return self.values.clone()

    def to_state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {_key(prefix, "values"): self.values.contiguous()}, {"format": self.format, "shape": list(self.shape)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], prefix: str = "") -> "DenseWeight":
        key = _key(prefix, "values")
        if key not in tensors:
            raise ValueError(f"dense weight {prefix!r} is missing tensor {key!r}; re-export the model")
        values = tensors[key]
        if list(values.shape) != [int(d) for d in header["shape"]]:
            raise ValueError(f"dense weight {prefix!r}: tensor shape {tuple(values.shape)} does not match "
                             f"header shape {tuple(header['shape'])}")
        return cls(values)


def to_dense_format(dense: torch.Tensor) -> DenseWeight:
    return DenseWeight(dense.detach().contiguous())
