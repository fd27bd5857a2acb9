"""Tracing with torch.fx (errors name the module that failed) and one shape-recording run."""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn

from ._types import ChannelGraphError, NotTraceableError, _where


class _Tracer(fx.Tracer):
    """fx.Tracer that stamps every node with the module whose forward created it (errors name
    the layer) and remembers the innermost module being traced when tracing fails."""

    def __init__(self):
        super().__init__()
        self._stack: list[str] = [""]
        self.failed_in: Optional[tuple[str, str]] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a PackedConv2d is a Conv2d to the channel graph (a re-compacted model keeps its convs as modules)
        from ..nn import PackedConv2d

        return isinstance(m, PackedConv2d) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (name, type(m).__name__)
            raise
        finally:
            self._stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["pysparse_scope"] = self._stack[-1]
        return node


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; a failure names the module that did not trace."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        name, cls = tracer.failed_in or ("", type(model).__name__)
        where = f"module '{name}' ({cls})" if name else f"the model's own forward ({cls})"
        raise NotTraceableError(
            f"torch.fx could not trace the model: {where} failed: {type(e).__name__}: {e}. "
            f"Channel pruning and compaction need a traceable model: rewrite that forward without Python "
            f"control flow on tensor values or shapes (use torch.where, or decide it in __init__), and "
            f"without calls fx cannot record (see the torch.fx 'Limitations of Symbolic Tracing' docs)."
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs), "
                    f"got {type(example_inputs).__name__}")


class _ShapeProp(fx.Interpreter):
    """Run the graph once, recording each node's output shape(s) in node.meta."""

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as e:
            raise ChannelGraphError(
                f"example_inputs do not fit the model: running it on input shapes {self._shapes} failed at "
                f"{_where(n)}: {type(e).__name__}: {e}") from e
        n.meta["pysparse_shape"] = _shape_of(out)
        return out

    def run(self, *args):
        self._shapes = [tuple(a.shape) for a in args]
        try:
            return super().run(*args)
        except ChannelGraphError as e:
            # fx's interpreter appends "While executing %node ... Original traceback: None" to
            # the message; the node is named in it already
            if e.args and isinstance(e.args[0], str):
                e.args = (e.args[0].split("\n\nWhile executing")[0],) + e.args[1:]
            raise


def _shape_of(v):
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(tuple(t.shape) for t in v)
    return None


def _run_shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args and not n.target.startswith("*")]
    varargs = any(n.target.startswith("*") for n in placeholders)
    if not varargs and not len(required) <= len(inputs) <= len(placeholders):
        names = ", ".join(n.target for n in placeholders)
        raise ChannelGraphError(f"example_inputs has {len(inputs)} tensors but the model's forward takes "
                                f"{len(required)} to {len(placeholders)} inputs ({names})")
    # eval + no_grad: a forward in train mode would update the user's BatchNorm statistics
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _ShapeProp(gm).run(*inputs)
    finally:
        for m, t in modes.items():
            m.training = t
