"""MoCo v2 written by hand in plain PyTorch: the reference the framework-overhead benchmark compares to.

Everything a MoCo v2 step does and nothing else: query encoder (ResNet-18 + MLP head 512-2048-128), key
encoder updated by momentum, a preallocated K x D queue with an index pointer, InfoNCE (tau 0.2) as a
cross-entropy, SGD. Optional bf16 autocast and channels_last, as the benchmark's levers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from backbone import resnet18
from torch import nn


class BareMoCo(nn.Module):
    def __init__(self, stem: str = "cifar", dim: int = 128, hidden: int = 2048, queue_size: int = 4096,
                 momentum: float = 0.99, temperature: float = 0.2) -> None:
        super().__init__()
        self.backbone = resnet18(stem)
        self.head = nn.Sequential(nn.Linear(512, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.ptr = 0
        self.m, self.t = momentum, temperature

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.head(self.backbone(x_q)).float(), dim=1)
        with torch.no_grad():
            theta_q = [*self.backbone.parameters(), *self.head.parameters()]
            theta_k = [*self.key_backbone.parameters(), *self.key_head.parameters()]
            torch._foreach_lerp_(theta_k, theta_q, 1.0 - self.m)
            k = F.normalize(self.key_head(self.key_backbone(x_k)).float(), dim=1)
        l_pos = (q * k).sum(1, keepdim=True)
        l_neg = q @ self.queue.T.clone()
        logits = torch.cat([l_pos, l_neg], 1) / self.t
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        with torch.no_grad():
            self.queue[self.ptr:self.ptr + len(k)] = k
            self.ptr = (self.ptr + len(k)) % len(self.queue)
        return loss


class BareStep:
    """``step(x_q, x_k)``: one SGD step of :class:`BareMoCo`, under bf16 autocast when asked."""

    def __init__(self, model: BareMoCo, lr: float = 0.06, bf16: bool = False, channels_last: bool = False,
                 compile: bool = False) -> None:
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        if compile:  # as sslcore's train.compile: the encoders and heads, not the queue bookkeeping
            for module in (model.backbone, model.head, model.key_backbone, model.key_head):
                module.compile()
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                   weight_decay=5e-4)
        self.bf16, self.channels_last = bf16, channels_last

    def __call__(self, x_q: torch.Tensor, x_k: torch.Tensor) -> float:
        if self.channels_last:
            x_q, x_k = x_q.contiguous(memory_format=torch.channels_last), x_k.contiguous(
                memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(x_q, x_k)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss
