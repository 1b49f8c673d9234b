"""The user module's regulariser: ``train.user_l2`` adds the mean squared norm of the tokens' user vectors."""

import jax
import numpy as np
import pytest

from recgpt_jax.config import base_config
from recgpt_jax.train import optim
from recgpt_jax.train import step as step_lib
from tests.train.test_step import _setup


@pytest.mark.parametrize("row_sparse", [False, True])
def test_user_l2_adds_the_hand_computed_penalty(row_sparse):
  graphdef, tx, state, batch = _setup(None, 1, dropout=0.2, user_module=True)
  lam = 0.7
  adam = optim.adam_spec(base_config().optimizer, 10) if row_sparse else None
  steps = {
    lam_: jax.jit(step_lib.make_train_step(graphdef, tx, step_lib.LossConfig(kind="ce", user_l2=lam_), adam=adam))
    for lam_ in (0.0, lam)
  }
  table = np.asarray(state.params["user_embed"]["embedding"], np.float64)
  real = batch["seq_ids"] > 0
  penalty = np.sum(np.sum(table[batch["users"]] ** 2, axis=-1) * real) / real.sum()
  state_0, m0 = steps[0.0](state, batch)
  state_l, ml = steps[lam](state, batch)
  assert float(ml["user_l2"]) == pytest.approx(penalty, rel=1e-5)
  assert float(ml["loss"]) == pytest.approx(float(m0["loss"]) + lam * penalty, rel=1e-5)
  # The penalty shrinks exactly the rows of the batch's users: the others get the same update either way.
  used = np.unique(batch["users"][real])
  other = np.setdiff1d(np.arange(table.shape[0]), used)
  u0, ul = (np.asarray(s.params["user_embed"]["embedding"]) for s in (state_0, state_l))
  np.testing.assert_allclose(u0[other], ul[other], atol=1e-6)
  assert np.linalg.norm(ul[used] - u0[used]) > 1e-4
  np.testing.assert_array_equal(  # the item table's update does not depend on the user penalty
    np.asarray(state_0.params["item_embed"]["embedding"]), np.asarray(state_l.params["item_embed"]["embedding"])
  )


def test_user_l2_must_be_non_negative():
  with pytest.raises(ValueError, match="user_l2 must be >= 0"):
    step_lib.LossConfig(user_l2=-1.0)
