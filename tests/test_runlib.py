"""runlib: config parsing, LR schedule, atomic checkpoints, RNG round trip, logging helpers (fast, CPU)."""
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import runlib  # noqa: E402


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    init_from: str | None = None
    sizes: list = None


# ---------------------------------------------------------------------------
# Config parsing


def test_defaults_and_overrides():
    cfg = runlib.parse_config(Cfg, ["--steps=20", "--lr=3e-4", "--flag=true", "--name=x=y", "--init_from=none"])
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.name, cfg.init_from) == (20, 3e-4, True, "x=y", None)
    assert runlib.parse_config(Cfg, []) == Cfg()
    assert runlib.parse_config(Cfg, ["--flag=0", "--sizes=[1, 2]"]).sizes == [1, 2]
    assert runlib.parse_config(Cfg, ["--init_from=/ckpt"]).init_from == "/ckpt"


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "ignored", "steps": 5, "lr": 1, "flag": True}))
    cfg = runlib.parse_config(Cfg, ["--config", str(path), "--steps=7"])
    assert (cfg.steps, cfg.lr, cfg.flag) == (7, 1.0, True)
    assert isinstance(cfg.lr, float)
    cfg = runlib.parse_config(Cfg, [f"--config={path}"])
    assert cfg.steps == 5
    assert runlib.config_dict(cfg)["steps"] == 5


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config key --stepz"):
        runlib.parse_config(Cfg, ["--stepz=3"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 5}))
    with pytest.raises(ValueError, match="c.json: unknown config key 'stepz'"):
        runlib.parse_config(Cfg, ["--config", str(path)])
    with pytest.raises(ValueError, match="expected --key=value"):
        runlib.parse_config(Cfg, ["steps=3"])


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'steps': expected int, found '2.5'"):
        runlib.parse_config(Cfg, ["--steps=2.5"])
    with pytest.raises(ValueError, match="'flag': expected bool"):
        runlib.parse_config(Cfg, ["--flag=maybe"])
    with pytest.raises(ValueError, match="'lr': expected float"):
        runlib.parse_config(Cfg, ["--lr=fast"])
    path = tmp_path / "c.json"
    for bad in ({"steps": "5"}, {"steps": 5.0}, {"flag": 1}, {"lr": "1e-3"}, {"name": 3}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}': expected"):
            runlib.parse_config(Cfg, ["--config", str(path)])


# ---------------------------------------------------------------------------
# Schedule, logging, NaN guard


