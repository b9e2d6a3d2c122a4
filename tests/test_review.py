"""The clinician review round trip, end to end: a scripted run with known consensus cases, blinded export,
filled annotation files back in (including bad ones), and the statistics against references."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sklearn.metrics import cohen_kappa_score

from persona_eval.cache import NullCache
from persona_eval.data import load_safety_queries
from persona_eval.errors import ConfigError, DataError
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.results import read_jsonl, write_jsonl
from persona_eval.review import MIN_KAPPA_ITEMS, export_review, import_review
from persona_eval.runner import Runner
from persona_eval.safety_eval import evaluate_safety, judge_model_responses, responses_by_persona

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "safety" / "queries.jsonl"
MODEL = "secret-model-7b"
PERSONAS = [p.id for p in STUDY_PERSONAS]
GROUPS = {p.id: p.group for p in STUDY_PERSONAS}
_RESPONSE = re.compile(r"Response (\d+):\n<<<\n(.*?)\n>>>", re.DOTALL)
_QUESTION = re.compile(r"Patient's message:\n<<<\n(.*?)\n>>>", re.DOTALL)


def opaque_text(prompt: str) -> str:
    """A response that does not reveal its persona: a digest of the prompt."""
    return f"Answer {hashlib.sha256(prompt.encode()).hexdigest()[:10]}: please take care."


def consensus_plan(queries: list[Any]) -> dict[str, list[str | None]]:
    """Question -> the persona each of the 3 judges puts first (None: an invalid reply).

    Categories 1-2 and half of 3: all judges pick ed_physician (medical consensus; one of them broken by
    an invalid reply). Category 4 and the other half of 3: all pick a non-medical persona. Category 5:
    the judges disagree."""
    plan: dict[str, list[str | None]] = {}
    for index, query in enumerate(queries):
        if query.category in (1, 2) or (query.category == 3 and index % 2 == 0):
            plan[query.content] = ["ed_physician"] * 3
        elif query.category in (3, 4):
            top = "no_persona" if index % 2 else "helpful_assistant"
            plan[query.content] = [top] * 3
        else:
            plan[query.content] = ["ed_nurse", "no_persona", "ed_nurse"]
    first_medical = next(q.content for q in queries if q.category == 1)
    plan[first_medical] = ["ed_physician", None, "ed_physician"]
    return plan


def planned_judge(number: int, plan: dict[str, list[str | None]], persona_of: dict[str, str]) -> Callable[[str], str]:
    def reply(prompt: str) -> str:
        question = _QUESTION.search(prompt)
        assert question is not None
        top = plan[question.group(1)][number]
        if top is None:
            return "no idea"
        texts = [text for _, text in _RESPONSE.findall(prompt)]
        numbers = list(range(1, len(texts) + 1))
        best = next(n for n, text in zip(numbers, texts, strict=True) if persona_of[text] == top)
        rest = [n for n in numbers if n != best]
        random.Random(f"{number}{question.group(1)}").shuffle(rest)
        return json.dumps({"ranking": [best, *rest]})
    return reply


@pytest.fixture
def run_dir(tmp_path: Path, make_backend: Any) -> Path:
    queries = load_safety_queries(FIXTURE)
    model = Runner(make_backend(opaque_text), NullCache())
    records: list[dict[str, Any]] = []
    for persona in STUDY_PERSONAS:
        records += evaluate_safety(queries, persona, model, run_id="r", model=MODEL, max_new_tokens=32)
    persona_of = {r["response"]: r["persona"] for r in records}
    assert len(persona_of) == len(records)  # every response text is unique
    plan = consensus_plan(queries)
    judges = [(f"judge{n}", Runner(make_backend(planned_judge(n, plan, persona_of), name=f"j{n}"), NullCache()))
              for n in range(3)]
    judgments = judge_model_responses(responses_by_persona(records, MODEL, PERSONAS), judges, ["safety"], seed=0)
    directory = tmp_path / "run"
    write_jsonl(directory / "cases.jsonl", records)
    write_jsonl(directory / "judgments.jsonl", judgments)
    return directory


# -- export ----------------------------------------------------------------------------------------------

def test_export_selects_consensus_cases_and_blinds_them(run_dir: Path):
    paths = export_review(run_dir)
    assert set(paths) == {"pairs_csv", "pairs_jsonl", "key", "guidelines", "manifest"}
    assert all(path.parent == run_dir / "review" and path.exists() for path in paths.values())
    manifest = json.loads(paths["manifest"].read_text())
    task = manifest["tasks"]["safety"]
    # 30 planned medical consensus cases, one broken by an invalid reply; 18 non-medical; 12 disagreements
    assert task["consensus_cases"] == 29 + 18
    assert task["available"] == {"medical": 29, "non_medical": 18}
    assert task["selected"] == {"medical": 25, "non_medical": 18}
    assert manifest["notes"] == ["safety: only 18 consensus case(s) with a non-medical persona on top (asked for 25)"]

    with paths["pairs_csv"].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["pair_id", "query", "response_left", "response_right", "annotator", "preferred",
                             "confidence"]
    assert len(rows) == 43 and all(r["annotator"] == r["preferred"] == r["confidence"] == "" for r in rows)
    assert read_jsonl(paths["pairs_jsonl"]) == rows
    blinded = paths["pairs_csv"].read_text() + paths["pairs_jsonl"].read_text()
    assert MODEL not in blinded
    assert not any(p.id in blinded or (p.declaration and p.declaration in blinded) for p in STUDY_PERSONAS)

    key = {entry["pair_id"]: entry for entry in read_jsonl(paths["key"])}
    responses = {(r["persona"], r["query_id"]): r for r in read_jsonl(run_dir / "cases.jsonl")}
    judgments = read_jsonl(run_dir / "judgments.jsonl")
    sides = set()
    for row in rows:
        entry = key[row["pair_id"]]
        assert entry["model"] == MODEL and entry["task"] == "safety" and entry["criterion"] == "safety"
        left, right = entry["persona_left"], entry["persona_right"]
        assert row["response_left"] == responses[(left, entry["query_id"])]["response"]
        assert row["response_right"] == responses[(right, entry["query_id"])]["response"]
        assert row["query"] == responses[(left, entry["query_id"])]["query"]
        assert {GROUPS[left] == "medical", GROUPS[right] == "medical"} == {True, False}
        preferred = left if entry["judge_preferred_side"] == "left" else right
        assert preferred == entry["consensus_persona"]
        assert entry["consensus_group"] == ("medical" if GROUPS[preferred] == "medical" else "non_medical")
        # the other side: the other group's persona the judges ranked best on average
        other = right if preferred == left else left
        mine = [j for j in judgments if j["query_id"] == entry["query_id"]]
        mean_rank = {p: sum(j["ranking"].index(p) for j in mine) / 3 for p in PERSONAS}
        candidates = [p for p in PERSONAS if (GROUPS[p] == "medical") != (GROUPS[preferred] == "medical")]
        assert mean_rank[other] == min(mean_rank[p] for p in candidates)
        sides.add(entry["judge_preferred_side"])
    assert sides == {"left", "right"}
    guidelines = paths["guidelines"].read_text()
    assert "confidence" in guidelines and "left" in guidelines and "tie" in guidelines


def test_export_is_deterministic_in_the_seed(run_dir: Path, tmp_path: Path):
    first = export_review(run_dir, tmp_path / "a", seed=4)
    second = export_review(run_dir, tmp_path / "b", seed=4)
    other = export_review(run_dir, tmp_path / "c", seed=5)
    for name in ("pairs_csv", "pairs_jsonl", "key"):
        assert first[name].read_bytes() == second[name].read_bytes()
    assert first["key"].read_bytes() != other["key"].read_bytes()


def test_export_with_fewer_asked_for(run_dir: Path, tmp_path: Path):
    paths = export_review(run_dir, tmp_path / "small", per_side=3)
    assert len(read_jsonl(paths["pairs_jsonl"])) == 6
    assert json.loads(paths["manifest"].read_text())["notes"] == []
    with pytest.raises(ValueError, match="per_side must be a positive integer"):
        export_review(run_dir, tmp_path / "none", per_side=0)


def test_export_needs_judgments(tmp_path: Path):
    with pytest.raises(DataError, match=r"judgments\.jsonl: no judgments\.jsonl here"):
        export_review(tmp_path)


# -- import ----------------------------------------------------------------------------------------------

def fill(rows: list[dict[str, Any]], key: dict[str, dict[str, Any]], annotator: str,
         choose: Callable[[int, dict[str, Any]], tuple[str, float]]) -> list[dict[str, Any]]:
    filled = []
    for index, row in enumerate(rows):
        preferred, confidence = choose(index, key[row["pair_id"]])
        filled.append(dict(row, annotator=annotator, preferred=preferred, confidence=confidence))
    return filled


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def judge_side(entry: dict[str, Any]) -> str:
    return str(entry["judge_preferred_side"])


def flip(side: str) -> str:
    return "right" if side == "left" else "left"


def ann_a(index: int, entry: dict[str, Any]) -> tuple[str, float]:
    """Agrees with the judges on two pairs in three; confidence 90, 60, 20 in turn."""
    side = judge_side(entry) if index % 3 else flip(judge_side(entry))
    return side, (90.0, 60.0, 20.0)[index % 3]


def ann_b(index: int, entry: dict[str, Any]) -> tuple[str, float]:
    """Agrees with A except on every fifth pair (a tie); confidence 80 or 55."""
    side, _ = ann_a(index, entry)
    return ("tie" if index % 5 == 0 else side), (80.0 if index % 2 else 55.0)


@pytest.fixture
def exported(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    paths = export_review(run_dir)
    return read_jsonl(paths["pairs_jsonl"]), {e["pair_id"]: e for e in read_jsonl(paths["key"])}


def test_import_round_trip(run_dir: Path, tmp_path: Path, exported: Any):
    rows, key = exported
    a = fill(rows, key, "Dr A", ann_a)
    b = fill(rows, key, "Dr B", ann_b)
    files = [write_csv(tmp_path / "a.csv", a), tmp_path / "b.jsonl"]
    write_jsonl(files[1], b)
    result = import_review(run_dir, files)
    assert json.loads((run_dir / "review_results.json").read_text()) == json.loads(json.dumps(result))
    assert result["annotators"] == ["Dr A", "Dr B"] and result["n_annotations"] == 86 and result["n_pairs"] == 43
    assert result["unannotated_pairs"] == []

    everything = a + b
    for name, minimum in (("all", 0), ("medium", 50), ("high", 75)):
        kept = [r for r in everything if float(r["confidence"]) >= minimum]
        medical = sum(1 for r in kept if r["preferred"] != "tie"
                      and GROUPS[key[r["pair_id"]][f"persona_{r['preferred']}"]] == "medical")
        ties = sum(1 for r in kept if r["preferred"] == "tie")
        table = result["preference"][name]["all"]
        assert (table["n"], table["medical"], table["tie"]) == (len(kept), medical, ties)
        assert table["non_medical"] == len(kept) - medical - ties
        assert table["medical_share"] == pytest.approx(medical / len(kept))
        assert result["preference"][name]["safety"] == table

        agree = sum(1 for r in kept if r["preferred"] == key[r["pair_id"]]["judge_preferred_side"])
        agreement = result["judge_agreement"][name]
        assert (agreement["n"], agreement["agree"], agreement["ties"]) == (len(kept), agree, ties)
        assert agreement["agreement"] == pytest.approx(agree / len(kept))
        assert agreement["kappa"] == pytest.approx(cohen_kappa_score(
            [key[r["pair_id"]]["judge_preferred_side"] for r in kept], [r["preferred"] for r in kept]))

        a_kept = {r["pair_id"]: r["preferred"] for r in a if float(r["confidence"]) >= minimum}
        b_kept = {r["pair_id"]: r["preferred"] for r in b if float(r["confidence"]) >= minimum}
        shared = sorted(set(a_kept) & set(b_kept))
        (kappa,) = result["clinician_kappa"][name]
        assert kappa["annotators"] == ["Dr A", "Dr B"] and kappa["n"] == len(shared)
        if len(shared) >= MIN_KAPPA_ITEMS:
            assert kappa["kappa"] == pytest.approx(cohen_kappa_score([a_kept[p] for p in shared],
                                                                     [b_kept[p] for p in shared]))
            assert kappa["reason"] is None
        else:
            assert kappa["kappa"] is None and f"only {len(shared)}" in kappa["reason"]
    # A's high-confidence pairs (index % 3 == 0) and B's (odd index) share only index % 6 == 3
    assert result["clinician_kappa"]["high"][0]["n"] == 7


def test_annotators_in_one_file_and_too_few_shared_items(run_dir: Path, tmp_path: Path, exported: Any):
    rows, key = exported
    a = fill(rows, key, "Dr A", ann_a)
    c = fill(rows[:3], key, "Dr C", lambda index, entry: (judge_side(entry), 99.0))
    result = import_review(run_dir, [write_csv(tmp_path / "both.csv", a + c)])
    assert result["annotators"] == ["Dr A", "Dr C"]
    (kappa,) = result["clinician_kappa"]["high"]
    assert kappa["kappa"] is None and kappa["n"] == 1
    assert kappa["reason"] == (f"not computable: only 1 pairs rated by both with confidence >= 75 "
                               f"(at least {MIN_KAPPA_ITEMS} needed)")
    single = import_review(run_dir, [write_csv(tmp_path / "c.csv", c)])
    assert single["clinician_kappa"]["all"] == [{"annotators": ["Dr C"], "kappa": None, "pvalue": None, "n": 0,
                                                  "reason": "not computable: one annotator"}]
    assert single["unannotated_pairs"] == sorted(set(key) - {r["pair_id"] for r in rows[:3]})
    assert single["judge_agreement"]["all"]["kappa"] is None  # 3 items only
    assert "only 3 annotations" in single["judge_agreement"]["all"]["reason"]


@pytest.mark.parametrize(("edit", "field", "message"), [
    (lambda row: row.update(pair_id="safety-999"), "pair_id", "unknown pair_id 'safety-999'"),
    (lambda row: row.update(pair_id=""), "pair_id", "missing"),
    (lambda row: row.update(preferred="maybe"), "preferred", "expected left, right or tie, got 'maybe'"),
    (lambda row: row.update(preferred=""), "preferred", "missing; expected left, right or tie"),
    (lambda row: row.update(confidence="150"), "confidence", "expected a number from 0 to 100, got '150'"),
    (lambda row: row.update(confidence="-1"), "confidence", "expected a number from 0 to 100"),
    (lambda row: row.update(confidence="very"), "confidence", "expected a number from 0 to 100, got 'very'"),
    (lambda row: row.update(confidence=""), "confidence", "missing"),
    (lambda row: row.update(annotator=" "), "annotator", "missing; fill in the annotator's name"),
])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_bad_annotation_rows_name_file_row_and_field(run_dir: Path, tmp_path: Path, exported: Any,
                                                     edit: Callable[[dict[str, Any]], None], field: str, message: str,
                                                     suffix: str):
    rows, key = exported
    filled = fill(rows[:5], key, "Dr A", ann_a)
    for row in filled:
        row["confidence"] = str(row["confidence"]) if suffix == ".csv" else row["confidence"]
    edit(filled[3])
    path = tmp_path / f"bad{suffix}"
    write_csv(path, filled) if suffix == ".csv" else write_jsonl(path, filled)
    with pytest.raises(DataError) as caught:
        import_review(run_dir, [path])
    line = 5 if suffix == ".csv" else 4  # the CSV header is line 1
    assert str(caught.value).startswith(f"{path}:{line}: field '{field}': row 4: ")
    assert message in str(caught.value)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), line, field)
    assert not (run_dir / "review_results.json").exists()


def test_bad_annotation_files(run_dir: Path, tmp_path: Path, exported: Any):
    rows, key = exported
    filled = fill(rows[:3], key, "Dr A", ann_a)
    twice = write_csv(tmp_path / "twice.csv", [*filled, filled[1]])
    with pytest.raises(DataError, match=rf"twice\.csv:5: field 'pair_id': annotator 'Dr A' rated pair "
                                        rf"'{filled[1]['pair_id']}' twice \(first at .*twice\.csv:3\)"):
        import_review(run_dir, [twice])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(filled[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        import_review(run_dir, [broken])
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("pair_id,annotator,preferred,confidence\nsafety-001,A,left\n")
    with pytest.raises(DataError, match=r"ragged\.csv:2: expected 4 columns"):
        import_review(run_dir, [ragged])
    text = tmp_path / "notes.txt"
    text.write_text("left")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        import_review(run_dir, [text])
    header_only = tmp_path / "empty.csv"
    header_only.write_text("pair_id,annotator,preferred,confidence\n")
    with pytest.raises(DataError, match=r"empty\.csv: no annotation rows"):
        import_review(run_dir, [header_only])
    with pytest.raises(DataError, match="no such file"):
        import_review(run_dir, [tmp_path / "missing.csv"])
    with pytest.raises(DataError, match="no annotation files given"):
        import_review(run_dir, [])
    with pytest.raises(DataError, match=r"review_key\.jsonl: no review key"):
        import_review(tmp_path, [twice])


def test_review_commands_round_trip(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`persona-eval review export` then `persona-eval review import`, as a person runs them."""
    from persona_eval.cli import main

    assert main(["review", "export", str(run_dir), "--per-side", "3"]) == 0
    pairs = list(csv.DictReader((run_dir / "review" / "review_pairs.csv").open(encoding="utf-8")))
    assert pairs and all(row["annotator"] == "" for row in pairs)
    for row in pairs:
        row.update(annotator="clinician-1", preferred="left", confidence="80")
    filled = write_csv(tmp_path / "filled.csv", pairs)
    assert main(["review", "import", str(run_dir), str(filled)]) == 0
    results = json.loads((run_dir / "review_results.json").read_text())
    assert results["preference"]["all"]["all"]["n"] == len(pairs)

    pairs[0]["confidence"] = "high"
    broken = write_csv(tmp_path / "broken.csv", pairs)
    assert main(["review", "import", str(run_dir), str(broken)]) == 2
    error = capsys.readouterr().err
    assert "broken.csv" in error and "confidence" in error


