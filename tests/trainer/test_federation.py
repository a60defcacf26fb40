"""Federated fine-tuning (Flower) between processes on loopback: two sites that each know half of the
keyword task, a coordinator that averages their adapters (the coordinator and then a site are killed
and restarted on the way).
The averaged adapter answers both halves; an adapter trained on one site's rows alone does not answer
the other's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peft import PeftModel

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import Coordination, TrainerConfig, TrainerPaths, TrainerSummary
from deeptune_trainer.evaluation import evaluate
from deeptune_trainer.modeling import load_model
from deeptune_trainer.synthetic import as_samples, keyword_rows
from tests.trainer.conftest import TINY_SPEC, _merge

pytestmark = pytest.mark.trainer

HALVES = {"site-a": ("猫", "dog"), "site-b": ("雨", "sun")}
ROUNDS, STEPS = 10, 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spec(**overrides: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(_merge(TINY_SPEC, overrides))


def _config(tmp_path: Path, name: str, spec: FineTuneJobSpec, model_dir: Path, **extra: Any) -> Path:
    config = TrainerConfig(
        name=name,
        namespace=name,
        spec=spec,
        paths=TrainerPaths(output_dir=str(tmp_path / name / "out"), base_model=str(model_dir)),
        metrics_port=0,
        termination_message_path=str(tmp_path / name / "summary.json"),
        **extra,
    )
    path = tmp_path / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(config.model_dump_json(by_alias=True))
    return path


def _start(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deeptune_trainer", "--config", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(process: subprocess.Popen[str], config: Path) -> TrainerSummary:
    output, _ = process.communicate(timeout=600)
    (config.parent / "output.log").write_text(output)
    print(output[-2500:])
    assert process.returncode == 0, output[-3000:]
    return TrainerSummary.model_validate_json((config.parent / "summary.json").read_text())


def wait_for_round(saved: Path, number: int, coordinator: subprocess.Popen[str]) -> None:
    """Until the coordinator has saved the average of round `number`."""
    deadline = time.monotonic() + 300
    while True:
        if saved.exists():
            with np.load(saved) as average:
                if int(average["round"]) >= number:
                    return
        assert coordinator.poll() is None and time.monotonic() < deadline, f"no round {number} came"
        time.sleep(0.2)


def _exact_match(model_dir: Path, adapter: Path, rows: list[dict[str, str]], spec: FineTuneJobSpec) -> float:
    loaded = load_model(spec, TrainerPaths(output_dir="unused", base_model=str(model_dir)))
    model = PeftModel.from_pretrained(loaded.model, adapter)
    return evaluate(model, loaded.tokenizer, as_samples(rows), spec)["exactMatch"]


def test_the_averaged_adapter_answers_what_each_site_alone_cannot(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    rows = {
        site: keyword_rows(120, seed=index + 1, keywords=words)
        for index, (site, words) in enumerate(HALVES.items())
    }
    held_out = {
        site: keyword_rows(30, seed=index + 10, exclude={r["prompt"] for r in rows[site]}, keywords=words)
        for index, (site, words) in enumerate(HALVES.items())
    }
    port = _free_port()
    hyperparameters = {"maxSteps": STEPS, "loggingSteps": 20, "learningRate": 3e-3}
    evaluation = {"metrics": ["exactMatch"], "generation": {"maxNewTokens": 8}, "evalSteps": STEPS}
    coordinator = _config(
        tmp_path, "coordinator", _spec(hyperparameters=hyperparameters), tiny_llama_dir,
        coordinator=Coordination(rounds=ROUNDS, sites=len(HALVES), port=port),
    )  # fmt: skip

    def site(site: str, steps: int, **extra: Any) -> FineTuneJobSpec:
        """A site's spec: its own rows and held-out rows, `steps` of training (a round's, or all)."""
        dataset = {"source": {"inline": rows[site]}, "validation": {"source": {"inline": held_out[site]}}}
        hp = {**hyperparameters, "maxSteps": steps}
        return _spec(dataset=dataset, hyperparameters=hp, evaluation=evaluation, **extra)

    federation = {"coordinator": f"127.0.0.1:{port}"}
    sites = {
        name: _config(tmp_path, name, site(name, STEPS, federation=federation), tiny_llama_dir)
        for name in HALVES
    }
    alone = {
        name: _config(tmp_path, f"{name}-alone", site(name, ROUNDS * STEPS), tiny_llama_dir)
        for name in HALVES
    }
    first = _start(coordinator)
    running = [(_start(config), config) for config in sites.values()]
    # The coordinator is killed after round 3 (a pod evicted) and started again (the Job's retry): it
    # goes on from its last average, and the sites, having lost it, join it again.
    average = coordinator.parent / "out" / "rounds" / "average.npz"
    wait_for_round(average, 3, first)
    first.kill()
    first.communicate()
    second = _start(coordinator)
    # Then site-a is killed after round 6 (its pod lost) and started again: the others go on without
    # it for the round it dropped, and it joins the next from its data pipeline and model load.
    wait_for_round(average, 6, second)
    dropped, site_a = running[0]
    dropped.kill()
    dropped.communicate()
    running[0] = (_start(site_a), site_a)
    coordinated = _finish(second, coordinator)
    assert "resuming after round" in (coordinator.parent / "output.log").read_text()
    site_summaries = [_finish(process, config) for process, config in running]
    alone_summaries = {site: _finish(_start(config), config) for site, config in alone.items()}

    assert coordinated.federation is not None and coordinated.federation.rounds == ROUNDS
    assert {s: r.train_rows for s, r in coordinated.federation.sites.items()} == {s: 120 for s in HALVES}
    restarted, kept = site_summaries  # each scores the final average on its own held-out rows
    assert kept.steps is not None and kept.steps >= ROUNDS * STEPS  # a round lost in the kill
    assert restarted.steps is not None and 0 < restarted.steps <= (ROUNDS - 6) * STEPS
    for summary in site_summaries:
        assert summary.eval_results is not None and summary.eval_results.baseline is not None
    averaged = coordinator.parent / "out" / "adapter"
    spec = _spec(evaluation=evaluation)
    scores: dict[str, dict[str, float]] = {"averaged": {}}
    for site in HALVES:
        scores["averaged"][site] = _exact_match(tiny_llama_dir, averaged, held_out[site], spec)
        adapter = alone[site].parent / "out" / "adapter"
        scores[f"{site} alone"] = {
            other: _exact_match(tiny_llama_dir, adapter, held_out[other], spec) for other in HALVES
        }
    print(json.dumps(scores, indent=1), [s.eval_results for s in alone_summaries.values()])
    for site, other in (("site-a", "site-b"), ("site-b", "site-a")):
        assert scores["averaged"][other] > scores[f"{site} alone"][other] + 0.5
        assert scores["averaged"][other] >= 0.8
