"""Training machinery shared by the training scripts: EMA, exact resume, atomic checkpoints, loss log.

Checkpoints are a folder ``checkpoint/`` with ``state.safetensors`` (model, EMA and optimizer
tensors, torch RNG state) and ``state.json`` (iteration, numpy RNG state, loss history, run
arguments). Nothing is pickled. The folder is written beside the old one and swapped in, so an
interrupted save never leaves a broken checkpoint. ``--resume`` restores everything, so a resumed
run continues with exactly the batches, noise and updates the uninterrupted run would have used.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .devices import resolve_device
from .errors import AnomalyDiffusionError
from .modelio import load_weights  # re-exported: callers once imported it from here
from .progress import CancelToken, ProgressCallback, report

log = logging.getLogger(__name__)


#: the EMA warm-up rule, recorded in checkpoints and weight metadata
EMA_WARMUP_RULE = "min(decay, (1 + n) / (10 + n)) after n updates (score_sde models/ema.py)"


class EMA:
    """Exponential moving average of parameters (and a copy of buffers): θ̄ ← d_n·θ̄ + (1 − d_n)·θ.

    With ``warmup`` (default) the decay of the n-th update (n = 0, 1, …) is d_n = min(d, (1 + n)/(10 + n)),
    score_sde's rule: without it, decay 0.999 leaves 0.999^1500 ≈ 22 % of the initial weights in the
    average after 1,500 iterations, a large share of an untrained network in a short CPU run.
    ``warmup=False`` is the constant decay of older runs. ``updates`` counts the updates so far (it is
    restored on resume).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    def describe(self) -> dict:
        """What a weight file's metadata records about its averaging."""
        return {"decay": self.decay, "warmup": EMA_WARMUP_RULE if self.warmup else "none", "updates": self.updates}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)


