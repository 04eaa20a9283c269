"""Training helpers shared by layer 2 (training from scratch) and layer 3 (fine-tuning)."""
from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["TEMPERATURE", "SOFT_WEIGHT", "distillation_loss", "fit",
           "recalibrate_batchnorm", "accuracy"]


# Knowledge distillation (Hinton et al.): softened teacher outputs at this temperature, mixed
# half and half with the labels' cross-entropy.
TEMPERATURE, SOFT_WEIGHT = 4.0, 0.5


def distillation_loss(logits, teacher_logits, labels):
    soft = nn.functional.kl_div(nn.functional.log_softmax(logits / TEMPERATURE, dim=1),
                                nn.functional.softmax(teacher_logits / TEMPERATURE, dim=1),
                                reduction="batchmean") * TEMPERATURE ** 2
    return SOFT_WEIGHT * soft + (1 - SOFT_WEIGHT) * nn.functional.cross_entropy(logits, labels)


def fit(model: nn.Module, loader, epochs: int, lr: float, desc: str,
        teacher: nn.Module | None = None) -> nn.Module:
    """SGD with momentum and a one-cycle schedule; a progress bar per epoch on stderr. With a
    `teacher`, the loss also pulls towards its outputs (knowledge distillation)."""
    if epochs <= 0:
        return model
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", file=sys.stderr,
                   leave=False, disable=None)
        for step, (images, labels) in enumerate(bar):
            optimiser.zero_grad()
            logits = model(images)
            if teacher is None:
                loss = loss_fn(logits, labels)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = distillation_loss(logits, teacher_logits, labels)
            if not torch.isfinite(loss):  # the weights are ruined: never report an accuracy
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch "
                                         f"{epoch + 1}, step {step + 1}")
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, batches: int = 20) -> nn.Module:
    """Re-estimate BatchNorm running statistics on training data.

    After a few epochs from scratch the running averages lag the weights (mobilenet_v2 sits at
    chance in eval mode while batch statistics give 0.8+); a cumulative average fixes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        model(images)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total
