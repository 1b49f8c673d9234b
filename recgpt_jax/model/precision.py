"""Mixed precision: the dtype policy of the model, in one place.

``model.dtype`` is the dtype of activations and of the matmuls that make them (``bfloat16`` is the
recommended setting on TPU and GPU); ``model.param_dtype`` is the dtype of the stored parameters (float32
master weights, so optimizer state and updates stay float32). What stays float32 whatever ``model.dtype``:

* LayerNorm statistics (mean and variance; the normalised output is cast to ``model.dtype``);
* attention logits, the softmax and its normaliser (the weights are cast back for the value product);
* all of Flow-Attention (sigmoid features, the flow normalisers, every prefix sum and the carried state):
  its normalisers divide by sums over up to ``L`` tokens, which bfloat16's 8-bit mantissa cannot hold;
* item scores: the product of hidden states and the item table accumulates and returns float32
  (``item_scores``), so log-sum-exp, the losses, top-k scores and ranking metrics are float32;
* parameters, gradients (the cast back to ``param_dtype``) and optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recgpt_jax.errors import ConfigError

# float8 and float64 are excluded: XLA has no float8 training path here, and float64 needs jax_enable_x64.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def to_dtype(name: str, field: str = "model.dtype") -> jnp.dtype:
  """The JAX dtype named ``name``; a ``ConfigError`` (one line) if it is not one of ``FLOAT_DTYPES``."""
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    raise ConfigError(f"{field}={name!r} is not a dtype; expected one of {FLOAT_DTYPES}") from None
  if not jnp.issubdtype(dtype, np.floating) or dtype.name not in FLOAT_DTYPES:
    raise ConfigError(f"{field}={name!r} is not a supported float type; expected one of {FLOAT_DTYPES}")
  return dtype


def item_scores(hidden: jax.Array, table_vd: jax.Array, bias_v: jax.Array | None = None) -> jax.Array:
  """Scores ``[..., V]`` = ``hidden @ table.T (+ bias)`` in float32.

  The table is cast to the hidden states' dtype (a bfloat16 product on the accelerator's matrix units)
  and the product accumulates and returns float32, so everything downstream (softmax, top-k) is float32.
  """
  scores = jnp.einsum("...d,vd->...v", hidden, table_vd.astype(hidden.dtype), preferred_element_type=jnp.float32)
  if bias_v is not None:
    scores = scores + bias_v.astype(jnp.float32)
  return scores
