"""Federated fine-tuning on Flower: sites train a LoRA adapter on rows that never leave them, and a
coordinator averages the adapters (FedAvg, weighted by each site's training rows), round by round.

Only adapter weights and numbers (row counts, losses) cross the network: each site's process reads
its own rows and sends back weights; the coordinator reads no rows at all. Both sides build the same
adapter from the same spec, so the weights travel as a list of arrays in the order of their names.

Flower's gRPC transport is started from Python (`start_server` / `start_client`) rather than as
SuperLink and SuperNode processes: one process per pod keeps the trainer's own data pipeline, model
loading and export in the loop, with no Flower App bundle to build and ship to the sites.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, set_seed

from deeptune.api.trainer import FederationSummary, SiteResult, TrainerConfig, TrainerSummary
from deeptune_trainer.artifacts import save_model_artifacts, write_resolved_config
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.evaluation import perplexity
from deeptune_trainer.modeling import Precision, apply_method, load_model
from deeptune_trainer.training import TrainResult, config_fingerprint, train

if TYPE_CHECKING:
    from flwr.common import EvaluateRes, FitRes, Parameters, Scalar
    from flwr.server.client_proxy import ClientProxy

    from deeptune.api.finetunejob import FineTuneJobSpec
    from deeptune_trainer.data.sample import Sample
    from deeptune_trainer.metrics_server import TrainerMetrics

Log = Callable[[str], None]
Weights = list[np.ndarray]
CONNECT_SECONDS = 900
"""How long a site keeps trying to reach its coordinator (whose pod may start after the site's)."""
RECONNECT_SECONDS = 2.0
"""Between a site's tries to join its coordinator again after losing it mid-run (a coordinator pod
retried by its Job resumes from its last average), for up to CONNECT_SECONDS."""


def _flower() -> None:
    """Flower reports usage to its makers unless told not to; nothing leaves the cluster here."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


def adapter_weights(model: PeftModel) -> Weights:
    """The adapter's trainable weights as float32 arrays, ordered by name."""
    state = get_peft_model_state_dict(model)
    return [state[name].detach().to(torch.float32).cpu().numpy() for name in sorted(state)]


def load_adapter_weights(model: PeftModel, weights: Sequence[np.ndarray]) -> None:
    """Put `weights` (as `adapter_weights` orders them) into the model's adapter."""
    names = sorted(get_peft_model_state_dict(model))
    if len(names) != len(weights):
        raise ValueError(f"the coordinator sent {len(weights)} arrays; this adapter has {len(names)}")
    set_peft_model_state_dict(
        model, {name: torch.from_numpy(np.asarray(w)) for name, w in zip(names, weights, strict=True)}
    )


class _StartFrom(TrainerCallback):
    """Sets the round's averaged adapter into the freshly wrapped model before its first step."""

    def __init__(self, weights: Sequence[np.ndarray]) -> None:
        self.weights = weights

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        load_adapter_weights(model, self.weights)


@dataclass
class _SiteRounds:
    """A site's side of the rounds: train from the averaged adapter, report the weights back."""

    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    train_rows: Sequence[Sample]
    validation_rows: Sequence[Sample]
    spec: FineTuneJobSpec
    site: str
    output_dir: Path
    precision: Precision
    metrics: TrainerMetrics | None
    log: Log
    results: list[TrainResult] = field(default_factory=list)
    holds_average: bool = False
    """Whether the model holds the coordinator's latest average (sent with each evaluation)."""

    def fit(self, weights: Weights, config: dict[str, Scalar]) -> tuple[Weights, int, dict[str, Scalar]]:
        number = int(config.get("round", len(self.results) + 1))
        self.log(f"round {number}: training on {len(self.train_rows)} rows from the averaged adapter")
        base = self.model.unload() if isinstance(self.model, PeftModel) else self.model
        hp = self.spec.hyperparameters
        spec = self.spec.model_copy(
            update={"hyperparameters": hp.model_copy(update={"seed": hp.seed + number})}
        )
        directory = self.output_dir / f"round-{number}"
        result = train(
            base, self.tokenizer, self.train_rows, self.validation_rows,
            spec=spec, output_dir=directory, precision=self.precision,
            metrics=self.metrics, callbacks=[_StartFrom(weights)], log=self.log,
        )  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)  # a round's checkpoints are of no use after it
        self.model, self.holds_average = result.model, False
        self.results.append(result)
        assert isinstance(result.model, PeftModel)
        return adapter_weights(result.model), len(self.train_rows), {"site": self.site}

    def evaluate(self, weights: Weights, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        if not isinstance(self.model, PeftModel):  # evaluated before any round trained here
            set_seed(self.spec.hyperparameters.seed)
            self.model = apply_method(self.model, self.spec)
        assert isinstance(self.model, PeftModel)
        load_adapter_weights(self.model, weights)
        self.holds_average = True
        if not self.validation_rows:
            return 0.0, 0, {"site": self.site}
        hp = self.spec.hyperparameters
        loss = math.log(
            perplexity(
                self.model, self.tokenizer, self.validation_rows,
                max_length=hp.max_seq_length, batch_size=hp.per_device_batch_size,
                window_overlap=self.spec.dataset.window_overlap,
            )
        )  # fmt: skip
        number = int(config.get("round", 0))
        self.log(f"round {number}: the averaged adapter's validation loss here is {loss:.4g}")
        return loss, len(self.validation_rows), {"site": self.site}


def train_in_rounds(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Sequence[Sample],
    validation_rows: Sequence[Sample],
    *,
    config: TrainerConfig,
    precision: Precision,
    metrics: TrainerMetrics | None = None,
    log: Log = print,
) -> TrainResult:
    """Take part in the coordinator's rounds until it ends them; the model returned holds the final
    averaged adapter (what the site then evaluates on its own held-out rows and saves)."""
    _flower()
    from flwr.client import NumPyClient, start_client  # noqa: PLC0415  (after _flower)

    spec = config.spec
    assert spec.federation is not None
    rounds = _SiteRounds(
        model, tokenizer, train_rows, validation_rows, spec, config.namespace,
        Path(config.paths.output_dir) / "rounds", precision, metrics, log,
    )  # fmt: skip

    class Site(NumPyClient):
        def get_parameters(self, config: dict[str, Scalar]) -> Weights:
            raise NotImplementedError("the coordinator sends the first adapter")

        def fit(self, parameters: Weights, config: dict[str, Scalar]) -> Any:
            return rounds.fit(parameters, config)

        def evaluate(self, parameters: Weights, config: dict[str, Scalar]) -> Any:
            return rounds.evaluate(parameters, config)

    deadline, progress = 0.0, -1  # how long to wait for a lost coordinator, from the last loss with progress
    while True:
        log(f"joining the coordinator at {spec.federation.coordinator}")
        try:
            start_client(
                server_address=spec.federation.coordinator,
                client=Site().to_client(),
                insecure=True,
                max_wait_time=CONNECT_SECONDS,
            )
            break
        except grpc.RpcError as error:  # the coordinator went away mid-run (a restart: it resumes)
            if len(rounds.results) != progress:  # rounds came since the last loss: a new wait
                deadline, progress = time.monotonic() + CONNECT_SECONDS, len(rounds.results)
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            log(f"lost the coordinator ({error.details()}); joining again: it goes on from its last average")
            time.sleep(RECONNECT_SECONDS)
    if not rounds.results:
        raise RuntimeError(
            f"no round came from the coordinator at {spec.federation.coordinator} in {CONNECT_SECONDS} s"
        )
    if not rounds.holds_average:
        raise RuntimeError("the coordinator ended the rounds without sending the averaged adapter")
    last = rounds.results[-1]
    history = [entry for result in rounds.results for entry in result.log_history]
    return TrainResult(
        model=rounds.model,
        steps=sum(result.steps for result in rounds.results),
        train_loss=last.train_loss,
        eval_loss=last.eval_loss,
        resumed_from=None,
        log_history=history,
        truncated=last.truncated,
        padding_waste=last.padding_waste,
        final_checkpoint=None,
    )


@dataclass
class _Record:
    """What the coordinator learns each round: the average, and each site's numbers. The average is
    also saved after every round, so a coordinator that restarts goes on from the last one."""

    latest: Parameters
    saved: Path
    fingerprint: str
    rounds: int = 0
    """Rounds averaged, those of earlier attempts included."""
    sites: dict[str, SiteResult] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def save(self, parameters: Parameters, round_number: int) -> None:
        from flwr.common import parameters_to_ndarrays  # noqa: PLC0415

        self.latest, self.rounds = parameters, round_number
        self.saved.parent.mkdir(parents=True, exist_ok=True)
        partial = self.saved.with_suffix(".partial")
        with partial.open("wb") as file:  # written whole, then renamed: a kill leaves the last one
            np.savez(
                file, *parameters_to_ndarrays(parameters), round=round_number, fingerprint=self.fingerprint
            )
        partial.replace(self.saved)

    def resume(self, log: Log) -> None:
        """Take up the saved average of an earlier attempt of the same configuration, if any."""
        from flwr.common import ndarrays_to_parameters  # noqa: PLC0415

        if not self.saved.exists():
            return
        with np.load(self.saved) as saved:
            if str(saved["fingerprint"]) != self.fingerprint:
                raise TrainerInputError(
                    "InvalidSpec",
                    f"{self.saved} holds the average of a federation with another configuration "
                    f"(fingerprint {saved['fingerprint']}, this one {self.fingerprint}): use another output "
                    "path, or delete it to start over",
                )
            count = len([key for key in saved.files if key.startswith("arr_")])
            self.latest = ndarrays_to_parameters([saved[f"arr_{index}"] for index in range(count)])
            self.rounds = int(saved["round"])
        log(f"resuming after round {self.rounds}: its average is in {self.saved}")


def _strategy(sites: int, record: _Record, log: Log) -> Any:
    """FedAvg over every site each round, keeping the latest average and the sites' reports. Flower
    counts this attempt's rounds from 1; the sites and the record count them all."""
    from flwr.server.strategy import FedAvg  # noqa: PLC0415

    done = record.rounds

    class RecordingFedAvg(FedAvg):
        def aggregate_fit(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, FitRes]],
            failures: list[Any],
        ) -> tuple[Parameters | None, dict[str, Scalar]]:
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            number = done + server_round
            record.failures.extend(f"round {number}: {failure}" for failure in failures)
            if parameters is not None:
                record.save(parameters, number)
            for _, res in results:
                site = str(res.metrics.get("site", "?"))
                record.sites.setdefault(site, SiteResult()).train_rows = res.num_examples
            log(f"round {number}: averaged {len(results)} sites' adapters ({len(failures)} failed)")
            return parameters, metrics

        def aggregate_evaluate(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, EvaluateRes]],
            failures: list[Any],
        ) -> tuple[float | None, dict[str, Scalar]]:
            for _, res in results:
                site = str(res.metrics.get("site", "?"))
                record.sites.setdefault(site, SiteResult()).eval_loss = res.loss if res.num_examples else None
            reported = sorted(
                (site, r.eval_loss) for site, r in record.sites.items() if r.eval_loss is not None
            )
            losses = ", ".join(f"{site} {loss:.4g}" for site, loss in reported)
            log(f"round {done + server_round}: validation loss of the average by site: {losses or 'none'}")
            if not any(res.num_examples for _, res in results):
                return None, {}
            return super().aggregate_evaluate(server_round, results, failures)

    return RecordingFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=sites,
        min_evaluate_clients=sites,
        min_available_clients=sites,
        initial_parameters=record.latest,
        on_fit_config_fn=lambda number: {"round": done + number},
        on_evaluate_config_fn=lambda number: {"round": done + number},
    )


