"""recover: fine-tune a compressed student by distillation from its teacher."""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import _distributed as dist
from ._batches import OutputArg, call, pick_output, split_batch, to_device
from ._bn import recalibrate_batchnorm
from ._features import FeaturesArg, Tap, feature_loss, make_projection, normalize_features
from ._loss import check_loss_args, distillation_loss
from ._trainable import finish, prepare

DEFAULT_LR = 1e-4  # Adam; fine-tuning a pretrained model wants 1e-5..1e-4, a small CNN tolerates 1e-3
BN_BATCHES = 100  # batches of data recover's BatchNorm recalibration reads (exact sums over them)
_END = object()


class _Trainee(nn.Module):
    """The student with the feature projections: one module for DDP (every trained parameter
    is used inside its forward, so DDP's gradient all-reduce sees them all)."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList, tap: Optional[Tap], names: list[str],
                 output: OutputArg) -> None:
        super().__init__()
        self.student, self.projections = student, projections
        self._tap, self._names, self._output = tap, names, output

    def forward(self, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = pick_output(call(self.student, inputs), self._output, "student")
        feats = self._tap.take() if self._tap is not None else {}
        proj = []
        for i, n in enumerate(self._names):
            f = feats[n]
            p = self.projections[i]
            proj.append(p(f.float()) if not isinstance(p, nn.Identity) else f)
        return out, proj


def _check_count(v: Any, name: str) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
    return v


def _make_optimizer(optimizer: Any, params: list[nn.Parameter], lr: Optional[float]) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(params, lr=DEFAULT_LR if lr is None else lr)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr) if lr is not None else optimizer(params)
    opt = optimizer(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}")
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    return opt


def _device_of(m: nn.Module) -> torch.device:
    for t in itertools.chain(m.parameters(), m.buffers()):
        return t.device
    return torch.device("cpu")


def _restore(model: nn.Module, snapshot: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``model`` (the object) what ``snapshot`` (its deep copy taken before) was. The
    parameter and buffer objects it had (``tensors``, by name) are put back with the snapshot's
    values, so what holds them (the user's optimizer, a DDP wrapper) still holds the model's."""
    model.__class__ = snapshot.__class__
    model.__dict__.clear()
    model.__dict__.update(snapshot.__dict__)
    with torch.no_grad():
        for name, t in tensors.items():
            owner, _, leaf = name.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            store = mod._parameters if leaf in mod._parameters else mod._buffers
            cur = store.get(leaf)
            if cur is None or cur.shape != t.shape or cur.dtype != t.dtype:
                continue
            t.copy_(cur)
            store[leaf] = t


