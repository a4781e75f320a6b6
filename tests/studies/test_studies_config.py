import re

import pytest

from moelab.studies import StudyError, load_preset, load_study, parse_study
from moelab.studies.presets import PRESETS

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib


def base():
    from conftest import TINY

    return tomllib.loads(TINY)


def test_valid_study_parses():
    s = parse_study(base())
    assert s.n == [80, 160] and s.truth.variance == pytest.approx([0.09, 0.16])
    assert [f.loss_name(2) for f in s.fits] == ["D1", "D2"]


@pytest.mark.parametrize(
    "edit, key, fix",
    [
        (lambda d: d["study"].update(reps=3), "study.reps", "allowed keys"),
        (lambda d: d["study"].update(replicates="3"), "study.replicates", "integer"),
        (lambda d: d["study"].update(n=[]), "study.n", "at least one"),
        (lambda d: d["truth"]["gate"].update(intercept=[-8.0, 0.0, 1.0]), "truth.gate.intercept", "2 entries"),
        (lambda d: d["truth"]["experts"].update(slope=[[1.0]]), "truth.experts.slope", "2 rows"),
        (lambda d: d["truth"]["experts"].update(sd=[0.3, -0.4]), "truth.experts.sd[1]", "> 0"),
        (lambda d: d["truth"]["experts"].update(variance=[0.1, 0.1]), "truth.experts.sd", "exactly one"),
        (lambda d: d["truth"]["gate"].update(family="temperature", temperature=0.0), "truth.gate.temperature", "> 0"),
        (lambda d: d["truth"]["gate"].update(temperature=1.0), "truth.gate.temperature", "no temperature"),
        (lambda d: d["fit"][0].update(init="kmean"), "fit[0].init", "one of"),
        (lambda d: d["fit"][1].update(gate="temperature"), "fit[1].gate", "same family"),
        (lambda d: d["fit"][1].update(name="exact"), "fit.name", "unique"),
        (lambda d: d["fit"][0].update(gate_options={"top_k": 1}), "fit[0].gate_options.top_k", "allowed"),
        (lambda d: d.update(extra={}), "<top level>.extra", "allowed"),
        (lambda d: d["study"].update(n=[3]), "study.n", "free parameters"),
    ],
)
def test_invalid_study_names_key_and_fix(edit, key, fix):
    d = base()
    edit(d)
    with pytest.raises(StudyError) as info:
        parse_study(d)
    msg = str(info.value)
    assert msg.startswith(key + ":"), msg
    assert re.search(fix, msg), msg


def test_invalid_toml_and_quick_without_table(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[study\nname=1")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(p)
    with pytest.raises(StudyError, match=r"quick: .*no \[quick\]"):
        parse_study(base(), quick=True)


@pytest.mark.parametrize("name", [p for p in PRESETS if p not in ("softmax-2023-paper", "sigmoid-2024", "gaussian-gate-2024")])  # those: their own tests
def test_presets_validate(name):
    full, quick = load_preset(name), load_preset(name, quick=True)
    for f, q in zip(full, quick):
        assert len(f.n) == 10 and f.n[0] == 100 and f.n[-1] == 100000 and f.replicates == 40
        assert q.replicates < f.replicates and max(q.n) < max(f.n)
