"""Config schema: every field a run reads, with its default and meaning.

Experiment files in ``experiments/configs/`` start from :func:`base_config` and override fields; any
field can also be set on the command line with ``--config.<field>=<value>``. Fields not defined here are
rejected, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from recgpt_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """The documented defaults (a small, fast model; see experiments/configs for real runs)."""
  c = ml_collections.ConfigDict()
  c.name = "run"  # run name, used for the results file name
  c.dataset = "Beauty"  # bundled dataset name (Beauty, Sports_and_Outdoors, Toys_and_Games, Yelp) or a path
  c.data_format = "auto"  # 'auto', 'text' (RecGPT format) or 'interactions' (CSV/TSV/Parquet user,item,timestamp)
  c.k_core = 0  # k-core filter applied to an interaction log (0 = off)
  c.max_len = 50  # model window: histories are cut to their last max_len items
  c.seed = 0  # parameter init, data order, dropout and negative sampling all derive from it

  c.model = ml_collections.ConfigDict()
  c.model.hidden = 64  # hidden size
  c.model.num_layers = 2  # transformer blocks
  c.model.num_heads = 2  # attention heads
  c.model.ffn = 256  # feed-forward inner size (GELU)
  c.model.attention = "softmax"  # 'softmax' or 'flow' (causal Flow-Attention, as in the reference code)
  # How attention is computed (recgpt_jax/model/attention.py): 'auto'; softmax: 'xla', 'cudnn' (GPU flash
  # attention, bfloat16/float16), 'splash' (TPU Pallas); flow: 'xla' (quadratic form), 'chunked' (linear in
  # length). 'auto' = xla, except flow rows of >= 256 positions without attention dropout are chunked.
  c.model.attention_impl = "auto"
  c.model.flow_chunk = 128  # positions per chunk of the chunked Flow-Attention
  # Mixed precision (recgpt_jax/model/precision.py): activations/matmuls in `dtype` ('bfloat16' recommended on
  # TPU/GPU), parameters and optimizer state in `param_dtype`; norms' statistics, softmax, Flow-Attention,
  # item scores and losses stay float32.
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.norm = "post"  # 'post' (reference: LN after each residual) or 'pre'
  c.model.attn_dropout = 0.5  # dropout on attention weights
  c.model.hidden_dropout = 0.5  # dropout on embeddings and residual branches
  c.model.user_module = True  # add a learned per-user vector at every position
  c.model.user_dropout = 0.0  # training: drop a user's whole user vector with this probability
  c.model.untied_head = False  # also build an untied hidden -> items linear head
  # The item table (and untied head) has round_up(items + 1, vocab_multiple) rows, so it splits evenly over
  # any `model` mesh axis that divides this; the padding rows are never scored. Independent of the mesh, so
  # a checkpoint restores onto any mesh.
  c.model.vocab_multiple = 128

  c.train = ml_collections.ConfigDict()
  c.train.loss = "ce"  # 'ce' (full softmax), 'bce' (reference: one random negative), 'sampled_softmax'
  c.train.num_negatives = 256  # negatives per batch for sampled_softmax (drawn ones; 'mixed' adds the in-batch ones)
  # sampled_softmax negatives: 'uniform', 'popularity' (training frequency), 'in_batch' (the batch's targets) or
  # 'mixed' (in-batch plus num_negatives uniform)
  c.train.negatives = "uniform"
  c.train.logq = True  # sampled_softmax: logQ correction (each negative's logit less log of its expected count)
  # ce: > 0 sweeps the item table in blocks of this many rows with an online log-sum-exp and recomputes them in
  # the backward pass, so the [tokens, items] logits never exist (large catalogues); 0 materialises them.
  c.train.ce_block = 0
  c.train.head = "tied"  # head used by the loss: 'tied' (item table) or 'untied'
  c.train.user_l2 = 0.0  # user module: adds user_l2 * mean squared norm of the batch tokens' user vectors
  # Contrastive regularisation (DuoRec's unsupervised term): adds cl_weight * an InfoNCE loss between two dropout
  # views of every loss token (other users' tokens are the negatives; dot product / cl_temperature). 0 = off; it
  # costs a second forward and backward pass of the encoder (not of the item head).
  c.train.cl_weight = 0.0
  c.train.cl_temperature = 1.0
  c.train.row_sparse = True  # update gather-only tables (users; items under a sampled loss) by row: exact, faster
  c.train.num_epochs = 20  # passes over the training users
  c.train.max_steps = 0  # stop after this many steps in total (0 = no limit)
  c.train.row_len = 64  # length of a packed row (>= max_len); several users share a row
  c.train.rows_per_batch = 32  # packed rows per step (about 256 Beauty users at row_len 64)
  c.train.eval_every_epochs = 1  # validate (and maybe save the best model) every this many epochs
  c.train.checkpoint_every_steps = 200  # save a resumable checkpoint every this many steps (and each epoch end)
  c.train.keep_checkpoints = 2  # resumable checkpoints kept on disk
  c.train.patience = 0  # early stop after this many validations without improvement (0 = off)
  c.train.log_every_steps = 20  # JSONL / TensorBoard logging interval

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # peak learning rate
  c.optimizer.schedule = "constant"  # 'constant', 'cosine', 'warmup_cosine' or 'linear'
  c.optimizer.warmup_steps = 0  # linear warm-up steps
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.999  # Adam beta2
  c.optimizer.eps = 1e-8  # Adam epsilon
  c.optimizer.weight_decay = 0.0  # decoupled weight decay on weight matrices (not embeddings/biases/LN)
  c.optimizer.clip_norm = 0.0  # clip gradients to this global norm (0 = off)

  c.eval = ml_collections.ConfigDict()
  c.eval.users_per_batch = 1024  # users scored per evaluation step
  c.eval.rows_per_batch = 256  # packed rows per evaluation step (row length = train.row_len)
  c.eval.metric = "NDCG@10"  # validation metric used to select the best model
  # Users evaluated (valid and test): 0 = all; n = a fixed random sample of n users (seed 0, the same in every run
  # and process), for catalogues and user bases of production size.
  c.eval.max_users = 0
  # Whether the user's history leaves the ranking (the standard protocol: an answer that repeats an item of the history
  # is then a miss). False ranks every item, for domains with repeat consumption (Yelp: 6.7% of the test answers
  # repeat an item of their user's history); the reported figures are then not comparable with published ones.
  c.eval.exclude_history = True
  # Top-k of evaluation, recall and recommendations: 0 = exact (lax.top_k); in (0, 1) = lax.approx_max_k with this
  # recall target (a partial reduction on TPU; CPU and GPU fall back to the exact top-k).
  c.eval.approx_recall = 0.0
  # Head that scores items in evaluation, recall and recommendations: 'tied' (item table), 'untied', or ''
  # (the head the loss trains, train.head). The authors train their prompt-tuning loss on the untied head and
  # evaluate with the tied table.
  c.eval.head = ""

  c.recall = ml_collections.ConfigDict()
  # Items per interest step m_1..m_S of the multi-interest recall used for evaluation (K = sum). (20,) is
  # the plain top-20 of the last hidden state; (18, 2) is the paper's two-step recall. Metrics are
  # reported for the cut-offs 5, 10, 20 that are <= K.
  c.recall.quotas = (20,)

  # A run workdir whose best (else latest) parameters start the stage (required by finetune and prompt_tune).
  c.init_from = ""

  c.prompt = ml_collections.ConfigDict()
  c.prompt.mode = "last"  # 'last' (replace the last w real inputs) or 'interleave' (w prompts after each item)
  c.prompt.width = 1  # w: generated items per prompt
  c.prompt.head = "tied"  # head whose top items become the prompts: 'tied' or 'untied'
  c.prompt.hard_negative_weight = 0.0  # extra loss ranking the clicked item above the shown prompt (0 = off)
  # Where the generated items come from: 'top' (the model's best items, the paper), 'sample' (drawn from the
  # model's softmax at prompt.temperature, without replacement), 'uniform' (random items) or 'popularity'
  # (random items drawn by training-set popularity). Items already in the prefix are never chosen.
  c.prompt.source = "top"
  c.prompt.temperature = 1.0  # softmax temperature of source='sample'
  c.prompt.approx_recall = (
    0.0  # top-k of the prompt candidates: 0 = exact, in (0, 1) = approx_max_k (eval.approx_recall)
  )
  c.prompt.gen_dropout = False  # generate with dropout on (the authors' code generates in train mode)
  # Aligned prompting (beyond the paper): the position holding a shown prompt is trained on what the user
  # actually did next (the feedback), with the shown item excluded from that position's softmax, as the
  # second step of the multi-interest recall uses it. False = the paper's targets.
  c.prompt.aligned = False
  # With aligned prompting: also exclude, at a prompt's position, the best `aligned_top` items of the position
  # that generated it (the first recall step's list, as the recall's second step excludes it); 0 = off.
  c.prompt.aligned_top = 0

  c.mesh = ml_collections.ConfigDict()
  # Device mesh (axes `data` and `model`; recgpt_jax.parallel.mesh). Sizes within a slice; -1 = all
  # remaining devices. The batch splits over `data`, the item table's vocabulary over `model`.
  c.mesh.data = -1
  c.mesh.model = 1
  # Multi-slice TPU: how many slices each axis spans (data-centre network between slices).
  c.mesh.data_slices = 1
  c.mesh.model_slices = 1
  # Logical axis -> mesh axis (None = replicated); the model's parameters carry logical axis names.
  c.mesh.rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("users", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("positions", None),
  )

  c.results_dir = ""  # if set, also write <results_dir>/<name>.json (e.g. experiments/results)
  c.tfds_data_dir = ""  # where the TFDS builder writes (default ~/.cache/recgpt_jax/tfds)
  return c


def eval_head(c: ml_collections.ConfigDict) -> str:
  """The head that scores items in evaluation, recall and recommendations (``eval.head``, else ``train.head``)."""
  return c.eval.head or c.train.head


def recall_k(c: ml_collections.ConfigDict) -> int:
  """``K = sum(recall.quotas)``: the items recalled (evaluated, recommended) per user."""
  return int(sum(c.recall.quotas))


def check_catalogue(c: ml_collections.ConfigDict, num_items: int) -> None:
  """Raises ConfigError (one line) when a catalogue of ``num_items`` items is too small for ``c``.

  Evaluation and recommendations recall ``K = sum(recall.quotas)`` distinct items per user, so the catalogue
  needs at least ``K`` items. Called once the data is loaded (``stages.Stage.check``), before any training.
  """
  k = recall_k(c)
  if num_items < k:
    raise ConfigError(
      f"the data has {num_items} items, fewer than the K = sum(recall.quotas) = {k} that evaluation recalls per"
      f" user; set --config.recall.quotas to at most {num_items} items in all"
    )


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for values no run could use."""
  from recgpt_jax.data import io
  from recgpt_jax.model import attention, precision  # jax/flax load after flag parsing, not with the config
  from recgpt_jax.train import losses, optim, prompts

  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)

  need(c.max_len >= 1, f"max_len must be >= 1, got {c.max_len}")
  need(c.seed >= 0, f"seed must be >= 0, got {c.seed}")
  need(c.k_core >= 0, f"k_core must be >= 0 (0 = off), got {c.k_core}")
  need(c.data_format in io.FORMATS, f"data_format must be one of {io.FORMATS}, got {c.data_format!r}")
  m = c.model
  need(m.attention in ("softmax", "flow"), f"model.attention must be 'softmax' or 'flow', got {m.attention!r}")
  precision.to_dtype(m.dtype, "model.dtype")
  precision.to_dtype(m.param_dtype, "model.param_dtype")
  need(m.flow_chunk >= 1, f"model.flow_chunk must be >= 1, got {m.flow_chunk}")
  attention.check_impl(m.attention, m.attention_impl, attn_dropout=m.attn_dropout, dtype=m.dtype)
  need(m.norm in ("post", "pre"), f"model.norm must be 'post' or 'pre', got {m.norm!r}")
  for name in ("hidden", "num_layers", "num_heads", "ffn"):
    need(m[name] >= 1, f"model.{name} must be >= 1, got {m[name]}")
  need(m.hidden % m.num_heads == 0, f"model.hidden ({m.hidden}) must be divisible by model.num_heads ({m.num_heads})")
  for name in ("attn_dropout", "hidden_dropout", "user_dropout"):
    need(0.0 <= m[name] < 1.0, f"model.{name} must be in [0, 1), got {m[name]}")
  need(m.vocab_multiple >= 1, f"model.vocab_multiple must be >= 1, got {m.vocab_multiple}")
  for name in ("data", "model"):
    need(c.mesh[name] == -1 or c.mesh[name] >= 1, f"mesh.{name} must be -1 or >= 1, got {c.mesh[name]}")
    need(c.mesh[f"{name}_slices"] >= 1, f"mesh.{name}_slices must be >= 1, got {c.mesh[f'{name}_slices']}")
  need(c.mesh.data != -1 or c.mesh.model != -1, "at most one of mesh.data and mesh.model may be -1")
  need(
    c.mesh.model == -1 or m.vocab_multiple % (c.mesh.model * c.mesh.model_slices) == 0,
    f"model.vocab_multiple ({m.vocab_multiple}) must be a multiple of the model axis size"
    f" ({c.mesh.model * c.mesh.model_slices}) so the item table splits evenly",
  )
  need(c.train.row_len >= c.max_len, f"train.row_len ({c.train.row_len}) must be >= max_len ({c.max_len})")
  need(c.train.rows_per_batch >= 1, f"train.rows_per_batch must be >= 1, got {c.train.rows_per_batch}")
  need(c.train.num_epochs >= 1, f"train.num_epochs must be >= 1, got {c.train.num_epochs}")
  need(c.train.max_steps >= 0, f"train.max_steps must be >= 0 (0 = no limit), got {c.train.max_steps}")
  for name in ("checkpoint_every_steps", "eval_every_epochs", "keep_checkpoints", "log_every_steps"):
    need(c.train[name] >= 1, f"train.{name} must be >= 1, got {c.train[name]}")
  need(c.train.patience >= 0, f"train.patience must be >= 0 (0 = off), got {c.train.patience}")
  need(
    c.train.loss in ("ce", "bce", "sampled_softmax"),
    f"train.loss must be ce, bce or sampled_softmax, got {c.train.loss!r}",
  )
  need(c.train.user_l2 >= 0, f"train.user_l2 must be >= 0, got {c.train.user_l2}")
  need(c.train.cl_weight >= 0, f"train.cl_weight must be >= 0 (0 = off), got {c.train.cl_weight}")
  need(c.train.cl_temperature > 0, f"train.cl_temperature must be > 0, got {c.train.cl_temperature}")
  need(c.train.head in ("tied", "untied"), f"train.head must be 'tied' or 'untied', got {c.train.head!r}")
  need(c.train.head == "tied" or c.model.untied_head, "train.head='untied' needs model.untied_head=True")
  need(c.train.num_negatives >= 1, f"train.num_negatives must be >= 1, got {c.train.num_negatives}")
  need(
    c.train.negatives in losses.NEGATIVES,
    f"train.negatives must be one of {losses.NEGATIVES}, got {c.train.negatives!r}",
  )
  need(c.train.ce_block >= 0, f"train.ce_block must be >= 0 (0 = materialised logits), got {c.train.ce_block}")
  o = c.optimizer
  need(o.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
  need(o.schedule in optim.SCHEDULES, f"optimizer.schedule must be one of {optim.SCHEDULES}, got {o.schedule!r}")
  for name in ("warmup_steps", "weight_decay", "clip_norm"):
    need(o[name] >= 0, f"optimizer.{name} must be >= 0, got {o[name]}")
  for name in ("b1", "b2"):
    need(0 <= o[name] < 1, f"optimizer.{name} must be in [0, 1), got {o[name]}")
  need(o.eps > 0, f"optimizer.eps must be > 0, got {o.eps}")
  need(c.eval.head in ("", "tied", "untied"), f"eval.head must be '', 'tied' or 'untied', got {c.eval.head!r}")
  need(c.eval.head != "untied" or c.model.untied_head, "eval.head='untied' needs model.untied_head=True")
  need(c.eval.users_per_batch >= 1 and c.eval.rows_per_batch >= 1, "eval batch sizes must be >= 1")
  need(c.eval.max_users >= 0, f"eval.max_users must be >= 0, got {c.eval.max_users}")
  for section in ("eval", "prompt"):
    recall = c[section].approx_recall
    need(0 <= recall < 1, f"{section}.approx_recall must be in [0, 1) (0 = exact top-k), got {recall}")
  need(c.prompt.mode in ("last", "interleave"), f"prompt.mode must be 'last' or 'interleave', got {c.prompt.mode!r}")
  need(c.prompt.width >= 1, f"prompt.width must be >= 1, got {c.prompt.width}")
  need(c.prompt.head in ("tied", "untied"), f"prompt.head must be 'tied' or 'untied', got {c.prompt.head!r}")
  need(c.prompt.head == "tied" or c.model.untied_head, "prompt.head='untied' needs model.untied_head=True")
  need(c.prompt.hard_negative_weight >= 0, "prompt.hard_negative_weight must be >= 0")
  sources = ("top", "sample", "uniform", "popularity")
  need(c.prompt.source in sources, f"prompt.source must be one of {sources}, got {c.prompt.source!r}")
  top = prompts.NUM_CANDIDATES
  need(
    c.prompt.aligned_top == 0 or (c.prompt.aligned and c.prompt.source == "top" and 1 <= c.prompt.aligned_top <= top),
    f"prompt.aligned_top={c.prompt.aligned_top} needs prompt.aligned=True, prompt.source='top' and 1..{top} items",
  )
  need(c.prompt.temperature > 0, f"prompt.temperature must be > 0, got {c.prompt.temperature}")
  quotas = tuple(c.recall.quotas)
  need(
    len(quotas) >= 1 and all(isinstance(m, int) and m >= 1 for m in quotas),
    f"recall.quotas must be positive ints, got {quotas}",
  )
  metrics = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20) if k <= sum(quotas))
  need(bool(metrics), f"recall.quotas must recall at least 5 items, got K={sum(quotas)}")
  need(c.eval.metric in metrics, f"eval.metric must be one of {metrics} (K={sum(quotas)}), got {c.eval.metric!r}")
