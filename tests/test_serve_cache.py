"""The paged KV cache: the memory formula, the page count from free memory, the layout and its
sharding by KV heads."""
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from weave_jax import make_mesh, preset
from weave_jax.serve import kv_cache


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_bytes_per_page_llama_8b(tp):
  cfg = preset("llama-3.1-8b")                    # 32 layers, 8 KV heads, D 128, bf16
  assert kv_cache.bytes_per_page(cfg, 16, tp) == 2 * 32 * 16 * (8 // tp) * 128 * 2


def test_page_count_from_free_memory(monkeypatch):
  cfg = preset("llama-3.1-8b")
  mesh = make_mesh(2)
  free = 60 << 30
  monkeypatch.setattr(kv_cache, "free_device_bytes", lambda mesh: free)
  reserve = kv_cache.activation_reserve(cfg, 2048, 256, 2)
  pages = kv_cache.pages_for_memory(cfg, mesh, page_size=16, memory_fraction=0.9, reserve=reserve)
  per_page = 2 * 32 * 16 * 4 * 128 * 2
  assert pages == int((free * 0.9 - reserve) // per_page)
  # The reserve holds the largest bucket's activations and the sampled rows' logits.
  assert reserve > 2048 * 3 * cfg.hidden_size * 2 + 256 * cfg.vocab_size * 4


def test_page_count_refuses(monkeypatch):
  cfg = preset("tiny")
  mesh = make_mesh(1)
  with pytest.raises(ValueError, match="pass num_pages"):      # CPU keeps no statistics
    kv_cache.pages_for_memory(cfg, mesh, page_size=16, memory_fraction=0.9, reserve=0)
  monkeypatch.setattr(kv_cache, "free_device_bytes", lambda mesh: 1 << 20)
  with pytest.raises(ValueError, match="no page fits"):
    kv_cache.pages_for_memory(cfg, mesh, page_size=16, memory_fraction=0.5, reserve=1 << 20)
  with pytest.raises(ValueError, match="memory_fraction"):
    kv_cache.pages_for_memory(cfg, mesh, page_size=16, memory_fraction=1.5, reserve=0)


@pytest.mark.parametrize("tp", [1, 4, 8])
def test_layout_and_sharding(tp):
  cfg = preset("tiny")                            # 2 layers, 8 KV heads, D 16, float32
  mesh = make_mesh(tp)
  cache = kv_cache.allocate(cfg, mesh, num_pages=5, page_size=4)
  assert len(cache) == cfg.num_layers
  for k_pages, v_pages in cache:
    for pages in (k_pages, v_pages):
      assert pages.shape == (5, 4, 8, 16) and pages.dtype == jnp.float32
      assert pages.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "tp", None)), 4)
      shards = pages.addressable_shards
      assert len(shards) == tp and all(s.data.shape == (5, 4, 8 // tp, 16) for s in shards)
      assert float(np.abs(np.asarray(pages)).max()) == 0.0
  per_rank = sum(s.data.nbytes for kv in cache for a in kv for s in a.addressable_shards[:1])
  assert per_rank == 5 * kv_cache.bytes_per_page(cfg, 4, tp)


def test_bad_layout():
  mesh = make_mesh(1)
  with pytest.raises(ValueError, match="page_size"):
    kv_cache.allocate(preset("tiny"), mesh, num_pages=4, page_size=0)
  with pytest.raises(ValueError, match="num_pages"):
    kv_cache.allocate(preset("tiny"), mesh, num_pages=0)
  with pytest.raises(ValueError, match="num_kv_heads"):
    kv_cache.allocate(preset("tiny", num_kv_heads=2, num_heads=16), make_mesh(4), num_pages=4)


def test_describe_line():
  line = kv_cache.describe(preset("tiny"), 2, num_pages=10, page_size=16)
  assert "10 pages x 16 tokens = 160 tokens" in line and "4 KV heads per rank" in line


def test_runner_sizes_its_cache_from_free_memory(monkeypatch, capsys):
  from weave_jax import RunConfig, init_random
  from weave_jax.serve import ModelRunner
  cfg = preset("tiny", num_layers=1)
  mesh = make_mesh(2)
  monkeypatch.setattr(kv_cache, "free_device_bytes", lambda mesh: 1 << 30)
  runner = ModelRunner(init_random(cfg, mesh), mesh, RunConfig(), memory_fraction=0.5,
                       max_model_len=64, max_num_batched_tokens=64, max_num_seqs=4,
                       compile_ahead=False)
  reserve = kv_cache.activation_reserve(cfg, 64, 4, 2)
  assert runner.num_pages == int(((1 << 30) * 0.5 - reserve) // kv_cache.bytes_per_page(cfg, 16, 2))
  assert runner.cache[0][0].shape[0] == runner.num_pages
  line = capsys.readouterr().out
  assert f"{runner.num_pages} pages x 16 tokens = {runner.num_pages * 16} tokens" in line
  assert "1.00 GiB free after the weights x 0.5" in line and "reserve for 64 tokens" in line
