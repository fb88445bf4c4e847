"""The mixture-of-experts block against a per-token float64 reference, and its config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention_jax import layer_stack, moe
from gated_attention_jax.transformer import Transformer, TransformerConfig
from tests.conftest import randomize_params

D = 16


def _silu(x):
  return x / (1 + np.exp(-x))


def params_as_numpy(block: moe.MoE) -> dict:
  """{name: array} of a MoE block's parameters (the shared experts' under "shared")."""
  out = {n: np.asarray(getattr(block, n)[...]) for n in ("router", "gate_proj", "up_proj",
                                                          "down_proj")}
  if block.shared is not None:
    out["shared"] = {n: np.asarray(getattr(block.shared, n)[...])
                     for n in ("gate_proj", "up_proj", "down_proj")}
  if block.shared_gate is not None:
    out["shared_gate"] = np.asarray(block.shared_gate[...])[:, 0]
  return out


def reference(params: dict, x: np.ndarray, cfg: moe.MoEConfig) -> np.ndarray:
  """Each token through each of its top-k experts, weighted, one token at a time (numpy)."""
  tokens = x.reshape(-1, x.shape[-1])
  out = np.zeros_like(tokens)
  for n, tok in enumerate(tokens):
    logits = tok @ params["router"]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:cfg.experts_per_token]
    weights = probs[top] / (probs[top].sum() if cfg.normalize_top_k else 1.0)
    for e, w in zip(top, weights):
      h = _silu(tok @ params["gate_proj"][e]) * (tok @ params["up_proj"][e])
      out[n] += w * (h @ params["down_proj"][e])
    if cfg.num_shared_experts:
      s = params["shared"]
      h = _silu(tok @ s["gate_proj"]) * (tok @ s["up_proj"]) @ s["down_proj"]
      if cfg.shared_expert_gate:
        h = h / (1 + np.exp(-(tok @ params["shared_gate"])))
      out[n] += h
  return out.reshape(x.shape)


CONFIGS = {
    "top2_normalised": moe.MoEConfig(num_experts=6, experts_per_token=2, expert_dim=8),
    "top3_raw_weights": moe.MoEConfig(num_experts=5, experts_per_token=3, expert_dim=8,
                                      normalize_top_k=False),
    "shared_gated": moe.MoEConfig(num_experts=4, experts_per_token=2, expert_dim=8,
                                  num_shared_experts=2, shared_expert_dim=4,
                                  shared_expert_gate=True),
    "top1": moe.MoEConfig(num_experts=3, experts_per_token=1, expert_dim=8),
}


apply = nnx.jit(lambda block, x: block(x))


def make_block(cfg: moe.MoEConfig, seed: int = 0) -> moe.MoE:
  block = moe.MoE(D, cfg, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
  randomize_params(block, seed + 1)
  return block


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_equals_the_per_token_reference(x64, name, impl):
  cfg = dataclasses.replace(CONFIGS[name], expert_matmul=impl)
  block = make_block(cfg)
  x = np.random.default_rng(3).normal(size=(2, 7, D))
  out, aux = apply(block, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), reference(params_as_numpy(block), x, cfg),
                             rtol=1e-12, atol=1e-12)
  assert set(aux) == {"moe_balance_loss", "moe_router_z_loss", "moe_expert_load",
                      "moe_router_entropy"}


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
@pytest.mark.parametrize("name", ["top2_normalised", "shared_gated"])
def test_block_gradients_equal_the_dense_formulation(x64, name, impl):
  """Gradients of the sorted grouped computation against every expert on every token,
  masked by the routing weights (another formulation; float64, so equal to ~1e-12)."""
  cfg = dataclasses.replace(CONFIGS[name], expert_matmul=impl)
  block = make_block(cfg)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, D)))

  def dense(block, x):
    tokens = x.reshape(-1, D)
    probs, experts, weights = moe.route(tokens @ block.router[...], cfg.experts_per_token,
                                        cfg.normalize_top_k)
    combine = jnp.zeros_like(probs).at[jnp.arange(len(tokens))[:, None], experts].set(weights)
    h = jax.nn.silu(jnp.einsum("ND,EDF->NEF", tokens, block.gate_proj[...])) * jnp.einsum(
        "ND,EDF->NEF", tokens, block.up_proj[...])
    out = jnp.einsum("NEF,EFD,NE->ND", h, block.down_proj[...], combine)
    if block.shared is not None:
      shared = block.shared(tokens)
      if block.shared_gate is not None:
        shared = shared * jax.nn.sigmoid(tokens @ block.shared_gate[...])
      out = out + shared
    return out.reshape(x.shape)

  loss = lambda f: lambda block, x: jnp.sum(jnp.sin(f(block, x)))
  got = nnx.jit(nnx.grad(loss(lambda b, x: b(x)[0]), argnums=(0, 1)))(block, x)
  want = nnx.jit(nnx.grad(loss(dense), argnums=(0, 1)))(block, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)
  assert float(jnp.max(jnp.abs(got[1]))) > 0


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
def test_no_token_is_dropped_when_every_token_picks_one_expert(x64, impl):
  """Dropless: all tokens on expert 0 (a router that prefers it by far) are all computed."""
  cfg = dataclasses.replace(CONFIGS["top2_normalised"], expert_matmul=impl)
  block = make_block(cfg)
  block.router[...] = jnp.asarray(block.router[...]).at[:, 0].add(50.0)
  x = np.abs(np.random.default_rng(5).normal(size=(1, 12, D)))  # x · router[:, 0] >> others
  out, aux = apply(block, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), reference(params_as_numpy(block), x, cfg),
                             rtol=1e-12, atol=1e-12)
  # Expert 0 has all 12 tokens of 24 assignments: max / mean = 12 / (24 / 6) = 3.
  assert float(aux["moe_expert_load"]) == pytest.approx(3.0)


def test_balancing_terms_match_their_formulas(x64):
  cfg = CONFIGS["top3_raw_weights"]
  block = make_block(cfg)
  x = np.random.default_rng(6).normal(size=(3, 4, D))
  _, aux = apply(block, jnp.asarray(x))
  logits = x.reshape(-1, D) @ params_as_numpy(block)["router"]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :3]
  fraction = np.bincount(top.ravel(), minlength=5) / top.size
  np.testing.assert_allclose(float(aux["moe_balance_loss"]),
                             5 * np.sum(fraction * probs.mean(0)), rtol=1e-12)
  np.testing.assert_allclose(float(aux["moe_router_z_loss"]),
                             np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-12)
  np.testing.assert_allclose(float(aux["moe_router_entropy"]),
                             -np.mean(np.sum(probs * np.log(probs), -1)), rtol=1e-12)
  counts = np.bincount(top.ravel(), minlength=5)
  np.testing.assert_allclose(float(aux["moe_expert_load"]), counts.max() / counts.mean())
  # Uniform router probabilities: the loss is 1 whatever the top-k picks.
  block.router[...] = jnp.zeros_like(block.router[...])
  assert float(apply(block, jnp.asarray(x))[1]["moe_balance_loss"]) == pytest.approx(1.0)


@pytest.mark.parametrize("routing", ["uniform", "one_expert", "two_of_many"])
def test_blocked_layout_puts_each_assignment_in_a_block_of_its_expert(routing):
  """Every assignment gets its own row, in a block of its expert, within the static block
  count, whatever the routing: spread over all experts, piled on one, or on two of 16."""
  rng = np.random.default_rng(8)
  n, k, num_experts = 37, 3, 16
  if routing == "uniform":
    experts = np.argsort(rng.random((n, num_experts)), axis=-1)[:, :k]
  else:
    pool = [0, 1, 2] if routing == "one_expert" else [5, 11, 15]
    experts = np.stack([rng.permutation(pool)[:k] for _ in range(n)])
  block = moe.block_rows(n * k, num_experts)
  rows, block_expert = jax.jit(moe.blocked_layout, static_argnums=(1, 2))(
      jnp.asarray(experts, jnp.int32), num_experts, block)
  rows, block_expert = np.asarray(rows), np.asarray(block_expert)
  assert len(set(rows.tolist())) == n * k
  assert rows.max() < len(block_expert) * block
  np.testing.assert_array_equal(block_expert[rows // block], experts.reshape(-1))
  # Within an expert, assignments keep their token order (a stable sort).
  for e in np.unique(experts):
    mine = rows[experts.reshape(-1) == e]
    assert np.all(np.diff(mine) > 0)


def test_expert_matmul_is_chosen_per_platform():
  assert moe.expert_matmul_impl("auto", "tpu") == "ragged_dot"
  assert moe.expert_matmul_impl("auto", "gpu") == "blocked"
  assert moe.expert_matmul_impl("auto", "cpu") == "blocked"
  assert moe.expert_matmul_impl("ragged_dot", "gpu") == "ragged_dot"
  assert [moe.block_rows(m, 8) for m in (16, 1024, 10**6)] == [8, 64, 512]


def test_auto_expert_matmul_does_the_grouped_work_on_this_cpu():
  """XLA's CPU compiler densifies ragged_dot (E x the work); "auto" picks the blocked layout,
  whose compiled forward + backward stays within 2x the grouped ideal 18·M·D·F FLOPs."""
  n, k, num_experts, d, f = 256, 2, 32, 32, 16
  specs = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n, k), jnp.int32),
           jax.ShapeDtypeStruct((num_experts, d, f), jnp.float32),
           jax.ShapeDtypeStruct((num_experts, d, f), jnp.float32),
           jax.ShapeDtypeStruct((num_experts, f, d), jnp.float32))

  def flops(impl):
    loss = lambda x, e, *w: jnp.sum(moe.grouped_swiglu(x, e, *w, impl))
    cost = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(*specs).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / (18 * n * k * d * f)

  assert moe.expert_matmul_impl("auto", jax.default_backend()) == "blocked"
  assert flops("blocked") < 2.0
  assert flops("ragged_dot") > num_experts / 2  # what it saves


def test_balancing_terms_leave_padding_out(x64):
  """With a token mask, every term equals the unmasked terms of the kept tokens alone, and
  the model passes packed batches' padding (segment id 0) as that mask."""
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.normal(size=(10, 5)))
  probs, experts, _ = moe.route(logits, 2, True)
  keep = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], bool)
  masked = moe.balance_terms(logits, probs, experts, jnp.asarray(keep))
  alone = moe.balance_terms(logits[keep], probs[keep], experts[keep])
  for name in alone:
    np.testing.assert_allclose(float(masked[name]), float(alone[name]), rtol=1e-12)
  model = Transformer(_model_config(num_layers=2), rngs=nnx.Rngs(0))
  tokens = rng.integers(0, 64, size=(2, 6))
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  run = nnx.jit(lambda model, tokens: model(tokens, segment_ids=segments,
                                            return_intermediates=True)[1])
  other = np.where(np.asarray(segments) > 0, tokens, (tokens + 7) % 64)  # new padding tokens
  a, b = run(model, jnp.asarray(tokens)), run(model, jnp.asarray(other))
  for name in ("moe_balance_loss", "moe_router_z_loss", "moe_router_entropy"):
    np.testing.assert_allclose(np.stack(b[name]), np.stack(a[name]), rtol=1e-12)
  unmasked = nnx.jit(lambda model, tokens: model(tokens, return_intermediates=True)[1])
  assert not np.allclose(np.stack(unmasked(model, jnp.asarray(tokens))["moe_router_z_loss"]),
                         np.stack(unmasked(model, jnp.asarray(other))["moe_router_z_loss"]))


