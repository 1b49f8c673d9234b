"""Training stages: what each one trains on and where it starts.

A stage owns its input view (the real sequences, or the prompted view of ``recgpt_jax.data.prompts``), its
batch transform (prompt generation inside the step, or none), the targets its loss reads, and its warm start.
Every stage can start from another run's model (``config.init_from``); the stages that continue a trained
model require it.

* ``pretrain``: next-item prediction on the real sequences; fresh initialisation unless ``init_from`` is set.
* ``finetune``: the same input and loss as ``pretrain``, started from ``init_from``. With the optimiser,
  schedule and loss of a prompt-tuning config it is the control that isolates the prompts: everything of
  prompt-tuning but the prompts.
* ``prompt_tune``: RecGPT's stage. The step generates prompts with the current parameters and trains on the
  prompted view; started from ``init_from``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from recgpt_jax import config as config_lib
from recgpt_jax.errors import ConfigError
from recgpt_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage.

  Attributes:
    name: the ``--mode`` that runs it.
    prompted: trains on the prompted view, with prompts generated in the step.
    needs_init: must start from ``config.init_from`` (a trained model).
  """

  name: str
  prompted: bool
  needs_init: bool

  def prompt_config(self, config: ml_collections.ConfigDict) -> step_lib.PromptConfig | None:
    """The step's prompt settings; None for a stage without prompts."""
    return step_lib.PromptConfig(**config.prompt) if self.prompted else None

  def input_view(self, config: ml_collections.ConfigDict) -> dict:
    """Keyword arguments of ``pipeline.TrainInput`` that select the view the stage trains on."""
    if not self.prompted:
      return {"prompt_mode": None, "prompt_width": 1}
    return {"prompt_mode": config.prompt.mode, "prompt_width": config.prompt.width}

  @property
  def targets_key(self) -> str:
    """The batch entry holding the targets the loss is computed on."""
    return "p_targets" if self.prompted else "targets"

  def check(self, config: ml_collections.ConfigDict, num_items: int) -> None:
    """Raises ConfigError (one line) when this stage cannot run with ``config`` on a catalogue of ``num_items``.

    Called by ``loop.build_data`` as soon as the data is loaded, so before any training (and before evaluation
    or recommendations, which build the same run).
    """
    config_lib.check_catalogue(config, num_items)
    if self.needs_init and not config.init_from:
      raise ConfigError(f"--mode={self.name} starts from a trained model: set --config.init_from=<workdir>")
    if self.prompted and num_items <= config.max_len * (config.prompt.width + 1):
      raise ConfigError(
        f"prompt-tuning needs more than max_len * (prompt.width + 1) = {config.max_len * (config.prompt.width + 1)}"
        f" items so a prompt never has to repeat its prefix; the data has {num_items}"
      )


STAGES: dict[str, Stage] = {
  s.name: s
  for s in (
    Stage("pretrain", prompted=False, needs_init=False),
    Stage("finetune", prompted=False, needs_init=True),
    Stage("prompt_tune", prompted=True, needs_init=True),
  )
}


def get(name: str) -> Stage:
  """The stage called ``name``; ConfigError for an unknown one."""
  if name not in STAGES:
    raise ConfigError(f"unknown training stage {name!r}; expected one of {', '.join(STAGES)}")
  return STAGES[name]
