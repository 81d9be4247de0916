"""Carrying out one host's ``HostPlan`` through its executor: read the facts, apply the steps, or show
what they would change (dry run). Deploy runs it on every server host, and on the balancer host for watch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llamactl.plan.deploy import DesiredHost, HostPlan, Upload, facts_command
from llamactl.plan.facts import HostFacts, parse_facts
from llamactl.remote.base import Executor


@dataclass
class FileDiff:
    path: str
    old: bytes | None
    new: bytes
    secret: bool


def read_facts(executor: Executor, desired: DesiredHost) -> HostFacts:
    """The host's state in one round trip."""
    return parse_facts(executor.run(facts_command(desired)).stdout)


def file_diffs(executor: Executor, plan: HostPlan, desired: DesiredHost) -> list[FileDiff]:
    """Dry run: each rendered file the plan would upload, next to what the host has now."""
    return [FileDiff(step.remote_path, executor.read_bytes(step.remote_path), step.content, step.secret)
            for step in plan.steps
            if isinstance(step, Upload) and step.content is not None and step.remote_path in desired.files]


def apply_plan(executor: Executor, plan: HostPlan, say: Callable[[str], None]) -> None:
    """Carry out the plan's steps in order: uploads, then the commands (a venv build may take minutes)."""
    for step in plan.steps:
        if isinstance(step, Upload):
            say(f"uploading {step.remote_path}")
            if step.content is not None:
                executor.put_bytes(step.content, step.remote_path, mode=step.mode)
            else:
                assert step.local_path is not None
                executor.put_file(step.local_path, step.remote_path, mode=step.mode)
        else:
            say(step.why)
            executor.run(step.command, timeout_s=1800)