def _model_config(num_layers: int = 4, **moe_fields) -> TransformerConfig:
  return TransformerConfig(vocab_size=64, d_model=D, num_layers=num_layers, num_heads=2,
                           num_kv_heads=1, head_dim=8, mlp_dim=24, mlp_type="moe",
                           moe=moe.MoEConfig(num_experts=4, experts_per_token=2, expert_dim=8,
                                             **moe_fields))


def test_sparse_layers_follow_qwen3_moes_rule():
  model = nnx.eval_shape(lambda: Transformer(
      _model_config(sparse_step=2, dense_layers=(3,)), rngs=nnx.Rngs(0)))
  kinds = [type(block.mlp).__name__ for block in model.blocks]
  assert kinds == ["SwiGLU", "MoE", "SwiGLU", "SwiGLU"]  # (i + 1) % 2 == 0, minus layer 3
  tokens = jnp.zeros((2, 5), jnp.int32)
  _, inter = jax.eval_shape(lambda: Transformer(
      _model_config(sparse_step=2), rngs=nnx.Rngs(0))(tokens, return_intermediates=True))
  assert len(inter["moe_balance_loss"]) == 2 and len(inter["hidden_states"]) == 4


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_moe_stack_equals_the_unrolled_one(remat):
  cfg = _model_config(num_layers=2)
  unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
  randomize_params(unrolled, 1, scale=0.2)
  scanned = Transformer(cfg.replace(scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
  nnx.update(scanned, layer_stack.relayout(nnx.state(unrolled), nnx.state(scanned)))
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 64, size=(2, 6)))
  forward = nnx.jit(lambda model: model(tokens, return_intermediates=True))
  (a, inter_a), (b, inter_b) = forward(unrolled), forward(scanned)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  for name in ("moe_balance_loss", "moe_expert_load", "moe_router_entropy"):
    np.testing.assert_allclose(np.stack(inter_b[name]), np.stack(inter_a[name]), rtol=1e-5)
  loss = lambda model: jnp.mean(model(tokens) ** 2)
  grad = nnx.jit(nnx.grad(loss))
  grads = nnx.state(grad(unrolled))
  s_grads = layer_stack.relayout(nnx.state(grad(scanned)), grads)
  for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(s_grads)):
    np.testing.assert_allclose(np.asarray(s), np.asarray(g), rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(g))))


