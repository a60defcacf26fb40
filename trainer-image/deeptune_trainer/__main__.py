"""`python -m deeptune_trainer`: the trainer container's entry point, and a FineTuneJob on a laptop.

    python -m deeptune_trainer --config /etc/deeptune/config.json            (what the Job runs)
    python -m deeptune_trainer --finetunejob finetune.yaml --volume CLAIM=DIR [--volume ...]

With `distributed.processesPerNode` > 1 either form starts that many workers (`distributed`).

The second form reads the manifest a user would `kubectl apply`, maps each PersistentVolumeClaim to
a local directory, and resolves paths the way the operator does, so a job tried locally behaves as
it will in the cluster. Its summary goes to `summary.json` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from deeptune.api.base import PvcLocation
from deeptune.api.finetunejob import KIND, DataSource, FineTuneJobSpec
from deeptune.api.trainer import (
    EXIT_INVALID_INPUT,
    TERMINATION_MESSAGE_PATH,
    TrainerConfig,
    TrainerError,
    TrainerPaths,
    TrainerSummary,
)
from deeptune_trainer import distributed
from deeptune_trainer.errors import TrainerInputError

LOCAL_SUMMARY = "summary.json"


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'spec'}: {item['msg']}" for item in error.errors()
    )


def parse_volumes(values: list[str]) -> dict[str, Path]:
    volumes: dict[str, Path] = {}
    for value in values:
        claim, sep, directory = value.partition("=")
        if not sep or not claim or not directory:
            raise TrainerInputError("InvalidArguments", f"--volume {value}: expected CLAIM=DIRECTORY")
        volumes[claim] = Path(directory).expanduser().resolve()
    return volumes


def _local(location: PvcLocation, volumes: dict[str, Path], field: str) -> Path:
    if location.claim_name not in volumes:
        raise TrainerInputError(
            "InvalidArguments",
            f"{field} uses PersistentVolumeClaim {location.claim_name}: map it to a directory with "
            f"--volume {location.claim_name}=DIR",
        )
    return volumes[location.claim_name] / location.path


def _source_path(source: DataSource | None, volumes: dict[str, Path], field: str) -> str | None:
    if source is None:
        return None
    if source.config_map is not None:
        raise TrainerInputError(
            "InvalidArguments",
            f"{field}.configMap cannot be read outside a cluster: put the file in a directory and use "
            f"{field}.pvc with --volume, or write the rows inline",
        )
    return str(_local(source.pvc, volumes, f"{field}.pvc")) if source.pvc else None


def local_config(manifest: dict[str, Any], volumes: dict[str, Path], metrics_port: int) -> TrainerConfig:
    """A TrainerConfig for a FineTuneJob manifest, with claims mapped to local directories."""
    if manifest.get("kind") != KIND:
        raise TrainerInputError(
            "InvalidSpec", f"expected a {KIND} manifest, found kind {manifest.get('kind')}"
        )
    metadata = manifest.get("metadata") or {}
    name, namespace = metadata.get("name", "finetunejob"), metadata.get("namespace", "default")
    try:
        spec = FineTuneJobSpec.model_validate(manifest.get("spec") or {})
    except ValidationError as error:
        raise TrainerInputError("InvalidSpec", _validation_message(error)) from error
    output = spec.output.pvc
    output_dir = _local(output, volumes, "output.pvc")
    if not output.path:  # the operator's default: one directory per job on the claim
        output_dir = output_dir / namespace / name
    base = spec.base_model.pvc
    teacher = spec.distillation.teacher.pvc if spec.distillation else None
    paths = TrainerPaths(
        output_dir=str(output_dir),
        dataset=_source_path(spec.dataset.source, volumes, "dataset.source"),
        validation_dataset=_source_path(spec.dataset.validation.source, volumes, "dataset.validation.source"),
        test_dataset=_source_path(
            spec.dataset.test.source if spec.dataset.test else None, volumes, "dataset.test.source"
        ),
        base_model=str(_local(base, volumes, "baseModel.pvc")) if base else None,
        teacher_model=str(_local(teacher, volumes, "distillation.teacher.pvc")) if teacher else None,
    )
    return TrainerConfig(
        name=name,
        namespace=namespace,
        spec=spec,
        paths=paths,
        metrics_port=metrics_port,
        termination_message_path=str(output_dir / LOCAL_SUMMARY),
    )


def _read(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise TrainerInputError("InvalidArguments", f"cannot read {path}: {error}") from error


def load_config(args: argparse.Namespace) -> TrainerConfig:
    if args.config:
        try:
            return TrainerConfig.model_validate(_read(args.config))
        except ValidationError as error:
            raise TrainerInputError("InvalidSpec", f"{args.config}: {_validation_message(error)}") from error
    return local_config(_read(args.finetunejob), parse_volumes(args.volume), args.metrics_port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deeptune_trainer", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a TrainerConfig as JSON (what the operator writes)")
    source.add_argument("--finetunejob", help="a FineTuneJob manifest (YAML), to run without a cluster")
    parser.add_argument(
        "--volume", action="append", default=[], metavar="CLAIM=DIR", help="map a PVC claim to a directory"
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics (0: off)")
    return parser


def _refuse(error: TrainerInputError, termination_message_path: str | None) -> int:
    """Bad input found before any worker runs: said on stderr and, in a pod, to the operator."""
    if termination_message_path:
        from deeptune_trainer.artifacts import write_summary  # noqa: PLC0415  (loads torch)

        failed = TrainerSummary(
            outcome="failed", error=TrainerError(reason=error.reason, message=error.message)
        )
        write_summary(failed, termination_message_path)
    print(f"error: {error.reason}: {error.message}", file=sys.stderr)
    return EXIT_INVALID_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
    except TrainerInputError as error:
        # In a pod the operator still gets a reason; a local config's path is not known yet.
        return _refuse(error, TERMINATION_MESSAGE_PATH if args.config else None)
    if distributed.needs_launcher(config):
        try:
            return distributed.launch(config, argv)
        except TrainerInputError as error:
            return _refuse(error, config.termination_message_path)
    from deeptune_trainer import run  # noqa: PLC0415  (torch and transformers load only for a real run)

    code = run.main(config)
    if distributed.is_worker():
        distributed.end_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