# ------------------------------------------------------------------------------------ checkpoints
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    ema: EMA | None,
    opt: torch.optim.Optimizer,
    iteration: int,
    rng: np.random.Generator | list[dict],
    history: list[dict],
    run: dict,
    torch_rng: list[torch.Tensor] | None = None,
) -> None:
    """Write ``folder/checkpoint`` atomically (new folder written first, then swapped in).

    Under DDP, ``rng`` is the list of every rank's numpy generator state and ``torch_rng`` every
    rank's torch RNG state (gathered by the caller), so each rank resumes its own stream.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.model.state_dict().items()})
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    if torch_rng is None:
        tensors["rng.torch"] = torch.get_rng_state()
    else:
        for r, state in enumerate(torch_rng):
            tensors[f"rng.torch.{r}"] = state
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "iteration": iteration,
        "numpy_rng": rng if isinstance(rng, list) else rng.bit_generator.state,
        "optimizer": opt_meta,
        "history": history,
        "run": run,
        "ema_decay": None if ema is None else ema.decay,
        "ema": None if ema is None else ema.describe(),
    }
    final = folder / "checkpoint"
    tmp = folder / ".checkpoint.partial"
    old = folder / ".checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, default=_json_default))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def load_checkpoint(
    folder: Path, model: nn.Module, ema: EMA | None, opt: torch.optim.Optimizer, rng: np.random.Generator, rank: int = 0
) -> tuple[int, list[dict], dict]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (iteration, history, run)."""
    ck = folder / "checkpoint"
    if not (ck / "state.safetensors").is_file():
        raise AnomalyDiffusionError(f"no checkpoint to resume in '{folder}'")
    tensors = load_file(str(ck / "state.safetensors"))
    meta = json.loads((ck / "state.json").read_text())
    load_weights(
        model,
        {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        what=f"checkpoint in '{folder}'",
    )
    if ema is not None:
        ema_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if ema_sd:
            load_weights(ema.model, ema_sd, what=f"EMA in '{folder}'")
        # checkpoints before the warm-up rule had a constant decay: they resume as they ran
        ema_meta = meta.get("ema") or {"warmup": "none", "updates": int(meta["iteration"])}
        ema.warmup = ema_meta.get("warmup", "none") != "none"
        ema.updates = int(ema_meta.get("updates", meta["iteration"]))
    _unflatten_optimizer(opt, tensors, meta["optimizer"])
    torch_rng = tensors.get(f"rng.torch.{rank}", tensors.get("rng.torch"))
    if torch_rng is None:
        raise AnomalyDiffusionError(f"checkpoint in '{folder}' lacks the torch random state")
    torch.set_rng_state(torch_rng)
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    states = meta["numpy_rng"]
    if isinstance(states, list):
        if rank >= len(states):
            raise AnomalyDiffusionError(f"checkpoint was written by {len(states)} processes; resume with as many")
        states = states[rank]
    rng.bit_generator.state = states
    return int(meta["iteration"]), list(meta["history"]), dict(meta["run"])


# ------------------------------------------------------------------------------------- loss log
def write_loss_log(folder: Path, history: list[dict], title: str = "training loss") -> None:
    """``loss.csv`` (iteration, loss, lr, seconds) and ``loss.png`` (raw and smoothed loss)."""
    if not history:
        return
    keys = list(history[0])
    tmp = folder / ".loss.csv.partial"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, folder / "loss.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.array([h["iteration"] for h in history])
    loss = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(it, loss, lw=0.6, alpha=0.4, label="loss")
    if len(loss) >= 10:
        k = max(5, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """Process-group facts; ``world == 1`` when not launched by ``torchrun``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise DDP when launched by ``torchrun`` (NCCL on GPUs, Gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, index=local)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def cleanup_distributed(barrier: bool = False) -> None:
    """Leave the process group (a no-op without one).

    ``barrier``: wait for every rank first; give it on the normal way out, when every rank gets here.
    Without it a rank that finishes first (rank 1, while rank 0 still writes the checkpoint) closes
    its Gloo sockets while its peer may still read from them, and Gloo aborts that peer (SIGABRT).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- the loop
def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, np.random.Generator], torch.Tensor],
    out: Path,
    iterations: int,
    lr: float = 1e-4,
    ema_decay: float = 0.9999,
    save_every: int = 1000,
    log_every: int = 10,
    seed: int = 0,
    resume: bool = False,
    run: dict | None = None,
    amp: bool = False,
    dist: Dist | None = None,
    optimizer: str = "adamw",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    ema_warmup: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """Generic loop: ``loss_fn(model, rng)`` draws its own batch from ``rng`` and returns a loss.

    AdamW (β 0.9/0.999, no weight decay) or Adam; EMA of weights (with score_sde's warm-up unless
    ``ema_warmup`` is False; a resumed run keeps the rule its checkpoint was written with); bf16
    autocast when ``amp`` on a GPU; DDP when ``dist.world > 1`` (each rank draws different batches;
    rank 0 writes). ``run`` is stored in each checkpoint; a resume refuses a checkpoint whose ``model``
    (or, when the checkpoint has one, ``data``) differs. Returns the EMA model (or the model when
    ``ema_decay`` is 0) and the loss history.
    """
    import time

    dist = dist or Dist()
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(dist.device)
    ema = EMA(model, ema_decay, warmup=ema_warmup) if ema_decay > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    else:
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    rng = np.random.default_rng([seed, dist.rank])
    torch.manual_seed(seed * 1000 + dist.rank)
    start, history = 0, list[dict]()
    if resume:
        start, history, old_run = load_checkpoint(out, model, ema, opt, rng, rank=dist.rank)
        if run and old_run.get("model") != run.get("model"):
            raise AnomalyDiffusionError(
                f"cannot resume: checkpoint model {old_run.get('model')} differs from {run.get('model')}"
            )
        if run and "data" in old_run and old_run["data"] != run.get("data"):  # e.g. slices framed otherwise
            raise AnomalyDiffusionError(
                f"cannot resume: checkpoint data {old_run['data']} differs from {run.get('data')}"
            )
        log.info("resumed at iteration %d", start)
    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device] if dist.device.type == "cuda" else None
        )
    use_amp = amp and dist.device.type == "cuda"
    t0 = time.perf_counter()
    elapsed0 = history[-1]["seconds"] if history else 0.0
    model.train()
    for it in range(start, iterations):
        if cancel is not None:
            cancel.check()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(net, rng)
        if not torch.isfinite(loss):
            raise AnomalyDiffusionError(f"loss became {loss.item()} at iteration {it}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)
        if (it + 1) % log_every == 0 or it + 1 == iterations:
            history.append(
                {
                    "iteration": it + 1,
                    "loss": float(loss.item()),
                    "lr": lr,
                    "seconds": round(elapsed0 + time.perf_counter() - t0, 2),
                }
            )
        report(progress, "train", (it + 1) / iterations, f"loss {loss.item():.4f}")
        if (it + 1) % save_every == 0 or it + 1 == iterations:
            rng_states: np.random.Generator | list[dict] = rng
            torch_states: list[torch.Tensor] | None = None
            if dist.world > 1:  # every rank resumes its own random stream
                gathered_rng: list[Any] = [None] * dist.world
                torch.distributed.all_gather_object(gathered_rng, rng.bit_generator.state)
                gathered_torch: list[Any] = [None] * dist.world
                torch.distributed.all_gather_object(gathered_torch, torch.get_rng_state())
                rng_states, torch_states = gathered_rng, gathered_torch
            if dist.main:
                save_checkpoint(out, model, ema, opt, it + 1, rng_states, history, run or {}, torch_states)
                write_loss_log(out, history)
    if dist.main and start >= iterations and history:
        write_loss_log(out, history)
    return (ema.model if ema is not None else model), history
