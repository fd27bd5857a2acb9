"""The distillation loss: soft targets (KL at a temperature, or MSE on logits) mixed with
hard labels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOSSES = ("kl", "mse")


def check_loss_args(temperature: float, alpha: float, loss: str) -> tuple[float, float]:
    """(temperature, alpha) as floats; ValueError naming the argument otherwise."""
    try:
        t, a = float(temperature), float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"temperature and alpha must be numbers, got {temperature!r}, {alpha!r}") from None
    if not t > 0 or t == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the soft, distilled term), got {alpha!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return t, a


def hard_loss(student_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class targets (logits [..., C], target [...]); MSE for a
    float target of the output's shape."""
    if target.dtype.is_floating_point and target.shape == student_out.shape:
        return F.mse_loss(student_out.float(), target.float())
    if target.dtype.is_floating_point:
        raise ValueError(f"target: a float target must have the student output's shape "
                         f"{list(student_out.shape)} (regression, MSE), got {list(target.shape)}; class labels "
                         f"must be integers")
    c = student_out.shape[-1]
    if tuple(target.shape) != tuple(student_out.shape[:-1]):
        raise ValueError(f"target: class labels of shape {list(target.shape)} do not match the student's output "
                         f"{list(student_out.shape)} (expected labels of shape {list(student_out.shape[:-1])})")
    return F.cross_entropy(student_out.float().reshape(-1, c), target.reshape(-1).long())


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, target: Optional[torch.Tensor] = None,
                      *, temperature: float = 2.0, alpha: float = 0.5, loss: str = "kl") -> torch.Tensor:
    """alpha * soft + (1 - alpha) * hard (soft alone when ``target`` is None).

    soft, loss="kl": KL(softmax(teacher / T) || softmax(student / T)) * T^2 (Hinton et al. 2015:
    the T^2 keeps the soft gradients' size independent of T), averaged over rows (all leading
    dimensions: [batch, classes] or [batch, tokens, vocab]); loss="mse": the mean squared error
    between the logits (or embeddings). hard: cross-entropy on integer labels, MSE on a float
    target of the output's shape. student_out and teacher_out must have the same shape
    (ValueError naming both otherwise); the teacher's side carries no gradient.
    """
    temperature, alpha = check_loss_args(temperature, alpha, loss)
    if not isinstance(student_out, torch.Tensor) or not isinstance(teacher_out, torch.Tensor):
        raise TypeError(f"student_out and teacher_out must be tensors, got {type(student_out).__name__} and "
                        f"{type(teacher_out).__name__}")
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"the teacher's output has shape {list(teacher_out.shape)} but the student's has "
                         f"{list(student_out.shape)}: distillation needs the same shape (pick matching outputs "
                         f"with output=)")
    s = student_out.float()
    t = teacher_out.detach().float().to(s.device)
    if loss == "kl":
        c = s.shape[-1] if s.dim() else 1
        ls = F.log_softmax(s.reshape(-1, c) / temperature, dim=-1)
        lt = F.log_softmax(t.reshape(-1, c) / temperature, dim=-1)
        soft = F.kl_div(ls, lt, reduction="batchmean", log_target=True) * temperature ** 2
    else:
        soft = F.mse_loss(s, t)
    if target is None or alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * hard_loss(student_out, target.to(s.device))
