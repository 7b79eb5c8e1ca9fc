"""The model chunk megatron's schedule runs during distillation: the student and the frozen teacher,
stage by stage.

`DistillationChunk` wraps (never patches) the two models of this pipeline stage. In its forward the
teacher runs under `no_grad` and the student with autograd; on every stage but the last the chunk
returns `[student hidden | teacher hidden]` concatenated along the hidden axis, so the activation
megatron sends to the next stage carries what that stage needs from the teacher, and the next
stage's `set_input_tensor` splits it again. The schedule learns the width of that tensor from the
chunk's own `config` (a copy of the student's with `hidden_size` = both widths), and calls the
student's DDP hooks (`no_sync`, `finalize_model_grads`) through it. The gradient that comes back for
the teacher's half is zero and is dropped: the teacher holds no graph.

Intermediate losses are computed on the stage that holds both mapped layers, from hidden states
captured by forward hooks, and attached to the student's output with `AttachLoss`, so their gradient
enters megatron's backward pass on that stage like the gradient of any other loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_minitron.config import ConfigError


class AttachLoss(torch.autograd.Function):
    """Identity on `output`; in the backward pass `loss` receives gradient 1, as if it had been added
    to the final loss. (1 is the loss scale of fp32 and bf16 training, the only precisions built here;
    fp16's dynamic loss scaling would have to scale it.)"""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_output.device)


@dataclass(frozen=True)
class LayerPair:
    """An intermediate loss: teacher layer `teacher` against student layer `student` (0-based)."""

    teacher: int
    student: int

    @property
    def name(self) -> str:
        return f"t{self.teacher}_s{self.student}"


def parse_layer_pairs(values, *, teacher_layers: int, student_layers: int) -> tuple[LayerPair, ...]:
    """`T:S` strings (0-based teacher and student layer indices) into checked pairs."""
    pairs = []
    for value in values or ():
        try:
            t, s = (int(part) for part in str(value).split(":"))
        except ValueError:
            raise ConfigError(f"--intermediate-layers {value!r}: expected TEACHER:STUDENT layer indices, "
                              f"e.g. 11:5") from None
        if not (0 <= t < teacher_layers and 0 <= s < student_layers):
            raise ConfigError(f"--intermediate-layers {value}: the teacher has layers 0..{teacher_layers - 1} and "
                              f"the student 0..{student_layers - 1}")
        pairs.append(LayerPair(t, s))
    if len({p.student for p in pairs}) != len(pairs) or len({p.teacher for p in pairs}) != len(pairs):
        raise ConfigError(f"--intermediate-layers {' '.join(map(str, values))}: each layer may appear in one pair")
    return tuple(pairs)


def check_pairs_on_stages(pairs, teacher_stages: list[int], student_stages: list[int]) -> None:
    """Each pair's two layers must live on the same pipeline stage (the hidden states are compared
    there); a clear error names the pair and both layouts otherwise."""
    def stage_of(layer: int, counts: list[int]) -> int:
        total = 0
        for stage, n in enumerate(counts):
            total += n
            if layer < total:
                return stage
        raise AssertionError(layer)

    for pair in pairs:
        ts, ss = stage_of(pair.teacher, teacher_stages), stage_of(pair.student, student_stages)
        if ts != ss:
            raise ConfigError(f"--intermediate-layers {pair.teacher}:{pair.student}: teacher layer {pair.teacher} is on "
                              f"pipeline stage {ts} (teacher layers per stage {teacher_stages}) but student layer "
                              f"{pair.student} on stage {ss} (student {student_stages}); choose layers on the same stage "
                              f"or move them with --first/--last-stage-layers and --teacher-first/last-stage-layers")


def normalized(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the hidden axis, in fp32: the two models' hidden states are
    compared after normalisation, so their scales do not matter."""
    return F.layer_norm(x.float(), (x.shape[-1],))


class DistillationChunk(torch.nn.Module):
    """One pipeline stage of student + teacher for megatron's forward-backward schedule."""

    def __init__(self, student, teacher, *, student_hidden: int, teacher_hidden: int, is_last_stage: bool,
                 finalize_model_grads: Callable, tp_rank: int = 0, pairs: tuple[LayerPair, ...] = (),
                 adapters: Optional[torch.nn.ModuleDict] = None, intermediate_loss: Optional[Callable] = None) -> None:
        super().__init__()
        from megatron_minitron.model.build import unwrap

        self.module = student  # megatron's helpers look for `decoder` etc. through `.module`
        self._teacher = [teacher]  # a list: not a submodule, so .train()/.parameters() never reach it
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.is_last_stage = is_last_stage
        self.config = copy.copy(unwrap(student).config)
        self.config.hidden_size = student_hidden + teacher_hidden  # the width of what crosses a stage
        self.config.no_sync_func = student.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self._adapters = [adapters]  # owned (and trained, saved) by the student; a list keeps them unregistered here
        self.intermediate_loss = intermediate_loss
        self.tp_rank = tp_rank
        self.weights: dict[str, float] = {}  # per pair name: multiplier of its loss sum (rescaling)
        self.pairs = tuple(p for p in pairs if self._local(unwrap(student), p.student)
                           and self._local(unwrap(teacher), p.teacher))
        self._student_hidden: dict[int, torch.Tensor] = {}
        self._teacher_hidden: dict[int, torch.Tensor] = {}
        self._hooks = self._capture(unwrap(student), {p.student for p in self.pairs}, self._student_hidden)
        self._hooks += self._capture(unwrap(teacher), {p.teacher for p in self.pairs}, self._teacher_hidden)
        self._hooks += batch_major_logits(unwrap(student)) + batch_major_logits(unwrap(teacher))
        self.reports: list[torch.Tensor] = []  # per micro-batch [pairs, 2]: loss sum, token count
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)

    @property
    def teacher(self):
        return self._teacher[0]

    def close(self) -> None:
        """Remove the capture hooks (a teacher reused for another student must not keep them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @staticmethod
    def _local(gpt, layer: int) -> bool:
        return any(l.layer_number - 1 == layer for l in gpt.decoder.layers)

    @staticmethod
    def _capture(gpt, layers: set[int], store: dict) -> list:
        def hook_for(index: int):
            def hook(_module, _args, output):
                store[index] = output[0] if isinstance(output, tuple) else output
            return hook
        return [layer.register_forward_hook(hook_for(layer.layer_number - 1)) for layer in gpt.decoder.layers
                if layer.layer_number - 1 in layers]

    def set_input_tensor(self, input_tensor) -> None:
        from megatron.core.utils import get_attr_wrapped_model

        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        student = get_attr_wrapped_model(self.module, "set_input_tensor")
        teacher = get_attr_wrapped_model(self.teacher, "set_input_tensor")
        if input_tensor is None:
            student(None)
            teacher(None)
            return
        student_part, teacher_part = input_tensor.split([self.student_hidden, self.teacher_hidden], dim=-1)
        student(student_part)
        teacher(teacher_part.detach())

    def forward(self, tokens, position_ids, attention_mask, *, loss_mask: Optional[torch.Tensor] = None):
        """(student output, teacher output) on the last stage; their concatenation elsewhere."""
        with torch.no_grad():
            teacher_out = self.teacher(tokens, position_ids, attention_mask)
        student_out = self.module(tokens, position_ids, attention_mask)
        if self.pairs:
            student_out = self._attach_intermediate(student_out, loss_mask)
        if self.is_last_stage:
            return student_out, teacher_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)

    def _attach_intermediate(self, student_out: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Loss sums of this stage's layer pairs, attached to the student's output for the backward."""
        total, rows = 0.0, []
        for pair in self.pairs:
            s_hidden = self._student_hidden.pop(pair.student)
            t_hidden = self._teacher_hidden.pop(pair.teacher)
            adapters = self._adapters[0]
            if adapters is not None and pair.name in adapters:
                s_hidden = adapters[pair.name](s_hidden)
            per_token = self.intermediate_loss(normalized(s_hidden), normalized(t_hidden))  # [s, b]
            mask = _sequence_mask(loss_mask, per_token, self.tp_rank)
            loss_sum = torch.where(mask.bool(), per_token, 0.0).sum()  # a NaN at a masked token stays out
            total = total + loss_sum * self.weights.get(pair.name, 1.0)
            rows.append(torch.stack([loss_sum.detach(), mask.sum()]))
        self.reports.append(torch.stack(rows))
        return AttachLoss.apply(student_out, total)


def _sequence_mask(loss_mask: Optional[torch.Tensor], per_token: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """The loss mask [b, s] laid out like a hidden-state loss [s_local, b] (sequence-parallel ranks hold
    their slice of the sequence)."""
    if loss_mask is None:
        return torch.ones_like(per_token)
    mask = loss_mask.t().to(per_token)
    if mask.shape[0] != per_token.shape[0]:
        chunk = per_token.shape[0]
        mask = mask[tp_rank * chunk:(tp_rank + 1) * chunk]
    return mask


def batch_major_logits(gpt) -> list:
    """Hooks that make the output layer of `gpt` (if this stage has it) write its logits batch-major.

    megatron's GPTModel returns logits [b, s, V] as `logits.transpose(0, 1).contiguous()` of the output
    layer's [s, b, V]: a copy of the largest activation in each model's forward and another in the
    student's backward (three vocabulary-sized copies per micro-batch, about as much time as the KL's
    backward on the CPU). Feeding the layer its input as [b, s, h] (a copy h/V the size) and handing back
    the [s, b, V] view of its [b, s, V] result makes that `.contiguous()` return the tensor itself, so
    neither the forward nor the backward copies the logits. Only the order in which the output weight's
    gradient sums the tokens changes. Not under sequence parallelism, where the layer first gathers its
    input's sequence slices along dim 0 and so needs the sequence first. Returns the hook handles (none
    then). Distillation from a cache hooks its student too: it then sums the output weight's gradient in
    the online run's order (and copies no logits either)."""
    layer = getattr(gpt, "output_layer", None)
    if layer is None or gpt.config.sequence_parallel:
        return []

    def batch_first(_module, args, kwargs):
        hidden, *rest = args
        return (hidden.transpose(0, 1).contiguous(), *rest), kwargs

    def sequence_first_view(_module, _args, _kwargs, output):
        logits, bias = output
        return logits.transpose(0, 1), bias

    return [layer.register_forward_pre_hook(batch_first, with_kwargs=True),
            layer.register_forward_hook(sequence_first_view, with_kwargs=True)]
