"""The report's page: its Jinja2 skeleton filled with the sections, its stylesheets and script inlined."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from persona_eval.personas import BASELINE
from persona_eval.report.format import esc


def _escape(value: Any) -> Markup:
    """Every template value not already Markup, escaped as the sections escape theirs (html.escape), so
    that the whole page spells entities one way."""
    return value if isinstance(value, Markup) else Markup(esc(value))


@functools.cache
def _environment() -> Environment:
    return Environment(loader=PackageLoader("persona_eval.report", "templates"),
                       autoescape=select_autoescape(["html"]), finalize=_escape, undefined=StrictUndefined,
                       trim_blocks=True, keep_trailing_newline=True)


@functools.cache
def _static(name: str) -> Markup:
    """A file of the package's static/ folder as the page inlines it: starting on a line of its own."""
    text = resources.files("persona_eval.report").joinpath("static", name).read_text(encoding="utf-8")
    return Markup("\n" + text)


def _csp(script: str) -> str:
    """A policy under which the page loads nothing and runs only its own inline script (by hash)."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


def render_page(*, state: str, run_id: str, judge_panel: bool, sections: Mapping[str, Markup | None]) -> str:
    """The page around the sections (by the template's names; None for a section the run has not).

    ``judge_panel``: whether the page shows the patient-safety or clinician-review section, which need the
    stylesheet of their own."""
    script = _static("report.js")
    css = _static("report.css") + (_static("safety.css") if judge_panel else "")
    return _environment().get_template("report.html").render(
        state=state, run_id=run_id, baseline=BASELINE, csp=_csp(script), css=css, script=script, **sections)