@pytest.mark.parametrize("fields, message", [
    (dict(num_experts=4, experts_per_token=5), r"model.moe.experts_per_token \(5\) must be at"
                                                r" most model.moe.num_experts \(4\)"),
    (dict(num_shared_experts=-1), "model.moe.num_shared_experts must be an int >= 0"),
    (dict(experts_per_token=0), "model.moe.experts_per_token must be a positive int"),
    (dict(shared_expert_gate=True), "shared_expert_gate needs model.moe.num_shared_experts"),
    (dict(balance_loss_weight=-0.1), "model.moe.balance_loss_weight must be a finite number"),
    (dict(dense_layers=(-1,)), "model.moe.dense_layers must be layer indices"),
    (dict(expert_matmul="dense"), r"model.moe.expert_matmul must be one of \['auto',"
                                  r" 'ragged_dot', 'blocked'\], got 'dense'"),
])
def test_bad_moe_fields_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    moe.MoEConfig(**fields)


def test_bad_sparse_patterns_are_named():
  with pytest.raises(ValueError, match="select no layer of 4 to be sparse"):
    _model_config(sparse_step=5)
  with pytest.raises(ValueError, match="select no layer of 4 to be sparse"):
    _model_config(dense_layers=(0, 1, 2, 3))
  with pytest.raises(ValueError, match=r"scan_layers stacks alike layers, but model.moe makes"
                                       r" only layers \[1, 3\] of 4 sparse"):
    dataclasses.replace(_model_config(sparse_step=2), scan_layers=True)
  with pytest.raises(ValueError, match=r"model.moe has no fields \['experts'\]"):
    moe.MoEConfig.from_dict({"experts": 4})
