"""The research train step: quantized loss and gradients, FP32 shadow and every metric, one jit.

Per step, with `use_fp8`:
1. every quantized kernel is fake-quantized ONCE with its delayed scale from `state.quant_state`
   (straight-through gradient to the float32 master weight) and merged into the model;
2. each linear layer quantizes its input activation (current scaling) and the gradient flowing
   back into that input (current scaling, via `quantize_gradient`);
3. AdamW updates the master weights from those gradients; the step then records amax(W_t) in the
   amax histories and recomputes the scales for the next step.
With `use_shadow`, a second `value_and_grad` of the same loss with quantization off (same params,
batch and dropout key) gives `shadow_loss` and the gradient cosine similarities.

Metric definitions (a flat dict of scalar arrays):
- gradient statistics are those of `compute_gradient_stats` on the gradients the optimizer
  receives, before clipping; `param_nan_count` / `param_inf_count` count the params that ENTER the
  step (those that produced this step's loss).
- `quant/overflow/<layer>`: saturated elements / all elements, over the layer's weight, input
  activation and input gradient; `quant/underflow/<layer>`: non-zero elements that became zero /
  non-zero elements, same tensors. `overflow_rate` / `underflow_rate`: the same over all layers.
- `quant/bit_stall/<layer>`: among kernel elements with a non-zero gradient, the fraction whose
  quantized value (at this step's scale) is the same before and after the optimizer update;
  `bit_stall_rate`: the same pooled over all quantized kernels.
- `zero_update_frac`: fraction of all float32 parameters left bitwise unchanged by the update.
- `update_skipped`: 1 when the loss or the gradient norm was not finite; the step then keeps
  params, optimizer and quant state unchanged (only `step` advances).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad_jax.fp8_gemm import check_hardware_pair, hardware_dtype
from altgrad_jax.metrics import compute_gradient_stats, compute_stability_metrics, gradient_cosine_similarity
from altgrad_jax.model import cross_entropy_loss
from altgrad_jax.optimizer import make_optimizer, make_schedule
from altgrad_jax.qlinear import N_COUNTS, LayerQuant, QuantContext, count_vector
from altgrad_jax.quantize import quantize
from altgrad_jax.scaling import get_path, linear_layer_paths, path_name, set_path, update_scaling_entry
from altgrad_jax.train_state import TrainState, model_structure


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    path: tuple  # key path of the layer in params, e.g. ("h", 0, "attn", "c_attn")
    name: str  # "h/0/attn/c_attn"
    forward_format: str | None  # weights (delayed scaling) and input activations
    activation_format: str | None  # forward_format, or None when quantize_activations is off
    backward_format: str | None  # gradient into the layer input


def _layer_plans(config, abstract_params) -> list[LayerPlan]:
    plans = []
    for path in linear_layer_paths(abstract_params):
        name = path_name(path)
        forward = config.forward_format_for(name)
        plans.append(LayerPlan(
            path=path,
            name=name,
            forward_format=forward,
            activation_format=forward if config.quantize_activations else None,
            backward_format=config.backward_format_for(name),
        ))
    return plans


def _check_hardware_plans(plans: list[LayerPlan]) -> None:
    """fp8_hardware_gemm needs both operands of every quantized layer in E4M3/E5M2, one E4M3."""
    for plan in plans:
        if plan.forward_format is None:
            continue
        if plan.activation_format is None:
            raise ValueError(f"fp8_hardware_gemm needs quantize_activations=true (layer {plan.name})")
        hardware_dtype(plan.forward_format)
        check_hardware_pair(plan.activation_format, plan.forward_format)


def _safe_ratio(numerator, denominator):
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1.0), 0.0)


class _QuantizedLoss:
    """The loss of the GPT on a batch, optionally quantized, as a pure function of its inputs."""

    def __init__(self, config):
        self.config = config
        self.graphdef, abstract_params = model_structure(config)
        self.plans = _layer_plans(config, abstract_params)
        self.hardware_gemm = bool(config.use_fp8 and config.fp8_hardware_gemm)
        if self.hardware_gemm:
            _check_hardware_plans(self.plans)
        self.weight_plans = [p for p in self.plans if p.forward_format is not None]
        self.grad_plans = [p for p in self.plans if p.backward_format is not None]
        self.margin = config.fp8_amax_margin

    def zero_probes(self) -> dict:
        return {p.name: jnp.zeros((N_COUNTS,), jnp.float32) for p in self.grad_plans}

    def quantize_weights(self, params, quant_state):
        """(params with quantized kernels, {name: quantized kernel}, {name: counts}, {name: amax})."""
        qparams, qkernels, counts, amaxes = params, {}, {}, {}
        for plan in self.weight_plans:
            kernel = get_path(params, plan.path)["kernel"]
            scale = get_path(quant_state, plan.path)["scale"]
            qkernel = quantize(kernel, plan.forward_format, scale)
            qparams = set_path(qparams, plan.path + ("kernel",), qkernel)
            qkernels[plan.name] = qkernel
            counts[plan.name] = jax.lax.stop_gradient(count_vector(kernel, plan.forward_format, scale))
            amaxes[plan.name] = jax.lax.stop_gradient(jnp.max(jnp.abs(kernel)))
        return qparams, qkernels, counts, amaxes

    def __call__(self, params, probes, quant_state, batch, dropout_key, *, quantized: bool, with_grads: bool = True):
        """(loss, aux); aux holds quantized kernels, weight/activation counts and weight amaxes."""
        x, y = batch
        aux = {"qkernels": {}, "weight_counts": {}, "act_counts": {}, "amaxes": {}}
        context = None
        if quantized and self.plans:
            params, aux["qkernels"], aux["weight_counts"], aux["amaxes"] = self.quantize_weights(params, quant_state)
            context = QuantContext(layers={
                p.name: LayerQuant(
                    act_format=p.activation_format,
                    grad_format=p.backward_format if with_grads else None,
                    grad_probe=probes.get(p.name) if with_grads else None,
                    margin=self.margin,
                    hardware_gemm=self.hardware_gemm and p.forward_format is not None,
                    weight_format=p.forward_format,
                    weight_scale=get_path(quant_state, p.path)["scale"] if p.forward_format else None,
                )
                for p in self.plans
            })
        model = nnx.merge(self.graphdef, params)
        logits = model(x, dropout_key=dropout_key, quant=context)
        if context is not None:
            aux["act_counts"] = dict(context.forward_counts)
        return cross_entropy_loss(logits, y), aux


def _quantization_metrics(loss_fn: _QuantizedLoss, aux, probe_grads, grads, new_params, quant_state) -> dict:
    metrics = {}
    total = jnp.zeros((N_COUNTS,), jnp.float32)
    for plan in loss_fn.plans:
        vectors = [d[plan.name] for d in (aux["weight_counts"], aux["act_counts"], probe_grads) if plan.name in d]
        if not vectors:
            continue
        layer = sum(vectors[1:], vectors[0])
        total = total + layer
        metrics[f"quant/overflow/{plan.name}"] = _safe_ratio(layer[0], layer[3])
        metrics[f"quant/underflow/{plan.name}"] = _safe_ratio(layer[1], layer[2])
    metrics["overflow_rate"] = _safe_ratio(total[0], total[3])
    metrics["underflow_rate"] = _safe_ratio(total[1], total[2])

    stalled_total, moving_total = jnp.float32(0), jnp.float32(0)
    for plan in loss_fn.weight_plans:
        scale = get_path(quant_state, plan.path)["scale"]
        new_q = quantize(get_path(new_params, plan.path)["kernel"], plan.forward_format, scale)
        has_grad = get_path(grads, plan.path)["kernel"] != 0
        stalled = jnp.sum(has_grad & (new_q == aux["qkernels"][plan.name]), dtype=jnp.float32)
        with_grad = jnp.sum(has_grad, dtype=jnp.float32)
        metrics[f"quant/bit_stall/{plan.name}"] = _safe_ratio(stalled, with_grad)
        stalled_total, moving_total = stalled_total + stalled, moving_total + with_grad
    metrics["bit_stall_rate"] = _safe_ratio(stalled_total, moving_total)
    return metrics


def _zero_update_frac(old_params, new_params) -> jax.Array:
    same = jax.tree_util.tree_map(lambda a, b: jnp.sum(a == b, dtype=jnp.float32), old_params, new_params)
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(old_params))
    return sum(jax.tree_util.tree_leaves(same)) / n


def _updated_quant_state(loss_fn: _QuantizedLoss, quant_state, amaxes) -> dict:
    for plan in loss_fn.weight_plans:
        entry = get_path(quant_state, plan.path)
        new_entry = update_scaling_entry(entry, amaxes[plan.name], plan.forward_format, loss_fn.margin)
        quant_state = set_path(quant_state, plan.path, new_entry)
    return quant_state


def make_train_step(config, mesh=None):
    """Jitted `step(state, batch) -> (state, metrics)`; `state` is donated.

    The same function serves one device and a data-parallel `mesh`: jit follows the shardings of
    its inputs (see sharding.py), and every reduction here is over the global batch. `mesh` is
    accepted so that callers need not care, and is the hook for explicit shardings later.
    """
    del mesh
    loss_fn = _QuantizedLoss(config)
    optimizer = make_optimizer(config)
    schedule = make_schedule(config)
    quantized_grad = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    shadow_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch):
        dropout_key = jax.random.fold_in(state.key, state.step)
        (loss, aux), (grads, probe_grads) = quantized_grad(
            state.params, loss_fn.zero_probes(), state.quant_state, batch, dropout_key, quantized=config.use_fp8
        )
        metrics = {"loss": loss, "learning_rate": schedule(state.step)}
        metrics.update(compute_gradient_stats(grads, config.dead_neuron_threshold))
        metrics.update(compute_stability_metrics(state.params))
        if config.use_shadow:
            (shadow_loss, _), shadow_grads = shadow_grad(
                state.params, {}, state.quant_state, batch, dropout_key, quantized=False
            )
            metrics["shadow_loss"] = shadow_loss
            metrics.update(gradient_cosine_similarity(grads, shadow_grads))

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        quant_state = state.quant_state
        if config.use_fp8:
            metrics.update(_quantization_metrics(loss_fn, aux, probe_grads, grads, new_params, quant_state))
            metrics["zero_update_frac"] = _zero_update_frac(state.params, new_params)
            quant_state = _updated_quant_state(loss_fn, quant_state, aux["amaxes"])
        # A non-finite loss or gradient leaves params, optimizer and quant state as they were (the
        # step counter still advances): the state that produced it stays inspectable, e.g. in the
        # anomaly checkpoint, and a single bad batch cannot poison the run.
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        metrics["update_skipped"] = (~finite).astype(jnp.float32)
        kept = jax.lax.cond(finite, lambda: (new_params, opt_state, quant_state),
                            lambda: (state.params, state.opt_state, state.quant_state))
        new_state = state.replace(step=state.step + 1, params=kept[0], opt_state=kept[1], quant_state=kept[2])
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(config, mesh=None):
    """Jitted `eval(state, batch) -> {"loss": ...}`: dropout off, quantized forward when use_fp8.
    Like `make_train_step`, it follows the shardings of its inputs."""
    del mesh
    loss_fn = _QuantizedLoss(config)

    def evaluate(state: TrainState, batch):
        loss, _ = loss_fn(state.params, {}, state.quant_state, batch, None, quantized=config.use_fp8, with_grads=False)
        return {"loss": loss}

    return jax.jit(evaluate)