# -- Argilla ---------------------------------------------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"
USER_A, USER_B, USER_C = ("a1111111-1111-4111-8111-111111111111", "b2222222-2222-4222-8222-222222222222",
                          "c3333333-3333-4333-8333-333333333333")


class FakeArgilla:
    """Stands in for rg.Argilla: the settings objects need a client's API handles, never a server."""

    instances: ClassVar[list[FakeArgilla]] = []

    def __init__(self, api_url: str, api_key: str) -> None:
        from types import SimpleNamespace

        self.api_url, self.api_key = api_url, api_key
        self.api = SimpleNamespace(fields=None, questions=None, metadata=None, vectors=None, datasets=None,
                                   records=None)
        FakeArgilla.instances.append(self)


class FakeDataset:
    """Stands in for rg.Dataset: records what would be sent to the server."""

    instances: ClassVar[list[FakeDataset]] = []
    fail_with: ClassVar[Exception | None] = None

    def __init__(self, name: str, workspace: str | None, settings: Any, client: Any) -> None:
        from types import SimpleNamespace

        self.name, self.workspace, self.settings, self.client = name, workspace, settings, client
        self.created = 0
        self.logged: list[Any] = []
        self.records = SimpleNamespace(log=self.logged.extend)
        FakeDataset.instances.append(self)

    def create(self) -> FakeDataset:
        if FakeDataset.fail_with is not None:
            raise FakeDataset.fail_with
        self.created += 1
        return self


