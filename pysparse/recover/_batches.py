"""Batches and outputs: splitting a batch into (inputs, target), calling a model on inputs
that are a tensor, a tuple of tensors or a dict of tensors, and picking the tensor to
distill from what the model returns (a tensor, a tuple, a dict, or a Hugging Face style
model-output object)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

OutputArg = Union[None, str, Callable[[Any], torch.Tensor]]


def split_batch(batch: Any, index: int) -> tuple[Any, Optional[torch.Tensor]]:
    """(inputs, target or None) of one batch.

    A tuple/list of two is (inputs, target) (a DataLoader over a TensorDataset(x, y); target
    may be None); a tuple/list of one is (inputs,); a tensor or a dict is inputs alone."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise TypeError(f"data: batch {index} is a {type(batch).__name__} of {len(batch)} items; a batch is "
                        f"(inputs, target), (inputs,), a tensor or a dict of tensors (give several input "
                        f"tensors as ((x1, x2), target))")
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch, None
    raise TypeError(f"data: batch {index} is a {type(batch).__name__}; a batch is (inputs, target), (inputs,), "
                    f"a tensor or a dict of tensors")


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or tuples / lists / dicts of them) on ``device``; other values unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def call(model: nn.Module, inputs: Any) -> Any:
    """model(inputs): a dict is passed as keyword arguments, a tuple/list as positional ones."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _keys_of(out: Any) -> list[str]:
    if isinstance(out, Mapping):
        return [str(k) for k in out.keys()]
    return [k for k in vars(out) if not k.startswith("_")] if hasattr(out, "__dict__") else []


def pick_output(out: Any, output: OutputArg, who: str) -> torch.Tensor:
    """The tensor to distill from ``out``, what ``who`` ("student" / "teacher") returned.

    output=None: a tensor as is; a Mapping (dict, Hugging Face ModelOutput) its "logits"
    entry, else its only tensor; an object its ``logits`` attribute; a tuple/list its first
    item. output="name": that key (Mappings) or attribute (objects). output=callable: its
    result. Raises KeyError / TypeError naming the key and what the output holds."""
    if callable(output) and not isinstance(output, str):
        t = output(out)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"output= (a function) returned a {type(t).__name__} for the {who}'s output, "
                            f"not a tensor")
        return t
    if output is not None and not isinstance(output, str):
        raise TypeError(f"output must be None, a key / attribute name or a function, got {type(output).__name__}")
    if isinstance(out, torch.Tensor):
        if output is not None:
            raise KeyError(f"output={output!r}: the {who} returned a plain tensor, which has no key {output!r} "
                           f"(leave output=None)")
        return out
    if output is None:
        if isinstance(out, Mapping):
            if "logits" in out:
                t = out["logits"]
            else:
                ts = [v for v in out.values() if isinstance(v, torch.Tensor)]
                if len(ts) != 1:
                    raise KeyError(f"the {who} returned a {type(out).__name__} with keys {_keys_of(out)} and no "
                                   f"'logits': name the one to distill with output='<key>'")
                t = ts[0]
        elif isinstance(out, (tuple, list)):
            if not out:
                raise ValueError(f"the {who} returned an empty {type(out).__name__}")
            t = out[0]
        elif hasattr(out, "logits"):
            t = out.logits
        else:
            raise TypeError(f"the {who} returned a {type(out).__name__}: give output='<key or attribute>' or a "
                            f"function picking the tensor to distill")
    elif isinstance(out, Mapping):
        if output not in out:
            raise KeyError(f"output={output!r}: the {who}'s output ({type(out).__name__}) has no key {output!r}; "
                           f"it has {_keys_of(out)}")
        t = out[output]
    else:
        if not hasattr(out, output):
            raise KeyError(f"output={output!r}: the {who}'s output ({type(out).__name__}) has no attribute "
                           f"{output!r}; it has {_keys_of(out)}")
        t = getattr(out, output)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"the {who}'s output{'' if output is None else f' {output!r}'} is a {type(t).__name__}, "
                        f"not a tensor")
    return t


def batch_size(inputs: Any) -> int:
    """Rows in a batch of inputs (the first tensor's first dimension; 1 if none)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    vals = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in vals:
        n = batch_size(v)
        if n:
            return n
    return 1
