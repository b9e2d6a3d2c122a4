"""Which persona-eval cases run, and where: the controls stay in the run whatever ``-k`` selects (every
comparison is made against them), and under pytest-xdist one model's cases run on one worker (no model
loads twice) and every worker writes into the controller's run."""

from __future__ import annotations

import re
from typing import Any

import pytest

from persona_eval.comparisons import CONTROLS
from persona_eval.personas import PLACEBO
from persona_eval.session import Condition, WorkerState
from persona_eval.settings import Settings
from persona_eval.tasks import registered

__all__ = ["condition_of", "kept_control_key", "pytest_collection_finish", "pytest_collection_modifyitems",
           "pytest_configure_node", "pytest_deselected", "pytest_xdist_make_scheduler", "settings_key", "state_key"]

settings_key = pytest.StashKey[Settings]()
state_key = pytest.StashKey[WorkerState]()
kept_control_key = pytest.StashKey[bool]()  # on a control case that -k left out and the run kept


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker writes into the controller's run."""
    node.workerinput["pe_run_id"] = node.config.stash[state_key].run_id


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduler for ``--dist loadgroup`` (the mode set above for ``-n``), grouping the
    cases of one model on one worker.

    xdist's own loadgroup scheduler groups by an "@group" suffix that its workers add to each node id of
    a case marked ``xdist_group``; with pytest 9 that suffix is never added (node ids are no longer the
    attribute xdist writes), so each case became a group of its own and every worker loaded every model.
    This one finds a case's model from the case's id instead, which the controller knows without
    collecting, and keeps xdist's behaviour for every other test."""
    if config.getvalue("dist") != "loadgroup" or settings_key not in config.stash:
        return None
    from xdist.scheduler import LoadGroupScheduling

    settings = config.stash[settings_key]
    model_of = {Condition(task, model, persona).id: model.name
                for task in registered() for model in settings.models for persona in settings.registry}

    class ModelGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            param = nodeid.rpartition("[")[2]
            model = model_of.get(param[:-1]) if param.endswith("]") else None
            return f"persona-eval model {model}" if model is not None else str(super()._split_scope(nodeid))

    return ModelGroupScheduling(config, log)



kept_key = pytest.StashKey[list[pytest.Item]]()
order_key = pytest.StashKey[list[pytest.Item]]()


def condition_of(item: pytest.Item) -> Condition | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return next((value for value in callspec.params.values() if isinstance(value, Condition)), None)


@pytest.hookimpl(tryfirst=True)
def pytest_deselected(items: list[pytest.Item]) -> None:
    """Keep the controls of every (task, model) that still has a persona selected: the gate compares each
    persona with them, so a -k that leaves them out would leave every regression rule unchecked; and the
    placebo, against whose flips every persona's are read. A -k expression that names a control
    (``-k "triage and not no_persona"``) is obeyed.

    `items` is the list of deselected items that the other implementations of this hook (the terminal's
    count) see next, so the kept controls are taken out of it here, and put back into the run by
    pytest_collection_modifyitems below."""
    if not items:
        return
    session = items[0].session
    config = session.config
    if settings_key not in config.stash:
        return
    deselected = set(items)
    controls = (*CONTROLS, PLACEBO)
    selected = {(c.task, c.model.name) for item in session.items if item not in deselected
                and (c := condition_of(item)) is not None and c.persona.id not in controls}
    # A control that the -k expression names ("not no_persona") was left out on purpose: it stays out, and
    # the rules against it are reported as not checked.
    named = set(re.findall(r"[A-Za-z0-9_]+", config.option.keyword or ""))
    keep = [item for item in items if (c := condition_of(item)) is not None and c.persona.id in controls
            and c.persona.id not in named and (c.task, c.model.name) in selected]
    if keep:
        config.stash.setdefault(order_key, list(session.items))
        config.stash.setdefault(kept_key, []).extend(keep)
        kept = set(keep)
        items[:] = [item for item in items if item not in kept]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept = config.stash.get(kept_key, [])
    if not kept:
        return
    for item in kept:
        item.stash[kept_control_key] = True
    present = set(items) | set(kept)
    items[:] = [item for item in config.stash[order_key] if item in present]


def pytest_collection_finish(session: pytest.Session) -> None:
    """The conditions this process will run, in order: a served model's pool is filled with all of them
    ahead of the case at hand (persona_eval.session.WorkerState.planned). Under pytest-xdist every worker
    collects every selected case and one model's cases run on one worker, so the worker that runs a
    model's first case runs the rest of them too."""
    if state_key in session.config.stash:
        session.config.stash[state_key].planned = [c for item in session.items
                                                   if (c := condition_of(item)) is not None]
