"""Optimizers and learning-rate schedules from ``config.optimizer`` (optax does the work)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """``rsqrt`` is T5's: the peak rate until ``warmup_steps``, then ``peak*sqrt(warmup/step)``."""
    peak, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "constant":
        return optax.constant_schedule(peak)
    if opt.schedule == "rsqrt":
        return lambda step: peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
    if opt.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)),
             optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1))],
            [warmup],
        )
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1))
    raise ValueError(opt.schedule)  # unreachable: config.validate checks the name


def make_optimizer(
    opt: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adafactor (T5's defaults: factored second moments, decay 0.8, update clipping 1.0),
    AdamW, or LAMB (You et al., 2020; ALBERT's optimizer: Adam moments, then each parameter's
    update scaled by ||w|| / ||update||); optional global-norm clipping in front."""
    schedule = make_schedule(opt, num_steps)
    if opt.name == "adafactor":
        tx = optax.adafactor(learning_rate=schedule, weight_decay_rate=opt.weight_decay or None)
    elif opt.name == "lamb":
        tx = optax.lamb(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    else:
        tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx, schedule