def coordinate(
    config: TrainerConfig,
    *,
    metrics: TrainerMetrics | None = None,
    log: Log = print,
    **_: Any,
) -> TrainerSummary:
    """Serve the rounds (Flower, FedAvg) and save the final average as the run's adapter. The
    coordinator loads the base model only to lay out the adapter the sites train and to export it."""
    _flower()
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: PLC0415
    from flwr.server import ServerConfig, start_server  # noqa: PLC0415

    coordination = config.coordinator
    assert coordination is not None
    address = f"0.0.0.0:{coordination.port}"
    spec = config.spec.model_copy(update={"method": "lora"})  # qlora's adapter, without a GPU to quantize
    output_dir = Path(config.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, output_dir)
    loaded = load_model(spec, config.paths)
    set_seed(spec.hyperparameters.seed)
    model = apply_method(loaded.model, spec)
    assert isinstance(model, PeftModel)
    record = _Record(
        latest=ndarrays_to_parameters(adapter_weights(model)),
        saved=output_dir / "rounds" / "average.npz",
        fingerprint=config_fingerprint(spec),
    )
    record.resume(log)
    remaining = coordination.rounds - record.rounds
    if remaining > 0:
        log(f"waiting for {coordination.sites} sites on {address}; rounds to go: {remaining}")
        start_server(
            server_address=address,
            config=ServerConfig(num_rounds=remaining),
            strategy=_strategy(coordination.sites, record, log),
        )
    if record.rounds < coordination.rounds:
        failed = "; ".join(record.failures[-3:]) or "no site answered"
        raise RuntimeError(f"{record.rounds} of {coordination.rounds} rounds completed: {failed}")
    load_adapter_weights(model, parameters_to_ndarrays(record.latest))

    def reload_base() -> PreTrainedModel:
        return load_model(spec, config.paths).model

    artifacts = save_model_artifacts(model, loaded.tokenizer, spec, output_dir, reload_base)
    federation = FederationSummary(rounds=record.rounds, sites=record.sites)
    (output_dir / "federation.json").write_text(federation.model_dump_json(by_alias=True, indent=2) + "\n")
    log(f"the averaged adapter after {record.rounds} rounds is in {output_dir}")
    return TrainerSummary(
        outcome="succeeded", steps=record.rounds, artifacts=artifacts, federation=federation
    )
