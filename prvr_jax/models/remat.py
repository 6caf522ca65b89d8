"""Rematerialisation that also frees memory on XLA:CPU: `jax.checkpoint` behind a cotangent fence.

`jax.checkpoint` (flax `nn.remat`) saves only what its policy allows and recomputes the rest in
the backward pass. Under `jit` the recomputation is an ordinary part of the program, so the
compiler's scheduler may run it as soon as its inputs exist, i.e. during the forward pass, and
keep its results alive until the backward pass uses them: the memory remat was meant to free is
held again. JAX guards against CSE with optimisation barriers, which GPU/TPU compilers keep; the
CPU compiler (XLA:CPU, JAX 0.10) removes them and schedules the recomputation early, so
`nn.remat` saves nothing there (measured: equal temporaries with and without it, see
`python -m prvr_jax.bench memory --remat blocks`).

The fence makes the order explicit. The forward pass runs the checkpointed function under
`jax.vjp`, whose pullback holds exactly the residuals the policy saves. In the backward pass each
floating-point residual gets `-(|c| * 0)` added, where `c` is a scalar taken from the block's
incoming cotangent, before the pullback recomputes from them: no compiler can start the
recomputation before that cotangent exists, and the compiler cannot fold `|c| * 0` to a constant
for floats (it is NaN for c = inf or NaN). For finite `c` that is -0.0, and x + (-0.0) == x for
every x, signed zeros included, so the residuals and everything recomputed from them are unchanged
bit for bit. (A non-finite entry there makes the block's gradients NaN; they would not be usable
anyway.)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift


def _is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _cotangent_zero(ct: Any) -> jax.Array:
  """-(|c| * 0) for c the first element of the first floating-point leaf of `ct`: a float32 -0.0
  that depends on the cotangent (adding it is the identity)."""
  for leaf in jax.tree.leaves(ct):
    if _is_float(leaf) and leaf.size:
      return -(jnp.abs(leaf.reshape(-1)[0].astype(jnp.float32)) * 0)
  return jnp.full((), -0.0, jnp.float32)


def _fence_leaf(x: jax.Array, zero: jax.Array) -> jax.Array:
  """`x` made to depend on `zero` (a float32 -0.0 from the cotangent) with its bits unchanged.

  float32 and wider: x + zero. Narrower floats (bfloat16): an integer zero is added to x's bits.
  Why not x + zero there: XLA:CPU computes a bfloat16 add in float32, and with excess precision
  allowed it drops the float32 -> bfloat16 -> float32 round trip, so the float32 value x was
  rounded from (an attention softmax, a residual sum before its LayerNorm) would be kept for the
  backward pass instead of x. Integer bits have no float32 value to fall back on.
  """
  if jnp.finfo(x.dtype).bits >= 32:
    return x + zero.astype(x.dtype)
  bits = {8: jnp.uint8, 16: jnp.uint16}[jnp.finfo(x.dtype).bits]
  int_zero = zero.astype(jnp.int32).astype(bits)  # 0, but only known once the cotangent exists
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, bits) + int_zero, x.dtype)


def fence_after_cotangent(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with a VJP whose recomputation waits for the output cotangent.

  Args:
    fn: a function of array pytrees, typically `jax.checkpoint(f, policy=...)`.

  Returns:
    a function equal to `fn` (same outputs, same gradients) whose backward pass adds a zero that
    depends on the cotangent to every floating-point residual of `jax.vjp(fn, ...)` before using
    it.
  """

  @jax.custom_vjp
  def fenced(*args):
    return fn(*args)

  def forward(*args):
    return jax.vjp(fn, *args)

  def backward(pullback, ct):
    zero = _cotangent_zero(ct)
    leaves, treedef = jax.tree.flatten(pullback)
    leaves = [_fence_leaf(l, zero) if _is_float(l) else l for l in leaves]
    return jax.tree.unflatten(treedef, leaves)(ct)

  fenced.defvjp(forward, backward)
  return fenced


def after(x: jax.Array, previous: Any) -> jax.Array:
  """`x` (any shape) made to depend on `previous` (an array pytree) by adding a -0.0 taken from it:
  the same values, computed after `previous`, and in the backward pass `previous`'s cotangent
  waits for `x`'s.

  Rematerialised blocks that read the same input in parallel (the 8 DyGMM branches) all receive
  their cotangents at once, so each one's fence opens at the same moment and the scheduler may
  recompute all of them before differentiating any (8 blocks' activations live again). Chaining
  branch k's input after branch k-1's output makes the backward pass finish branch k before it
  can start branch k-1.
  """
  return x + _cotangent_zero(previous).astype(x.dtype)


def _lifted_fence(fn: Callable[..., Any], variables: Any = True, rngs: Any = True,
                  static_argnums: Sequence[int] = (),
                  remat_policy: Optional[Callable[..., bool]] = None) -> Callable[..., Any]:
  """flax.core counterpart of `lift.checkpoint` with the fence: `fn(scope, *args)` with its
  variables and rngs lifted; `static_argnums` index `args`. `remat_policy` None: nothing is
  recomputed (the residuals are those `jax.vjp` keeps), only fenced."""
  static = tuple(static_argnums)

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    statics = {i: args[i] for i in static}
    dynamic = [a for i, a in enumerate(args) if i not in statics]

    def pure(variable_groups, rng_groups, *dynamic_args):
      it = iter(dynamic_args)
      full = [statics[i] if i in statics else next(it) for i in range(len(args))]
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *full)
      return y, repack_fn(scope)

    body = pure if remat_policy is None else jax.checkpoint(pure, policy=remat_policy)
    return fence_after_cotangent(body)(variable_groups, rng_groups, *dynamic)

  return lift.pack(inner, (variables,), (variables,), (rngs,), name="fenced")


def fenced_module(module_class: type, *, remat_policy: Optional[Callable[..., bool]],
                  static_argnums: Sequence[int] = ()) -> type:
  """`module_class` behind the cotangent fence, rematerialised (`jax.checkpoint` with
  `remat_policy`) unless `remat_policy` is None.

  Same parameters (names, shapes, initial values), outputs and gradients as `module_class`.
  Call it with positional arguments only; `static_argnums` counts `self` as 0, as `nn.remat`
  does (e.g. `deterministic` at position 4 of `__call__(self, x, mask, size, deterministic)`).

  Without recomputation the fence still matters where the compiler upcasts: XLA:CPU runs every
  bfloat16 product in float32, converting its bfloat16 operands once and sharing that float32
  copy between the forward product and the backward one, so a bfloat16 activation is stored as
  float32 until the backward pass. Fenced, the backward pass converts its own copy after the
  cotangent arrives, and only the bfloat16 value lives in between.
  """
  static = tuple(i - 1 for i in static_argnums)
  return nn.transforms.lift_transform(_lifted_fence, module_class, static_argnums=static,
                                      remat_policy=remat_policy)
