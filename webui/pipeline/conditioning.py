"""What conditions the UNet at each step: prompt editing schedules and AND sub-prompts.

Each image has sub-prompts (`a cat AND a dog :0.5`), each a schedule of texts over the steps,
and a negative prompt with its own schedule. `ScheduledConditioning.at(step)` gives the rows
the UNet sees at that step; a row per (image, sub-prompt) plus a row per image for the
negative. Texts are encoded once per job (the conditioner caches) and each distinct
combination of texts is stacked once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from webui.prompts.encode import TextConditioner
from webui.prompts.parser import prompt_schedule, split_and

Schedule = list[tuple[int, str]]  # (last step of this text, text)


@dataclass(frozen=True)
class PromptPlan:
    cond: list[list[tuple[Schedule, float]]]  # per image: (schedule, weight) per sub-prompt
    uncond: list[Schedule]  # per image


def plan_prompts(prompts: list[str], negatives: list[str], steps: int) -> PromptPlan:
    cond = [[(prompt_schedule(text, steps), weight) for text, weight in split_and(p)] for p in prompts]
    return PromptPlan(cond=cond, uncond=[prompt_schedule(n, steps) for n in negatives])


def text_at(schedule: Schedule, step: int) -> str:
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


@dataclass
class StepConditioning:
    context: torch.Tensor  # [rows, tokens, D]
    pooled: torch.Tensor | None  # [rows, P]
    row_image: torch.Tensor  # image index of each row
    cond_rows: list[list[tuple[int, float]]]  # per image: (row, weight)
    uncond_rows: list[int] | None  # per image; None when guidance is off


class ScheduledConditioning:
    def __init__(self, conditioner: TextConditioner, plan: PromptPlan, guided: bool) -> None:
        self.conditioner = conditioner
        self.plan = plan
        self.guided = guided
        self._stacked: dict[tuple[str, ...], StepConditioning] = {}

    def prepare(self, steps: Iterable[int]) -> None:
        """Encode and stack the texts of `steps` (1-based) now, so the sampling loop only looks
        them up: the text encoder running mid-loop would make the host wait for the GPU, and in
        medvram it would send the UNet back to RAM for a moment."""
        for step in steps:
            self.at(step)

    def at(self, step: int) -> StepConditioning:
        texts: list[str] = []
        row_image: list[int] = []
        cond_rows: list[list[tuple[int, float]]] = []
        for image, subs in enumerate(self.plan.cond):
            rows = []
            for schedule, weight in subs:
                rows.append((len(texts), weight))
                texts.append(text_at(schedule, step))
                row_image.append(image)
            cond_rows.append(rows)
        uncond_rows = None
        if self.guided:
            uncond_rows = []
            for image, schedule in enumerate(self.plan.uncond):
                uncond_rows.append(len(texts))
                texts.append(text_at(schedule, step))
                row_image.append(image)
        key = tuple(texts)
        if key not in self._stacked:
            batch = self.conditioner.batch(texts)
            self._stacked[key] = StepConditioning(
                batch.context, batch.pooled, torch.tensor(row_image), cond_rows, uncond_rows
            )
        return self._stacked[key]
