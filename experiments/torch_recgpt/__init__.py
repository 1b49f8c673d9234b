"""A PyTorch implementation of RecGPT written from the JAX code's spec, for parity tests and benchmarks.

* ``model``: ``TorchRecGPT`` (softmax and causal Flow-Attention over packed rows, user module, segments,
  tied and untied heads), configured by ``recgpt_jax.model.transformer.ModelConfig``.
* ``steps``: the pre-training and prompt-tuning train steps (eager or ``torch.compile``), the optimizer,
  and the full-ranking evaluation step.
* ``convert``: copying parameters between the JAX pure-dict layout and the torch model.

Importing this package needs ``torch``; ``recgpt_jax`` itself never imports it.
"""
