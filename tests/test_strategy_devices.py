"""Every aggregation strategy runs on the device its updates are on.

A CPU machine has no second device that holds values: ``meta`` tensors have none, so PF-MSMTrec's
strategy cannot run on them (its simplex solve reads ``G Gᵀ`` as numpy, and it branches on values:
``‖G w‖ == 0``, the learnt weights' ``float(Δ · d)``). :class:`OnDevice` stands in for an
accelerator instead: a tensor that reports device ``meta`` but keeps its values in a CPU tensor.
Under :func:`accelerator` every op follows CUDA's device rules — mixing it with a CPU tensor of
one or more dimensions raises, ``.numpy()`` raises, factories and ``.to`` with ``device=meta``
create on it, ``.cpu()`` copies back — so a strategy that creates a tensor on the CPU and meets
an update with it fails here as it fails on a GPU. With CUDA present, the same test also runs on
``cuda``.
"""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from recbole_cmr.federated.strategy import FitRes, get_strategy, strategy_names

aten = torch.ops.aten
DEVICE = torch.device("meta")
CPU = torch.device("cpu")


class OnDevice(torch.Tensor):
    """A tensor on ``meta`` whose values live in the CPU tensor ``inner`` (same shape, dtype)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=DEVICE, strides=inner.stride())

    def __init__(self, inner):
        self.inner = inner

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() "
                        "to copy the tensor to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with DeviceRules():
            return func(*args, **(kwargs or {}))


def _unwrap(value):
    return value.inner if isinstance(value, OnDevice) else value


def _wrap(value):
    return OnDevice(value) if type(value) is torch.Tensor else value


def _on(kwargs, device):
    return "device" in kwargs and kwargs["device"] is not None and \
        torch.device(kwargs["device"]).type == device.type


class Factories(TorchFunctionMode):
    """A torch function called with ``device=meta`` (``torch.tensor``, ``torch.zeros``, ...)
    creates on the CPU and returns :class:`OnDevice` tensors (``torch.tensor`` would copy its
    values to a real meta tensor before any dispatch mode saw them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not _on(kwargs, DEVICE):
            return func(*args, **kwargs)
        kwargs["device"] = CPU
        return pytree.tree_map(_wrap, func(*args, **kwargs))


@contextlib.contextmanager
def accelerator():
    """:class:`Factories` and :class:`DeviceRules`: ``meta`` behaves as an accelerator."""
    with Factories(), DeviceRules():
        yield


class DeviceRules(TorchDispatchMode):
    """Runs :class:`OnDevice` ops on their CPU values with CUDA's device rules."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = pytree.tree_leaves((args, kwargs))
        on_device = any(isinstance(x, OnDevice) for x in leaves)
        host = [x for x in leaves if type(x) is torch.Tensor and x.dim() > 0]
        if func is aten._to_copy.default and _on(kwargs, CPU):
            return func(*pytree.tree_map(_unwrap, args), **kwargs)
        if on_device and host and func not in (aten._to_copy.default, aten.copy_.default):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at "
                               f"least two devices, {DEVICE} and cpu! ({func})")
        to_device = _on(kwargs, DEVICE)
        if to_device:
            kwargs["device"] = CPU
        out = func(*pytree.tree_map(_unwrap, args), **pytree.tree_map(_unwrap, kwargs))
        if func is aten._local_scalar_dense.default or not (on_device or to_device):
            return out
        if args and isinstance(args[0], OnDevice) and out is args[0].inner:  # in place
            return args[0]
        return pytree.tree_map(_wrap, out)


# ---- updates shaped like PF-MSMTrec's (expert groups, a tower layer) and a sequential model's
SHAPES = {"experts.shared.0.linear_0.weight": (3, 2), "experts.shared.1.linear_0.weight": (3, 2),
          "towers.0.linear_0.weight": (2, 2), "gates.0.weight": (2, 4), "item_embedding.weight": (5, 2)}
COUNTS = {"in": 3, "jp": 1, "de": 2}


def _updates(round_idx, starts):
    """``[FitRes(client_id, update, num_examples, metrics)]``: from its start, every client moves
    every float tensor but the embedding, of which it moves its own row only (the others stay),
    and counts its steps (in the tensor ``steps`` and as ``num_steps``)."""
    generator = torch.Generator().manual_seed(round_idx)
    results = []
    for k, (cid, count) in enumerate(COUNTS.items()):
        start = starts[cid]
        update = {n: t + torch.randn(t.shape, generator=generator)
                  for n, t in start.items() if t.is_floating_point()}
        rows = torch.zeros(start["item_embedding.weight"].shape[0], 1)
        rows[k] = 1.0
        update["item_embedding.weight"] = start["item_embedding.weight"] + rows * torch.randn(
            start["item_embedding.weight"].shape, generator=generator)
        update["steps"] = start["steps"] + count
        change = {n: torch.randn(t.shape, generator=generator) for n, t in start.items()
                  if t.is_floating_point()}  # SCAFFOLD's control-variate change
        results.append(FitRes(cid, update, count, {"loss": 0.0, "num_steps": 2.0 * count}, change))
    return results


def _two_rounds(name, rowwise, to):
    """What strategy ``name`` returns in two rounds, computed on the tensors ``to`` places."""
    strategy = get_strategy(name)({"fed_rowwise": rowwise, "proximal_mu": 0.1})
    generator = torch.Generator().manual_seed(0)
    current = {n: torch.randn(shape, generator=generator) for n, shape in SHAPES.items()}
    current["steps"] = torch.tensor(0)
    personal, returned = {}, []
    for round_idx in range(2):
        starts = {cid: {**current, **personal.get(cid, {})} for cid in COUNTS}
        results = [FitRes(cid, {n: to(t) for n, t in update.items()}, count, result.metrics,
                          {n: to(t) for n, t in result.extra.items()})
                   for result in _updates(round_idx, starts) for cid, update, count in [result]]
        if getattr(strategy, "personalized", False):
            strategy.configure_round(round_idx, {n: to(t) for n, t in current.items()},
                                     {cid: {n: to(t) for n, t in s.items()} for cid, s in starts.items()})
            uniform, own = strategy.aggregate(round_idx, results)
            returned += [uniform, *own.values()]
            personal = {cid: {n: _unwrap(t).cpu() for n, t in p.items()} for cid, p in own.items()}
        else:
            strategy.configure_round(round_idx, {n: to(t) for n, t in current.items()})
            uniform = strategy.aggregate(round_idx, results)
            returned.append(uniform)
        current = {**current, **{n: _unwrap(t).cpu() for n, t in uniform.items()}}
    return returned


DEVICES = ["accelerator", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
CASES = [(name, rowwise) for name in strategy_names() for rowwise in (False, True)
         if not rowwise or getattr(get_strategy(name), "supports_rowwise", False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,rowwise", CASES)
def test_every_strategy_aggregates_on_the_device_of_its_updates(name, rowwise, device):
    """Two rounds of each registered strategy (each with and without ``fed_rowwise`` where it
    has it) on updates on ``device``: no device error, every returned tensor on that device, and
    the values of the same rounds on the CPU."""
    if device == "cuda":
        to, mode = (lambda t: t.cuda()), torch.cuda.device(0)
    else:
        to, mode = (lambda t: OnDevice(t.clone())), accelerator()
    with mode:
        on_device = _two_rounds(name, rowwise, to)
    on_cpu = _two_rounds(name, rowwise, lambda t: t.clone())
    assert len(on_device) == len(on_cpu)
    for got, expected in zip(on_device, on_cpu):
        assert set(got) == set(expected)
        for n, tensor in got.items():
            assert tensor.device.type == ("cuda" if device == "cuda" else DEVICE.type), n
            values = _unwrap(tensor).cpu()
            assert values.dtype == expected[n].dtype
            assert torch.allclose(values.double(), expected[n].double(), rtol=1e-9, atol=1e-12), n


def test_the_accelerator_stand_in_raises_where_cuda_does():
    """The stand-in device catches the two kinds of bug it is here for."""
    with accelerator():
        x = OnDevice(torch.ones(3, 2))
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(3, 1) * x  # a [C, 1] tensor made on the CPU meets an update
        with pytest.raises(TypeError, match="numpy"):
            (x @ x.T).numpy()
        y = torch.ones(3, 1, device=x.device) * x + torch.tensor(2.0)  # 0-dim CPU: allowed
        assert isinstance(y, OnDevice) and float(y.sum()) == 18.0
        assert type(y.cpu()) is torch.Tensor and isinstance(torch.ones(2).to(x), OnDevice)
