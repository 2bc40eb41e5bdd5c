"""The quickstart's claim, at a short budget: the CLIP-KD student ranks above the same-budget no-KD baseline.

Slow (several CPU minutes); nothing is timed. Same regime as `scripts/quickstart.py`: the teacher trains on the
whole training split, both students on the distillation set with identical flags, steps and seed.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))


def test_report_reads_the_tensorboard_curves(tmp_path):
    """report.png is drawn from what the runs logged to TensorBoard: the curves come back step for step."""
    import quickstart as Q
    from torch.utils.tensorboard import SummaryWriter

    runs, logged = {}, {}
    for label, offset in (("KD", 0.0), ("baseline", 0.1)):
        run_dir = tmp_path / label
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        logged[label] = [(step, 2.0 / step + offset) for step in (10, 20, 30)]
        for step, value in logged[label]:
            writer.add_scalar("train/total", value, step)
            writer.add_scalar(f"eval/{Q.ZS}", 0.5 - offset, step)
        writer.close()
        runs[label] = str(run_dir)
        got = Q.curves(str(run_dir))
        assert [s for s, _ in got["train/total"]] == [10, 20, 30]
        assert [v for _, v in got["train/total"]] == pytest.approx([v for _, v in logged[label]])
    rows = {k: {Q.ZS: z, Q.I2T: r, Q.T2I: r} for k, z, r in (("teacher", 0.8, 0.2), ("KD", 0.75, 0.15),
                                                              ("baseline", 0.4, 0.05))}
    Q.write_report(str(tmp_path / "report.png"), runs, rows, "synthetic")
    from PIL import Image

    assert Image.open(tmp_path / "report.png").size[0] > 800


@pytest.mark.slow
def test_short_budget_ranks_kd_above_the_baseline(tmp_path, monkeypatch):
    import quickstart as Q

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the CLI runs see this tree's `training`
    budget = Q.Budget(teacher_epochs=3, student_epochs=5, eval_every=5)  # the quickstart's is 5 and 10
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
