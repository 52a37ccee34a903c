"""orbax save -> restore round trip, restored straight into the sharded layout."""
import jax
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from weave_jax import Engine, RunConfig, init_random, make_mesh, preset
from weave_jax.sharding import state_specs
from weave_jax.weights import restore_checkpoint, save_checkpoint

CONFIGS = {
    "dense_bf16": preset("tiny", num_layers=1, dtype="bfloat16"),
    "moe_tied": preset("tiny", family="mixtral", num_layers=1, num_experts=4,
                       intermediate_size=64, tie_embeddings=True),
}


def _leaves(model):
  return jax.tree_util.tree_leaves_with_path(nnx.state(model))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("restore_tp", [2, 4])
def test_round_trip(tmp_path, name, restore_tp):
  cfg = CONFIGS[name]
  saved = init_random(cfg, make_mesh(2), seed=3)
  save_checkpoint(saved, tmp_path / "ckpt")
  mesh = make_mesh(restore_tp)
  restored = restore_checkpoint(tmp_path / "ckpt", cfg, mesh)

  specs = jax.tree_util.tree_leaves(state_specs(nnx.state(restored)),
                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  a, b = _leaves(saved), _leaves(restored)
  assert [p for p, _ in a] == [p for p, _ in b]
  assert len(specs) == len(b)
  for (path, x), (_, y), spec in zip(a, b, specs):
    where = jax.tree_util.keystr(path)
    assert y.dtype == x.dtype == np.dtype(cfg.dtype), where
    assert y.sharding.mesh.shape == mesh.shape, where
    assert y.sharding.spec == spec, where
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=where)

  tokens = np.arange(11) * 7 % cfg.vocab_size
  out = Engine(restored, mesh, RunConfig(backend="rs_ag"))(tokens)
  ref = Engine(saved, make_mesh(2), RunConfig(backend="rs_ag"))(tokens)
  # Same weights at another TP: the all-reduces add in another order, which moves bf16 logits by
  # a few units in their last place; compare the whole logits array, not each element.
  err = rel_err(out, ref)
  assert err < (2e-2 if cfg.dtype == "bfloat16" else 1e-5), err


@pytest.mark.parametrize("change, says", [
    (dict(hidden_size=128), r"embed/table/value is \(512, 256\) bfloat16 in the checkpoint, "
                            r"\(512, 128\) bfloat16 in the config"),
    (dict(dtype="float32"), r"is \(.*\) bfloat16 in the checkpoint, \(.*\) float32 in the config"),
    (dict(num_layers=2), r"\d+ arrays missing from the checkpoint, e.g. layers/1/"),
])
def test_restore_wrong_config_fails(tmp_path, change, says):
  cfg = CONFIGS["dense_bf16"]
  save_checkpoint(init_random(cfg, make_mesh(2)), tmp_path / "ckpt")
  with pytest.raises(ValueError, match="restore_checkpoint: .* does not match .*" + says):
    restore_checkpoint(tmp_path / "ckpt", cfg.replace(**change), make_mesh(2))


def test_restore_missing_directory_fails(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*nowhere"):
    restore_checkpoint(tmp_path / "nowhere", CONFIGS["dense_bf16"], make_mesh(2))
