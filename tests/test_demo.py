"""The quickstart's claim, at a short budget: the CLIP-KD student ranks above the same-budget no-KD baseline.

Slow (several CPU minutes); nothing is timed. Same regime as `scripts/quickstart.py`: the teacher trains on the
whole training split, both students on the distillation set with identical flags, steps and seed.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

pytestmark = pytest.mark.slow


def test_short_budget_ranks_kd_above_the_baseline(tmp_path, monkeypatch):
    import quickstart as Q

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the CLI runs see this tree's `training`
    budget = Q.Budget(teacher_epochs=3, student_epochs=10, eval_every=5)
    world, teacher_file, _ = Q.prepare_teacher(str(tmp_path), budget.threads, budget)
    ckpts = Q.train_students(str(tmp_path), world, teacher_file, budget, seed=0)
    teacher = Q.evaluate(Q.TEACHER, teacher_file, world)
    kd, base = Q.evaluate(Q.STUDENT, ckpts["kd"], world), Q.evaluate(Q.STUDENT, ckpts["baseline"], world)
    assert teacher[Q.ZS] > 2 * world.chance  # the teacher has learnt the classes
    assert kd[Q.ZS] > base[Q.ZS], (kd, base)
    assert kd[Q.I2T] > base[Q.I2T], (kd, base)
    Q.write_report(str(tmp_path / "report.png"), {"KD": os.path.join(tmp_path, "runs", "kd"),
                                                  "baseline": os.path.join(tmp_path, "runs", "baseline")},
                   {"teacher": teacher, "KD": kd, "baseline": base}, "test")
    assert (tmp_path / "report.png").stat().st_size > 10_000