def recover(student: nn.Module, teacher: nn.Module, data: Iterable[Any], *, epochs: Optional[int] = None,
            steps: Optional[int] = None, lr: Optional[float] = None, temperature: float = 2.0, alpha: float = 0.5,
            loss: str = "kl", features: FeaturesArg = None, prune_schedule: Any = None, output: OutputArg = None,
            optimizer: Union[None, type, Callable[[list], torch.optim.Optimizer]] = None,
            bn_recalibrate: bool = True, progress: bool = True,
            device: Union[None, str, torch.device] = None) -> nn.Module:
    """Fine-tune a pruned, compacted or quantized ``student`` by distillation from ``teacher``
    (its original); returns the student, trained in place.

    data: an iterable of batches: (inputs, target) pairs (a DataLoader over a TensorDataset),
      (inputs,), or bare inputs; inputs a tensor, a tuple of tensors (positional arguments) or
      a dict of tensors (keyword arguments: Hugging Face models). Iterated once per epoch.
    epochs / steps: passes over data / optimizer steps; give at least one (ValueError
      otherwise: how long to train is the caller's choice); with both, training stops at
      whichever ends first; steps alone cycles through data as often as needed.
    lr: the learning rate (> 0); None: 1e-4 with the default Adam, or the optimizer's own.
    optimizer: None (Adam), a torch.optim.Optimizer class (called as cls(params, lr=lr)), or
      a function params -> optimizer (lr, if given, then set on every group). Not an
      optimizer instance: recover trains parameters it creates (float shadows, projections).
    temperature, alpha, loss: the distillation loss (``distillation_loss``): alpha * soft +
      (1 - alpha) * hard, soft = KL(teacher / T || student / T) * T^2 (loss="kl") or MSE on the
      logits (loss="mse"); hard = cross-entropy with the batch's labels (MSE for a float
      target); batches without targets train on the soft term alone.
    features: feature matching on named layers: {student layer: teacher layer} (a value may be
      (teacher layer, weight)) or a list of names both have; MSE between the outputs (forward
      hooks), added to the loss. Where only the width differs (a compacted student's fewer
      channels) a learned projection maps the student's to the teacher's (a 1x1 conv for
      [N, C, H, W] maps, a Linear on the last dimension otherwise), trained alongside.
    prune_schedule: any object with .step() (pysparse.prune.CubicSchedule), called after each
      optimizer step; it prunes the student itself (gradual pruning during recovery).
    output: what to distill when a model returns more than a tensor: a key (dict, ModelOutput)
      or attribute name, or a function out -> tensor; None takes a tensor as is, "logits" of a
      dict / object, a dict's only tensor, a tuple's first item.
    bn_recalibrate: at the end, recompute BatchNorm statistics over up to 100 batches of data
      (``recalibrate_batchnorm``). progress: a tqdm bar (loss shown). device: where to train
      (the student is moved there, as .to() does); None: the student's device. The teacher
      stays where it is (inputs are copied to its device), in eval mode under no_grad.

    What the student may hold: pysparse masks (torch.nn.utils.parametrize) are kept - the
    optimizer moves the unmasked original, the masked weights stay 0; int8 layers
    (Int8Linear, Int8Conv2d, BsrInt8Linear, DenseInt8KeptLinear) train through float
    shadows with fake quantization (quantization-aware, straight-through rounding; static
    activation scales kept) and are re-quantized into the same kinds and configs at the end
    (block-sparse int8 keeps its block pattern); CompactConv2d trains through a PyTorch-ops
    stand-in; BsrLinear trains as it is; DenseKeptLinear keeps its pruned blocks at 0.

    Distributed: when torch.distributed is initialised (or the student is a
    DistributedDataParallel), the student is trained in DDP and the data sharded: a
    DataLoader with a DistributedSampler is used as given, one with the default sampler is
    rebuilt with a DistributedSampler keeping its per-process batch_size (global batch =
    world * batch_size, as under PyTorch Lightning); other iterables are taken as each
    process's own shard. BatchNorm statistics are recalibrated over all processes' batches.
    A DDP student is returned as given (its module trained).

    Errors: every argument is checked, and the first batch run through both models (output
    keys, the teacher's output shape against the student's, feature shapes), before anything
    changes; ValueError / TypeError / KeyError naming what is wrong. Empty data, lr <= 0,
    neither epochs nor steps, a missing output key, a non-finite loss: the student is left as
    it was (restored from a copy taken at the start: memory for one more copy of it).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    user_ddp = student if isinstance(student, DDP) else None
    inner = student.module if user_ddp is not None else student
    if not isinstance(inner, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if isinstance(teacher, DDP):
        teacher = teacher.module
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    epochs, steps = _check_count(epochs, "epochs"), _check_count(steps, "steps")
    if epochs is None and steps is None:
        raise ValueError("give epochs= (passes over data) or steps= (optimizer steps): recover has no default "
                         "training length")
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        lr = float(lr)
    if optimizer is not None and isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer must be an optimizer class (torch.optim.SGD) or a function params -> optimizer, "
                        "not an instance: recover trains parameters it creates (float shadows of int8 layers, "
                        "feature projections)")
    if optimizer is not None and not callable(optimizer):
        raise TypeError(f"optimizer must be None, an optimizer class or a function, got {type(optimizer).__name__}")
    temperature, alpha = check_loss_args(temperature, alpha, loss)
    if prune_schedule is not None and not callable(getattr(prune_schedule, "step", None)):
        raise TypeError(f"prune_schedule must have a .step() method (pysparse.prune.CubicSchedule), got "
                        f"{type(prune_schedule).__name__}")
    if data is None or isinstance(data, (torch.Tensor, str)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of batches (a DataLoader), got {type(data).__name__}")
    pairs = normalize_features(features, inner, teacher)
    device = torch.device(device) if device is not None else _device_of(inner)
    t_device = _device_of(teacher)
    distributed = dist.is_distributed() or user_ddp is not None
    if user_ddp is not None and not dist.is_distributed():
        raise ValueError("student is a DistributedDataParallel but torch.distributed is not initialised")
    rank, _ = dist.rank_and_world()
    data = dist.shard(data)

    # ------------------------------------------------ the first batch, before anything changes
    dist.set_epoch(data, 0)
    it = iter(data)
    first = next(it, _END)
    if first is _END:
        raise ValueError("data is empty: it gave no batches")
    s_names, t_names = [p[0] for p in pairs], [p[1] for p in pairs]
    s_tap = Tap(inner, s_names, detach=True) if pairs else None  # the first batch's; re-tapped below
    t_tap = Tap(teacher, t_names, detach=True) if pairs else None
    s_modes = {m: m.training for m in inner.modules()}
    t_modes = {m: m.training for m in teacher.modules()}
    snapshot, tensors = None, {}
    try:
        inputs, target = split_batch(first, 0)
        try:
            with torch.no_grad():
                inner.eval()
                teacher.eval()
                s0 = pick_output(call(inner, to_device(inputs, _device_of(inner))), output, "student")
                t0 = pick_output(call(teacher, to_device(inputs, t_device)), output, "teacher")
                distillation_loss(s0, t0.to(s0.device), None if target is None else to_device(target, s0.device),
                                  temperature=temperature, alpha=alpha, loss=loss)
                s_feats = s_tap.take() if s_tap else {}
                t_feats = t_tap.take() if t_tap else {}
        finally:
            for m, t in s_modes.items():
                m.training = t
            if s_tap is not None:
                s_tap.remove()
                s_tap = None
        for s_name, t_name, _ in pairs:
            for who, name, got in (("student", s_name, s_feats), ("teacher", t_name, t_feats)):
                if name not in got:
                    raise ValueError(f"features: the {who}'s layer {name!r} did not run on the first batch")
        projections = nn.ModuleList([make_projection(s_feats[s], t_feats[t].to(s_feats[s].device), (s, t))
                                     or nn.Identity() for s, t, _ in pairs])
        del s0, t0, s_feats, t_feats

        # ------------------------------------------------ train (in place; a copy to go back to)
        tensors = {**dict(inner.named_parameters(remove_duplicate=False)),
                   **{n: b for n, b in inner.named_buffers(remove_duplicate=False) if b is not None}}
        snapshot = copy.deepcopy(inner)
        if teacher is inner:  # self-distillation: the teacher must not move with the student
            teacher = snapshot
            if t_tap is not None:
                t_tap.remove()
                t_tap = Tap(teacher, t_names, detach=True)
        trained, masked, _ = prepare(inner)
        trained.to(device)
        projections.to(device)
        s_tap = Tap(trained, s_names, detach=False) if pairs else None  # on the stand-ins, where swapped
        trainee = _Trainee(trained, projections, s_tap, s_names, output)
        model = dist.wrap(trainee, device, user_ddp) if distributed else trainee
        params = [p for p in trainee.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameter")
        opt = _make_optimizer(optimizer, params, lr)
        trained.train()
        teacher.eval()
        total = steps if steps is not None else (epochs * len(data) if hasattr(data, "__len__") else None)
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pysparse recover", unit="step", disable=not progress or rank != 0)
        step = 0
        epoch = 0
        try:
            while True:
                batches = itertools.chain([first], it) if epoch == 0 else iter(data)
                n = 0
                for i, batch in enumerate(batches):
                    inputs, target = split_batch(batch, i)
                    with torch.no_grad():
                        t_out = pick_output(call(teacher, to_device(inputs, t_device)), output, "teacher")
                    t_feats = t_tap.take() if t_tap else {}
                    s_out, s_proj = model(to_device(inputs, device))
                    total_loss = distillation_loss(s_out, t_out.to(s_out.device),
                                                   None if target is None else to_device(target, s_out.device),
                                                   temperature=temperature, alpha=alpha, loss=loss)
                    for (s_name, t_name, w), f in zip(pairs, s_proj):
                        if w:
                            total_loss = total_loss + w * feature_loss(f, t_feats[t_name])
                    if not torch.isfinite(total_loss):
                        raise FloatingPointError(f"recover: the loss is {total_loss.item()} at step {step} "
                                                 f"(epoch {epoch}, batch {i}); lower lr? the student is left "
                                                 f"as it was")
                    opt.zero_grad(set_to_none=True)
                    total_loss.backward()
                    opt.step()
                    step += 1
                    n += 1
                    if prune_schedule is not None:
                        prune_schedule.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{total_loss.item():.4f}", refresh=False)
                    if steps is not None and step >= steps:
                        break
                if epoch == 0:
                    if distributed and steps is None:
                        dist.check_same_length(n)
                elif n == 0:
                    raise ValueError(f"data gave no batches in epoch {epoch} (after {step} steps): give a "
                                     f"re-iterable (a DataLoader, a list), not a one-shot iterator")
                epoch += 1
                if (steps is not None and step >= steps) or (epochs is not None and epoch >= epochs):
                    break
                dist.set_epoch(data, epoch)
        finally:
            bar.close()
        trained = finish(trained, masked)
        if trained is not inner:  # the student was itself an int8 / compact layer
            inner.load_state_dict(trained.state_dict())
        if bn_recalibrate and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in inner.modules()):
            if iter(data) is data:
                warnings.warn("recover: data is a one-shot iterator, spent by training: BatchNorm not "
                              "recalibrated (give a DataLoader or a list, or call recalibrate_batchnorm)",
                              stacklevel=2)
            else:
                recalibrate_batchnorm(inner, data, batches=BN_BATCHES, device=device)
    except BaseException:
        if snapshot is not None:
            _restore(inner, snapshot, tensors)
        raise
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
        for m, t in t_modes.items():
            m.training = t
    for m, t in s_modes.items():  # modules swapped and back are new: they take eval, as given
        m.training = t
    for m in inner.modules():
        if m not in s_modes:
            m.training = inner.training
    return student