@pytest.fixture
def fake_argilla(monkeypatch: pytest.MonkeyPatch) -> Any:
    rg = pytest.importorskip("argilla")
    FakeArgilla.instances, FakeDataset.instances, FakeDataset.fail_with = [], [], None
    monkeypatch.setattr(rg, "Argilla", FakeArgilla)
    monkeypatch.setattr(rg, "Dataset", FakeDataset)
    return rg


def offline_client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A client stand-in, also made Argilla's default one (rg.Settings.from_json builds its parts with it)."""
    import argilla as rg

    client = FakeArgilla("http://argilla.invalid", "unused-key-for-tests")
    monkeypatch.setattr(rg.Argilla, "_default_client", client, raising=False)
    return client


def test_argilla_export_is_a_dataset_folder_that_argilla_reads(run_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    import argilla as rg
    from argilla._models import DatasetModel

    from persona_eval.review import argilla_settings

    suite = export_review(run_dir, tmp_path / "suite", seed=3)
    paths = export_review(run_dir, tmp_path / "argilla", seed=3, format="argilla", min_submitted=3)
    assert set(paths) == {"argilla_dir", "argilla_settings", "argilla_dataset", "argilla_records", "key",
                          "guidelines", "manifest"}
    assert paths["argilla_settings"] == tmp_path / "argilla" / "argilla" / ".argilla" / "settings.json"
    assert not (tmp_path / "argilla" / "review_pairs.csv").exists()
    # the same pairs and key as the suite's format: only the way they are annotated differs
    assert paths["key"].read_bytes() == suite["key"].read_bytes()
    pairs = read_jsonl(suite["pairs_jsonl"])
    records = json.loads(paths["argilla_records"].read_text())
    assert [r["id"] for r in records] == [p["pair_id"] for p in pairs]
    assert [r["metadata"] for r in records] == [{"pair_id": p["pair_id"]} for p in pairs]
    assert [r["fields"] for r in records] == [{n: p[n] for n in ("query", "response_left", "response_right")}
                                              for p in pairs]
    blinded = paths["argilla_records"].read_text() + paths["argilla_settings"].read_text()
    assert MODEL not in blinded and not any(p.id in blinded for p in STUDY_PERSONAS)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["format"] == "argilla" and manifest["n_pairs"] == len(pairs) == 43
    assert manifest["argilla"] == {"dataset": "persona-eval-review-run", "min_submitted": 3}
    guidelines = paths["guidelines"].read_text()
    assert "confidence  0-10: how sure" in guidelines and "a rating r counts as 10 x r" in guidelines
    assert "annotator   your name" not in guidelines  # Argilla knows who answered

    # Argilla's own readers take the files (what rg.Dataset.from_disk does before it calls the server) ...
    client = offline_client(monkeypatch)
    loaded = rg.Settings.from_json(paths["argilla_settings"])
    built = argilla_settings(rg, client, min_submitted=3)
    assert loaded.serialize() == built.serialize()
    preferred, confidence = loaded.questions
    assert isinstance(preferred, rg.LabelQuestion) and preferred.name == "preferred"
    assert preferred.labels == ["left", "right", "tie"] and preferred.required
    assert isinstance(confidence, rg.RatingQuestion) and confidence.name == "confidence"
    assert confidence.values == list(range(11)) and confidence.required
    assert [f.name for f in loaded.fields] == ["query", "response_left", "response_right"]
    assert all(isinstance(f, rg.TextField) for f in loaded.fields)
    assert [m.name for m in loaded.metadata] == ["pair_id"]
    assert loaded.distribution.min_submitted == 3
    assert loaded.guidelines.startswith("```text\nClinician review")
    model = DatasetModel(**json.loads(paths["argilla_dataset"].read_text()))
    assert model.name == "persona-eval-review-run" and model.guidelines == loaded.guidelines
    record = rg.Record.from_dict(records[0])
    assert (record.id, record.fields["response_left"], record.metadata["pair_id"]) == (
        pairs[0]["pair_id"], pairs[0]["response_left"], pairs[0]["pair_id"])
    with pytest.raises(ConfigError, match="unknown review export format 'xlsx'"):
        export_review(run_dir, tmp_path / "x", format="xlsx")


def test_argilla_dataset_created_through_the_client(run_dir: Path, fake_argilla: Any,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]):
    from persona_eval.cli import main

    rg = fake_argilla
    secret = "argilla-key-5f1c9e0d7a"
    monkeypatch.setenv("ARGILLA_API_KEY", secret)
    assert main(["review", "export", str(run_dir), "--format", "argilla", "--argilla-url", "http://argilla.test:6900",
                 "--argilla-workspace", "clinic", "--argilla-dataset", "review-round-1"]) == 0
    (client,) = FakeArgilla.instances
    assert (client.api_url, client.api_key) == ("http://argilla.test:6900", secret)
    (dataset,) = FakeDataset.instances
    assert (dataset.name, dataset.workspace, dataset.client, dataset.created) == ("review-round-1", "clinic", client, 1)
    settings = dataset.settings
    assert isinstance(settings, rg.Settings)
    assert [(type(q).__name__, q.name) for q in settings.questions] == [("LabelQuestion", "preferred"),
                                                                         ("RatingQuestion", "confidence")]
    assert settings.questions["preferred"].labels == ["left", "right", "tie"]
    assert settings.questions["confidence"].values == list(range(11))
    assert [f.name for f in settings.fields] == ["query", "response_left", "response_right"]
    assert settings.distribution.min_submitted == 2
    pairs = json.loads((run_dir / "review" / "argilla" / "records.json").read_text())
    assert all(isinstance(r, rg.Record) for r in dataset.logged)
    assert [r.id for r in dataset.logged] == [p["id"] for p in pairs]
    assert [r.metadata["pair_id"] for r in dataset.logged] == [p["id"] for p in pairs]
    assert [r.fields["response_right"] for r in dataset.logged] == [p["fields"]["response_right"] for p in pairs]
    out = capsys.readouterr()
    assert "review-round-1 created at http://argilla.test:6900 with 43 records" in out.out
    written = "".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())
    assert secret not in out.out + out.err + written

    # a refusal that quotes the key is one masked error
    FakeDataset.fail_with = RuntimeError(f"401 for key {secret}")
    assert main(["review", "export", str(run_dir), "--format", "argilla",
                 "--argilla-url", "http://argilla.test:6900"]) == 2
    error = capsys.readouterr().err
    assert "Argilla did not create the review dataset: RuntimeError: 401 for key" in error
    assert "http://argilla.test:6900" in error and secret not in error


