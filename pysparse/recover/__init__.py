"""Recovery: win back the accuracy compression cost, by distillation from the original.

- ``recover(student, teacher, data, ...)``: fine-tune a pruned, compacted or quantized student
  on the teacher's soft targets (and the labels, and named features), int8 layers through
  float shadows (quantization-aware), masks kept, BatchNorm recalibrated, under
  torch.distributed too (``_recover``);
- ``distillation_loss``: the loss alone (``_loss``);
- ``recalibrate_batchnorm``: BatchNorm statistics for the weights as they are now (``_bn``).
"""
from __future__ import annotations

from ._bn import recalibrate_batchnorm
from ._loss import distillation_loss
from ._recover import recover

__all__ = ["recover", "distillation_loss", "recalibrate_batchnorm"]
