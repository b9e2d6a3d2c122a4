"""End to end through the real plugin: a thresholds, models or personas file that would switch the gate off
or fail mid-session is a usage error before any model loads, naming the file, line and field.

- ``max: 10`` on under_triage_rate (a percentage where a share belongs) can never be crossed;
- ``personas: [ed_nures]`` (a typo) would make a bound apply to nobody;
- ``dtype: bf16``, a CUDA device the machine lacks, a malformed base URL would fail when the model loads;
- a persona with a misspelled group.

Each run exits with pytest's USAGE_ERROR, prints one line with "did you mean", no traceback, and loads no
model (nothing is written to the cache, where the embedded model would be prepared).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    return pytester


def run_evals(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-cache-dir", str(pytester.path / "cache"),
        "--pe-reports-dir", str(pytester.path / "reports"), *args)


def usage_error(pytester: pytest.Pytester, result: pytest.RunResult) -> str:
    """The run's output, once it is known to be a usage error that loaded no model."""
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    cache = pytester.path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))
    return out


def write(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_rate_bound_given_as_a_percentage_is_a_usage_error(project: pytest.Pytester) -> None:
    thresholds = write(project, "thresholds.yaml", """\
version: 1
triage:
  bounds:
    - metric: under_triage_rate
      stratum: emergency
      max: 10
      mode: fail
""")
    out = usage_error(project, run_evals(project, "--pe-thresholds", str(thresholds)))
    assert (f"{thresholds}:6: triage.bounds[0].max: 10 is outside the range of under_triage_rate "
            "(a share, 0 to 1); did you mean 0.10?") in out


def test_a_bound_that_can_never_be_crossed_is_a_usage_error(project: pytest.Pytester) -> None:
    thresholds = write(project, "thresholds.yaml", """\
version: 1
triage:
  bounds:
    - {metric: accuracy, stratum: emergency, min: 0, mode: fail}
""")
    out = usage_error(project, run_evals(project, "--pe-thresholds", str(thresholds)))
    assert f"{thresholds}:4: triage.bounds[0].min: min 0 can never be crossed" in out


def test_a_misspelled_persona_filter_is_a_usage_error(project: pytest.Pytester) -> None:
    thresholds = write(project, "thresholds.yaml", """\
version: 1
triage:
  bounds:
    - metric: under_triage_rate
      stratum: emergency
      max: 0.10
      personas: [ed_nures]
""")
    out = usage_error(project, run_evals(project, "--pe-thresholds", str(thresholds)))
    assert f"{thresholds}:7: triage.bounds[0].personas[0]: no persona is called 'ed_nures'" in out
    assert "Did you mean 'ed_nurse'?" in out


def test_a_models_file_dtype_alias_is_a_usage_error_before_any_model_loads(project: pytest.Pytester) -> None:
    models = write(project, "models.yaml", """\
models:
  llama-8b:
    backend: hf
    model: meta-llama/Llama-3.1-8B-Instruct
    dtype: bf16
""")
    out = usage_error(project, run_evals(project, "--pe-models-file", str(models), "--pe-model", "llama-8b"))
    assert (f"{models}:5: models.llama-8b.dtype: 'bf16' is not a torch dtype; did you mean 'bfloat16'?"
            in out)


def test_a_malformed_base_url_is_a_usage_error(project: pytest.Pytester) -> None:
    models = write(project, "models.yaml", """\
models:
  served:
    backend: openai
    model: my-model
    base_url: http://:8000/v1
""")
    out = usage_error(project, run_evals(project, "--pe-models-file", str(models), "--pe-model", "served"))
    assert f"{models}:5: models.served.base_url: the base URL 'http://:8000/v1' names no host" in out


def test_a_cuda_device_this_machine_lacks_is_a_usage_error(project: pytest.Pytester) -> None:
    models = write(project, "models.yaml", """\
models:
  local:
    backend: embedded
    device: cuda:99
""")
    out = usage_error(project, run_evals(project, "--pe-models-file", str(models), "--pe-model", "local"))
    assert f"{models}:4: models.local.device: 'cuda:99' names" in out


def test_a_misspelled_persona_group_is_a_usage_error(project: pytest.Pytester) -> None:
    personas = write(project, "personas.yaml", """\
personas:
  - id: primary_care_physician
    group: medcal
    role: primary care physician
""")
    out = usage_error(project, run_evals(project, "--pe-personas-file", str(personas)))
    assert f"{personas}:3: personas[0].group: unknown group 'medcal'. Did you mean 'medical'" in out