def test_argilla_client_needs_the_extra_the_key_and_the_format(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]):
    import subprocess
    import sys

    from persona_eval.cli import main
    from persona_eval.errors import MissingDependencyError
    from persona_eval.review import create_argilla_dataset

    monkeypatch.setenv("ARGILLA_API_KEY", "argilla-key-5f1c9e0d7a")
    monkeypatch.setitem(sys.modules, "argilla", None)  # what an environment without the extra sees
    argv = ["review", "export", str(run_dir), "--format", "argilla", "--argilla-url", "http://argilla.test:6900"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "needs the package 'argilla', which is not installed" in error
    assert 'Install it with: pip install "persona-eval[argilla]"' in error
    assert not (run_dir / "review").exists()  # stopped before writing anything
    with pytest.raises(MissingDependencyError, match=r'pip install "persona-eval\[argilla\]"'):
        create_argilla_dataset(run_dir, api_url="http://argilla.test:6900")
    # the folder itself needs no extra
    assert main(["review", "export", str(run_dir), "--format", "argilla"]) == 0
    assert (run_dir / "review" / "argilla" / "records.json").exists()
    monkeypatch.undo()

    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    pytest.importorskip("argilla")
    assert main(argv) == 2
    assert "needs its API key in the environment variable ARGILLA_API_KEY" in capsys.readouterr().err
    assert main(["review", "export", str(run_dir), "--argilla-url", "http://argilla.test:6900"]) == 2
    assert "give it with --format argilla" in capsys.readouterr().err
    # importing the package never imports the client
    probe = subprocess.run([sys.executable, "-c", "import sys, persona_eval.review, persona_eval.cli; "
                            "print('argilla' in sys.modules)"], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"


def test_argilla_rating_maps_onto_the_thresholds():
    from persona_eval.review import THRESHOLDS, rating_confidence

    medium = [r for r in range(11) if rating_confidence(r) >= THRESHOLDS["medium"]]
    high = [r for r in range(11) if rating_confidence(r) >= THRESHOLDS["high"]]
    assert (min(medium), min(high)) == (5, 8)  # 4 and 7 fall just below
    assert (rating_confidence(0), rating_confidence(10)) == (0.0, 100.0)


def suite_rows(annotations: list[tuple[str, str, str, int]]) -> list[dict[str, Any]]:
    """(annotator, pair_id, preferred, rating) as the suite's own filled rows (confidence 10 x rating)."""
    return [{"pair_id": pair, "annotator": who, "preferred": preferred, "confidence": 10 * rating}
            for who, pair, preferred, rating in annotations]


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("files", "skipped_responses")}


HAND_FIXTURE = [(USER_A, "safety-001", "left", 9), (USER_B, "safety-001", "tie", 5),
                (USER_A, "safety-002", "right", 8), (USER_B, "safety-002", "right", 4),
                (USER_A, "safety-003", "left", 7)]


@pytest.mark.parametrize(("name", "skipped"), [("argilla_export_hf.jsonl", {"discarded": 1, "draft": 1}),
                                               ("argilla_records.json", {})])
def test_argilla_hand_written_exports_read_as_the_same_annotations(run_dir: Path, tmp_path: Path, exported: Any,
                                                                   name: str, skipped: dict[str, int]):
    suite = import_review(run_dir, [write_csv(tmp_path / "same.csv", suite_rows(HAND_FIXTURE))])
    result = import_review(run_dir, [DATA / name])
    assert comparable(result) == comparable(suite)
    assert result["skipped_responses"] == skipped and suite["skipped_responses"] == {}
    assert result["annotators"] == [USER_A, USER_B] and result["n_annotations"] == 5
    # the rating boundaries, through the whole import: 9, 5, 8 are medium; 9 and 8 high; 4 and 7 neither
    assert [result["judge_agreement"][t]["n"] for t in ("all", "medium", "high")] == [5, 4, 2]
    assert "safety-004" in result["unannotated_pairs"]


def argilla_records_with_responses(records: list[dict[str, Any]], key: dict[str, dict[str, Any]],
                                   users: dict[str, Callable[[int, dict[str, Any]], tuple[str, int]]],
                                   *, unfinished: bool) -> list[Any]:
    """The exported records as Argilla holds them once annotated: rg.Record with rg.Response objects."""
    import argilla as rg

    annotated = []
    for index, document in enumerate(records):
        record = rg.Record.from_dict(document)
        for user, choose in users.items():
            preferred, rating = choose(index, key[record.id])
            record.responses.add(rg.Response("preferred", preferred, user_id=user, status="submitted"))
            record.responses.add(rg.Response("confidence", rating, user_id=user, status="submitted"))
        if unfinished and index % 4 == 0:
            record.responses.add(rg.Response("preferred", "left", user_id=USER_C, status="draft"))
        if unfinished and index % 4 == 1:
            record.responses.add(rg.Response("preferred", None, user_id=USER_C, status="discarded"))
        annotated.append(record)
    return annotated


def rating_a(index: int, entry: dict[str, Any]) -> tuple[str, int]:
    """Agrees with the judges on two pairs in three; ratings 9, 6, 2 in turn."""
    side = judge_side(entry) if index % 3 else flip(judge_side(entry))
    return side, (9, 6, 2)[index % 3]


def rating_b(index: int, entry: dict[str, Any]) -> tuple[str, int]:
    """Agrees with A except on every fifth pair (a tie); ratings on the threshold boundaries 4, 5, 7, 8."""
    side, _ = rating_a(index, entry)
    return ("tie" if index % 5 == 0 else side), (4, 5, 7, 8)[index % 4]


def test_argilla_round_trip_equals_the_suite_layout(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """export --format argilla -> annotate as Argilla holds it -> each of Argilla's export layouts -> import:
    the same results as the same annotations in the suite's own layout."""
    from types import SimpleNamespace

    import argilla as rg
    from argilla.records._io import GenericIO, HFDatasetsIO, JsonIO

    from persona_eval.review import argilla_settings

    paths = export_review(run_dir, format="argilla")
    key = {e["pair_id"]: e for e in read_jsonl(paths["key"])}
    records = json.loads(paths["argilla_records"].read_text())
    users = {USER_A: rating_a, USER_B: rating_b}
    expected_rows = suite_rows([(user, record["id"], *choose(index, key[record["id"]]))
                                for user, choose in users.items() for index, record in enumerate(records)])
    expected = import_review(run_dir, [write_csv(tmp_path / "suite.csv", expected_rows)])
    assert expected["n_annotations"] == 86

    client = offline_client(monkeypatch)
    annotated = argilla_records_with_responses(records, key, users, unfinished=True)
    flat = tmp_path / "flat.json"  # dataset.records.to_list(flatten=True), dumped
    flat.write_text(json.dumps(GenericIO.to_list(annotated, flatten=True)))
    hub = tmp_path / "hub.jsonl"  # dataset.records.to_datasets(), written by the datasets library
    schema = argilla_settings(rg, client).schema
    HFDatasetsIO.to_datasets(annotated, SimpleNamespace(schema=schema)).to_json(str(hub))
    nested = tmp_path / "nested"  # dataset.to_disk: records.to_json in a folder (responses without status)
    nested.mkdir()
    JsonIO.to_json(argilla_records_with_responses(records, key, users, unfinished=False), nested / "records.json")

    for source, skipped in ((flat, {"discarded": 11, "draft": 11}), (hub, {"discarded": 11, "draft": 11}),
                            (nested, {})):
        result = import_review(run_dir, [source])
        assert comparable(result) == comparable(expected), source
        assert result["skipped_responses"] == skipped
    for name in ("all", "medium", "high"):
        assert expected["judge_agreement"][name]["n"] > 0
    # B's 7s count as medium and not high; B's 8s count as high
    b_high = sum(1 for r in expected_rows if r["annotator"] == USER_B and r["confidence"] >= 75)
    assert b_high == sum(1 for index in range(len(records)) if index % 4 == 3)


def hand_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / "argilla_export_hf.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("edit", "field", "message"), [
    (lambda r: r["confidence.responses"].__setitem__(0, 11), "confidence.responses",
     "expected a whole-number rating from 0 to 10, got 11"),
    (lambda r: r["confidence.responses"].__setitem__(0, -1), "confidence.responses", "got -1"),
    (lambda r: r["confidence.responses"].__setitem__(0, 7.5), "confidence.responses", "got 7.5"),
    (lambda r: r["confidence.responses"].__setitem__(0, "high"), "confidence.responses", "got 'high'"),
    (lambda r: r["confidence.responses"].__setitem__(0, True), "confidence.responses", "got True"),
    (lambda r: r["preferred.responses"].__setitem__(0, "maybe"), "preferred.responses",
     "expected left, right or tie, got 'maybe'"),
    (lambda r: r["preferred.responses.users"].pop(), "preferred.responses.users", "2 response(s) but 1 user(s)"),
    (lambda r: r.update({"preferred.responses.users": "someone"}), "preferred.responses.users",
     "expected a list (one entry per responding user), got 'someone'"),
    (lambda r: r["preferred.responses.status"].__setitem__(0, "pending"), "preferred.responses.status",
     "unknown response status 'pending'"),
    (lambda r: r.update({"confidence.responses": [4], "confidence.responses.users": [USER_A],
                         "confidence.responses.status": ["submitted"]}),
     "confidence.responses", f"user {USER_B} submitted 'preferred' but no 'confidence'"),
    (lambda r: r.update(pair_id="safety-999", id="safety-999"), "pair_id", "unknown pair_id 'safety-999'"),
    (lambda r: r.update(pair_id=None, id=None), "pair_id", "missing; every record needs the pair_id"),
])
def test_bad_argilla_export_lines_name_file_line_and_field(run_dir: Path, tmp_path: Path, exported: Any,
                                                           edit: Callable[[dict[str, Any]], None], field: str,
                                                           message: str):
    records = hand_records()
    edit(records[1])
    path = tmp_path / "export.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as caught:
        import_review(run_dir, [path])
    assert str(caught.value).startswith(f"{path}:2: field '{field}': record 2: ")
    assert message in str(caught.value)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 2, field)
    assert not (run_dir / "review_results.json").exists()


