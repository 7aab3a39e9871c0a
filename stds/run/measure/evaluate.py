"""Evaluation of a run: test loss, top-1/top-5, firing rates and SynOps, reduced over ranks; and
the check that every rank holds the same network."""

from __future__ import annotations

from typing import Any

import torch
from spikingjelly.activation_based import functional
from torch import nn

from stds.run.setup import distributed
from stds.run.measure.metrics import correct_topk, loss_fn
from stds.run.setup.build import Run
from stds.run.measure.energy import energy_uj
from stds.run.measure.synops import FiringRates, count_synops


def sync_buffers(run: Run) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all ranks evaluate the same network."""
    if run.env.distributed:
        for buffer in run.core.buffers():
            torch.distributed.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, Any]:
    """``test_loss``, ``test_acc1``, ``test_acc5`` over the whole test set (reduced over ranks),
    ``firing_rates``, and ``synops`` / ``first_layer_macs`` / ``energy_uj`` on the first batch (rank 0)."""
    sync_buffers(run)
    run.core.eval()
    loss_sum = top1 = top5 = torch.zeros((), dtype=torch.float64, device=run.env.device)
    count = 0
    extras: dict[str, Any] = {"synops": None, "first_layer_macs": None, "energy_uj": None}
    with FiringRates(run.core) as rates:
        for index, (images, labels) in enumerate(run.test_loader):
            images, labels = run.to_device(images, labels)
            with run.autocast():
                scores = run.core(images)
            loss = loss_fn(run.settings.loss, scores, labels)
            loss_sum = loss_sum + loss.double() * labels.numel()
            top1 = top1 + correct_topk(scores, labels, 1)
            top5 = top5 + correct_topk(scores, labels, 5)
            count += labels.numel()
            functional.reset_net(run.core)
            if index == 0 and run.env.is_main and run.settings.synops:
                extras.update(_synops(run, images))
        firing = rates.rates()
    sums = torch.stack([loss_sum, top1, top5, torch.tensor(float(count), dtype=torch.float64).to(loss_sum.device)])
    loss_sum, top1, top5, count = distributed.all_reduce_sum(sums, run.env).tolist()
    return {"test_loss": loss_sum / count, "test_acc1": top1 / count, "test_acc5": top5 / count,
            "firing_rates": firing, **extras}


def _synops(run: Run, images: torch.Tensor) -> dict[str, Any]:
    with run.autocast():
        counts = count_synops(run.core, images[: max(run.settings.synops_samples, 1)])
    functional.reset_net(run.core)
    energy = energy_uj(counts["synops"], counts["first_layer_macs"], run.settings.energy_ac_pj,
                       run.settings.energy_mac_pj)
    return {"synops": counts["synops"], "first_layer_macs": counts["first_layer_macs"], "energy_uj": energy}


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Per-tensor sums of the parameters and buffers: equal on every rank when they are in sync."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return torch.stack([t.detach().double().sum() for t in tensors])


def ranks_in_sync(run: Run) -> bool:
    """True when every rank holds exactly the same weights as rank 0."""
    if not run.env.distributed:
        return True
    mine = fingerprint(run.core)
    gathered = [torch.empty_like(mine) for _ in range(run.env.world_size)]
    torch.distributed.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)
