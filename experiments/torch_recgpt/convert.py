"""Parameters between the JAX pure-dict layout (``TrainState.params``) and ``TorchRecGPT``.

The torch module tree mirrors the JAX one, so a torch parameter ``blocks.0.attn.qkv.weight`` is
``params["blocks"][0]["attn"]["qkv"]["kernel"]`` transposed (flax ``Linear`` kernels are ``[in, out]``,
torch ``Linear`` weights ``[out, in]``); embeddings' ``weight`` is ``embedding``, LayerNorm's ``weight``
is ``scale``; biases keep their name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn


def jax_paths(model: nn.Module) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
  """Yields ``(torch name, JAX path, transpose)`` for every parameter of ``model``."""
  modules = dict(model.named_modules())
  for name, _ in model.named_parameters():
    module_name, _, leaf = name.rpartition(".")
    module = modules[module_name]
    path = tuple(int(p) if p.isdigit() else p for p in module_name.split("."))
    if isinstance(module, nn.Embedding):
      yield name, (*path, "embedding"), False
    elif isinstance(module, nn.LayerNorm):
      yield name, (*path, "scale" if leaf == "weight" else "bias"), False
    elif isinstance(module, nn.Linear):
      yield name, (*path, "kernel" if leaf == "weight" else "bias"), leaf == "weight"
    else:
      raise TypeError(f"no JAX layout for parameter {name} of a {type(module).__name__}")


def _get(tree: Mapping, path: tuple[Any, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[Any, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_jax_params(model: nn.Module, params: Mapping) -> None:
  """Copies JAX parameters (``nnx.to_pure_dict`` layout, arrays of any kind) into ``model`` in place.

  Raises:
    KeyError: a torch parameter has no JAX counterpart.
    ValueError: the JAX tree has parameters the torch model lacks, or shapes differ.
  """
  seen = set()
  with torch.no_grad():
    for name, path, transpose in jax_paths(model):
      value = np.asarray(_get(params, path), dtype=np.float32)
      value = np.array(value.T if transpose else value, dtype=np.float32, order="C")  # a writable copy
      target = model.get_parameter(name)
      if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{name}: JAX shape {value.shape} (as torch) != torch shape {tuple(target.shape)}")
      target.copy_(torch.from_numpy(value))
      seen.add(path)
  extra = sorted(str(p) for p in _leaf_paths(params) if p not in seen)
  if extra:
    raise ValueError(f"JAX parameters without a torch counterpart: {extra}")


def _leaf_paths(tree: Mapping, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, (*prefix, key))
    else:
      yield (*prefix, key)


def tensors_as_jax(model: nn.Module, tensors: Mapping[str, torch.Tensor | None]) -> dict:
  """Lays out per-parameter tensors of ``model`` (keyed by parameter name, e.g. gradients) as a JAX tree
  of float32 numpy arrays; ``None`` entries (no gradient) become zeros."""
  out: dict = {}
  for name, path, transpose in jax_paths(model):
    value = tensors[name]
    if value is None:
      value = torch.zeros_like(model.get_parameter(name))
    array = value.detach().cpu().numpy().astype(np.float32)
    _set(out, path, array.T if transpose else array)
  return out


def torch_params_as_jax(model: nn.Module) -> dict:
  """The model's parameters in the JAX pure-dict layout (float32 numpy arrays)."""
  return tensors_as_jax(model, dict(model.named_parameters()))


def torch_grads_as_jax(model: nn.Module) -> dict:
  """The parameters' current ``.grad`` in the JAX layout (zeros where there is none)."""
  return tensors_as_jax(model, {name: p.grad for name, p in model.named_parameters()})
