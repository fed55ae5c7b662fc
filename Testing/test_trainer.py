"""Training machinery against closed forms: the EMA warm-up rule and its resume."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from AnomalyDiffusionLib.trainer import EMA, train_loop


def _scalar_model(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_ema_warmup_follows_score_sde_rule_in_closed_form():
    """Parameters held at 1 from an initial 0: after n updates the average is 1 − Π_k d_k with
    d_k = min(d, (1 + k)/(10 + k)), so the initial value keeps a share Π_k d_k."""
    d, n = 0.999, 1500
    ema = EMA(_scalar_model(0.0), d)
    target = _scalar_model(1.0)
    for _ in range(n):
        ema.update(target)
    share = np.prod([min(d, (1 + k) / (10 + k)) for k in range(n)])
    assert abs(float(ema.model.weight) - (1 - share)) < 1e-5
    assert share < 0.01  # the warm-up forgets the initial weights ...
    const = EMA(_scalar_model(0.0), d, warmup=False)
    for _ in range(n):
        const.update(target)
    assert abs(float(const.model.weight) - (1 - d**n)) < 1e-5  # ... a constant 0.999 keeps 22 % of them
    assert abs(d**n - 0.2229) < 1e-3
    assert ema.describe()["updates"] == n and "10 + n" in ema.describe()["warmup"]


def test_ema_update_count_survives_resume(tmp_path):
    """A run resumed from its checkpoint continues the warm-up where it stopped: the same EMA as
    an uninterrupted run."""

    def loss_fn(net, rng):
        x = torch.from_numpy(rng.standard_normal((8, 1)).astype(np.float32))
        return ((net(x) - 2 * x) ** 2).mean()

    torch.manual_seed(0)
    full, _ = train_loop(_scalar_model(0.0), loss_fn, tmp_path / "a", 12, lr=0.05, ema_decay=0.99, save_every=6)
    torch.manual_seed(0)
    train_loop(_scalar_model(0.0), loss_fn, tmp_path / "b", 6, lr=0.05, ema_decay=0.99, save_every=6)
    resumed, _ = train_loop(
        _scalar_model(0.0), loss_fn, tmp_path / "b", 12, lr=0.05, ema_decay=0.99, save_every=6, resume=True
    )
    assert torch.allclose(full.weight, resumed.weight, atol=1e-7)