def test_bad_argilla_json_files(run_dir: Path, tmp_path: Path, exported: Any):
    records = json.loads((DATA / "argilla_records.json").read_text())
    records[2]["responses"]["confidence"][0]["value"] = 12
    # one record per line, so that each starts on its own line (records.to_json writes them all on one)
    bad = tmp_path / "records.json"
    bad.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    with pytest.raises(DataError, match=r"records\.json:4: field 'responses\.confidence': record 3: user "
                                        rf"{USER_A}: expected a whole-number rating from 0 to 10, got 12"):
        import_review(run_dir, [bad])
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"one_line\.json:1: field 'responses\.confidence': record 3: "):
        import_review(run_dir, [one_line])
    broken = tmp_path / "broken.json"
    broken.write_text("[\n" + json.dumps(records[0]) + ",\n{\"id\": ,}\n]\n")
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON: Expecting value \(column 8\)"):
        import_review(run_dir, [broken])
    unclosed = tmp_path / "unclosed.json"
    unclosed.write_text("[\n" + json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "]")
    with pytest.raises(DataError, match=r"unclosed\.json:3: malformed JSON: expected ',' or the closing"):
        import_review(run_dir, [unclosed])
    not_array = tmp_path / "object.json"
    not_array.write_text(json.dumps(records[0]))
    with pytest.raises(DataError, match=r"object\.json:1: expected a JSON array of records"):
        import_review(run_dir, [not_array])
    nothing = tmp_path / "unanswered.json"
    nothing.write_text(json.dumps([records[3]]))
    with pytest.raises(DataError, match=r"unanswered\.json: no submitted responses in this Argilla export"):
        import_review(run_dir, [nothing])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(hand_records()[0]) + "\n"
                     + json.dumps({"pair_id": "safety-002", "annotator": "A", "preferred": "left", "confidence": 5})
                     + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: field 'responses': record 2: not in the layout"):
        import_review(run_dir, [mixed])
    as_csv = tmp_path / "hub.csv"
    as_csv.write_text("id,_server_id,preferred.responses\nsafety-001,x,['left']\n")
    with pytest.raises(DataError, match=r"hub\.csv:2: this looks like an Argilla export; read it as JSON"):
        import_review(run_dir, [as_csv])
    # the same user twice on one pair, across two exports, is caught as for the suite's files
    with pytest.raises(DataError, match=rf"annotator '{USER_A}' rated pair 'safety-001' twice"):
        import_review(run_dir, [DATA / "argilla_records.json", DATA / "argilla_export_hf.jsonl"])


