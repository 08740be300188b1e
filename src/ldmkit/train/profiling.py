"""Where a training step's time goes: a few steps under torch.profiler, once, inside a real run.

A device call is short, so the profile rides along in a training call (`--set profile_steps=20`) instead of costing
one of its own. The printout gives the milliseconds a step, how many of them the loop spent waiting for the CPU
workers' next batch, and torch.profiler's table of the operators that took the most device (or CPU) time.
"""

from __future__ import annotations

import time

import torch


class StepProfiler:
    """Profiles `steps` steps after `skip` more (compilation and warm-up done); call `waited` with the seconds spent
    waiting for each batch and `step_done` after each step. Prints once, then does nothing."""

    def __init__(self, steps: int, skip: int, device: torch.device, row_limit: int = 20):
        if steps < 0 or skip < 1:
            raise ValueError(f"profile_steps must be at least 0 and profile_skip at least 1, got {steps} and {skip}")
        self.steps, self.skip, self.device, self.row_limit = steps, skip, device, row_limit
        self.seen, self.wait, self.start, self.profile = 0, 0.0, 0.0, None

    def waited(self, seconds: float) -> None:
        if self.profile is not None:
            self.wait += seconds

    def step_done(self) -> None:
        if self.steps == 0:
            return
        self.seen += 1
        if self.seen == self.skip:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()
            self.start = time.perf_counter()
        elif self.seen == self.skip + self.steps and self.profile is not None:
            self._sync()
            seconds = time.perf_counter() - self.start
            self.profile.__exit__(None, None, None)
            sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
            print(
                f"profile: {self.steps} steps, {1000 * seconds / self.steps:.0f} ms a step under the profiler, "
                f"{1000 * self.wait / self.steps:.0f} ms of it waiting for the next batch",
                flush=True,
            )
            print(self.profile.key_averages().table(sort_by=sort, row_limit=self.row_limit), flush=True)
            self.profile, self.steps = None, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
