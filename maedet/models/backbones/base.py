"""What every backbone provides to the rest of maedet."""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn

from maedet.models.layers import ShapeSpec

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """Base class of the registered backbones (:data:`maedet.utils.registry.BACKBONES`).

    A backbone maps a batch of normalized images ``(B, 3, H, W)`` to named
    feature maps and declares:

    - :meth:`output_shape`: name -> :class:`ShapeSpec` (channels, stride) of each
      output, which the neck and heads are built from;
    - :attr:`size_divisibility`: the input sides must be multiples of it;
    - :attr:`num_layers` and :meth:`layer_id`: its own rule for layer-wise lr decay
      (embedding -> 0, stage / block i -> i + 1, anything after -> ``num_layers + 1``);
    - :meth:`filter_pretrained`: how a pretrained checkpoint's tensors are fitted
      to it (the default keeps the keys it has).
    """

    def output_shape(self) -> Dict[str, ShapeSpec]:
        raise NotImplementedError

    @property
    def size_divisibility(self) -> int:
        return max(s.stride for s in self.output_shape().values())

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def layer_id(self, name: str) -> int:
        """Layer index in ``[0, num_layers + 1]`` of the parameter ``name`` (relative to this module)."""
        raise NotImplementedError

    def filter_pretrained(self, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Tensors of a pretrained checkpoint mapped onto this module's keys and shapes.

        Keys this module does not have are left out (and reported by the loader).
        """
        own = self.state_dict()
        return {k: v for k, v in state.items() if k in own}