def test_cosine_lr():
    lrs = [runlib.cosine_lr(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_step_line_and_metrics(tmp_path):
    line = runlib.step_line(3, 10, loss=1.23456, lr=1e-3, grad=0.5, elapsed=12.34, note="x")
    assert line == "step 3/10 | loss 1.2346 | lr 1.00e-03 | grad 0.5000 | 12.3 s | note x"
    log = runlib.MetricsLog(str(tmp_path / "sub" / "m.jsonl"))
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.0})
    runlib.MetricsLog(str(tmp_path / "off.jsonl"), enabled=False).write({"a": 1})
    rows = [json.loads(x) for x in (tmp_path / "sub" / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and not (tmp_path / "off.jsonl").exists()


def test_check_finite():
    runlib.check_finite(1.0, "loss", 3)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(runlib.NonFiniteError, match=r"non-finite loss .* at step 7, batch 12"):
            runlib.check_finite(bad, "loss", 7, "batch 12")


# ---------------------------------------------------------------------------
# RNG state and checkpoints


def test_rng_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(runlib._rng_to_json(runlib.rng_state())))
    a = (random.random(), np.random.rand(), torch.rand(3))
    runlib.set_rng_state(runlib._rng_from_json(state))
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _save_weights(module, path, state_dict=None):
    torch.save(module.state_dict() if state_dict is None else state_dict, os.path.join(path, "weights.pt"))


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt, runlib.setup_dist("cpu")


def test_checkpoint_save_resume_and_keep_last(tmp_path):
    model, opt, dist = _setup()
    ckpt = str(tmp_path / "ckpt")
    assert runlib.latest_checkpoint(ckpt) is None
    for step in (1, 2, 3):
        path = runlib.save_checkpoint(ckpt, step, model, opt, {"data_position": 10 * step}, dist, keep_last=2,
                                      save_weights=_save_weights)
    assert sorted(os.listdir(ckpt)) == ["latest", "step_000002", "step_000003"]
    assert runlib.latest_checkpoint(ckpt) == os.path.realpath(path) == os.path.realpath(f"{ckpt}/step_000003")
    meta = runlib.load_meta(runlib.latest_checkpoint(ckpt))
    assert meta["step"] == 3 and meta["data_position"] == 30 and len(meta["rng"]) == 1
    model2 = nn.Linear(4, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    runlib.load_optimizer(path, model2, opt2, dist)
    state, state2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(state["exp_avg"], state2["exp_avg"]) and state["step"] == state2["step"]
    torch.manual_seed(123)
    expected = torch.rand(2)
    runlib.restore_rng(meta, dist)                                    # rng captured at save time
    torch.manual_seed(123)
    assert torch.equal(torch.rand(2), expected)


def test_check_resume_names_every_changed_setting():
    saved = {"config": runlib.config_dict(Cfg(sizes=[1, 2]))}         # as meta.json holds it
    runlib.check_resume("ckpt/step_000002", saved, Cfg(sizes=[1, 2]), free=set())
    runlib.check_resume("ckpt/step_000002", saved, Cfg(name="elsewhere", sizes=[1, 2]), free={"name"})
    with pytest.raises(ValueError) as err:
        runlib.check_resume("ckpt/step_000002", saved, Cfg(name="elsewhere", lr=2e-3, sizes=[1, 3]), free={"name"})
    msg = str(err.value)
    assert "ckpt/step_000002" in msg and "lr: 0.001 -> 0.002" in msg and "sizes: [1, 2] -> [1, 3]" in msg
    assert "name" not in msg.split("\n", 1)[1].split("Run again")[0]  # a free setting is not listed
    # a setting added since the save (or removed) is a change too
    old = {"config": {k: v for k, v in saved["config"].items() if k != "flag"} | {"gone": 1}}
    with pytest.raises(ValueError, match=r"flag: '\(absent\)' -> False[\s\S]*gone: 1 -> '\(absent\)'"):
        runlib.check_resume("ckpt/step_000002", old, Cfg(sizes=[1, 2]), free=set())


def test_crash_mid_save_keeps_previous_latest(tmp_path):
    """A save that dies half-way (weights written, then an exception) must leave `latest` on the previous step."""
    model, opt, dist = _setup()
    ckpt = str(tmp_path / "ckpt")
    runlib.save_checkpoint(ckpt, 1, model, opt, {"data_position": 8}, dist, save_weights=_save_weights)

    def crashing(module, path, state_dict=None):
        _save_weights(module, path)
        raise KeyboardInterrupt("killed while saving")

    with pytest.raises(KeyboardInterrupt):
        runlib.save_checkpoint(ckpt, 2, model, opt, {"data_position": 16}, dist, save_weights=crashing)
    latest = runlib.latest_checkpoint(ckpt)
    assert latest.endswith("step_000001") and runlib.load_meta(latest)["step"] == 1
    assert torch.load(os.path.join(latest, "weights.pt"))["weight"].shape == (2, 4)
    assert not os.path.exists(os.path.join(ckpt, "step_000002"))
    # the next successful save cleans the leftover temporary directory
    runlib.save_checkpoint(ckpt, 2, model, opt, {"data_position": 16}, dist, save_weights=_save_weights)
    assert sorted(os.listdir(ckpt)) == ["latest", "step_000001", "step_000002"]
    assert runlib.latest_checkpoint(ckpt).endswith("step_000002")


def test_single_process_dist_is_a_no_op():
    dist = runlib.setup_dist("cpu")
    assert (dist.rank, dist.world_size, dist.is_main, dist.distributed) == (0, 1, True, False)
    model = nn.Linear(2, 2)
    assert runlib.wrap_model(model, dist, "ddp") is model and runlib.unwrap(model) is model
    t = torch.ones(2)
    assert torch.equal(runlib.all_reduce_sum(t, dist), torch.ones(2))
    runlib.set_grad_sync(model, False)
    with pytest.raises(ValueError, match="strategy"):
        runlib.wrap_model(model, runlib.Dist(0, 0, 2, torch.device("cpu"), True), "zero3")