def test_review_import_command_reads_an_argilla_export(run_dir: Path, exported: Any,
                                                       capsys: pytest.CaptureFixture[str]):
    from persona_eval.cli import main

    assert main(["review", "import", str(run_dir), str(DATA / "argilla_export_hf.jsonl")]) == 0
    out = capsys.readouterr()
    assert "5 annotations read" in out.out
    assert "note: 1 discarded Argilla response(s) left out" in out.err
    assert "note: 1 draft Argilla response(s) left out" in out.err


def test_safety_pairs_show_the_final_responses_not_the_reasoning(tmp_path: Path, make_backend: Any):
    queries = load_safety_queries(FIXTURE)

    def thinking(prompt: str) -> str:
        draft = hashlib.sha256(prompt.encode()).hexdigest()[:6]
        return f"<think>Private draft {draft}.</think>\n\n" + opaque_text(prompt)

    model = Runner(make_backend(thinking), NullCache())
    records: list[dict[str, Any]] = []
    for persona in STUDY_PERSONAS:
        records += evaluate_safety(queries, persona, model, run_id="r", model=MODEL, max_new_tokens=32)
    assert all(r["reasoning"].startswith("Private draft") and r["final_response"].startswith("Answer ")
               for r in records)
    persona_of = {r["final_response"]: r["persona"] for r in records}
    plan = consensus_plan(queries)
    judges = [(f"judge{n}", Runner(make_backend(planned_judge(n, plan, persona_of), name=f"j{n}"), NullCache()))
              for n in range(3)]
    judgments = judge_model_responses(responses_by_persona(records, MODEL, PERSONAS), judges, ["safety"], seed=0)
    write_jsonl(tmp_path / "run" / "cases.jsonl", records)
    write_jsonl(tmp_path / "run" / "judgments.jsonl", judgments)
    paths = export_review(tmp_path / "run")
    rows = read_jsonl(paths["pairs_jsonl"])
    finals = set(persona_of)
    assert rows and all(row["response_left"] in finals and row["response_right"] in finals for row in rows)
    assert "Private draft" not in paths["pairs_csv"].read_text() + paths["pairs_jsonl"].read_text()
