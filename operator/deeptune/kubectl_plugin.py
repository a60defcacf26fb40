"""`kubectl deeptune`: a FineTuneJob's progress, results and failures as a person wants to read them.

kubectl runs any executable named `kubectl-deeptune` on PATH for `kubectl deeptune ...` (pip installs
one: the `kubectl-deeptune` script of this package). It reads the same kubeconfig kubectl does
(`KUBECONFIG`, `--kubeconfig`, `--context`) and only reads: FineTuneJobs, ModelDeployments,
FineTuneSweeps, their pods and the pods' logs.

    kubectl deeptune status NAME [--watch]     progress bar while it runs, then the results
    kubectl deeptune results NAME              base model against fine-tuned, per metric
    kubectl deeptune compare A B               two runs side by side: scores, inputs, cost
    kubectl deeptune trials SWEEP              a FineTuneSweep's trials: values, phase, objective, best
    kubectl deeptune explain-failure NAME      why it failed, its last log lines, where to read on
    kubectl deeptune logs [mdep/]NAME [-f]     the trainer's log (each rank's), or the serving pods'
    kubectl deeptune chat MDEP [--url URL]     chat with a ModelDeployment through its OpenAI API
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from rich.console import Console
from rich.table import Table

from deeptune.api.base import GROUP, VERSION
from deeptune.api.finetunejob import PLURAL, FineTuneJobStatus
from deeptune.api.finetunesweep import PLURAL as SWEEP_PLURAL
from deeptune.api.finetunesweep import FineTuneSweepStatus
from deeptune.api.modeldeployment import PLURAL as MDEP_PLURAL
from deeptune.api.modeldeployment import ModelDeploymentStatus

Obj = dict[str, Any]
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""The rank of a multi-node run's pod (an Indexed Job's)."""
TERMINAL = frozenset({"Succeeded", "Failed"})
BAR_WIDTH = 30
TROUBLESHOOTING = "https://github.com/deeptune/deeptune/blob/main/docs/troubleshooting.md"
SECTIONS = {
    "InvalidSpec": "rejected-by-kubectl-apply",
    "OutOfMemory": "out-of-memory",
    "OOMKilled": "out-of-memory",
    "InvalidDataset": "dataset-errors",
    "EmptyDataset": "dataset-errors",
    "DatasetNotFound": "dataset-errors",
    "Unschedulable": "the-gpu-is-not-scheduled",
    "Queued": "queued-kueue",
}
"""A failure's reason → its section of docs/troubleshooting.md."""


class Cluster:
    """The FineTuneJobs of one namespace, read through the kubeconfig kubectl uses."""

    def __init__(self, namespace: str | None, kubeconfig: str | None, context: str | None) -> None:
        config.load_kube_config(config_file=kubeconfig, context=context)
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = context or active["name"]
        default = next((c["context"].get("namespace") for c in contexts if c["name"] == chosen), None)
        self.namespace = namespace or default or "default"
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def finetunejob(self, name: str) -> Obj:
        return self.get(PLURAL, name)

    def modeldeployment(self, name: str) -> Obj:
        return self.get(MDEP_PLURAL, name)

    def get(self, plural: str, name: str) -> Obj:
        """One of DeepTune's objects; a missing one ends the command with kubectl's words."""
        try:
            found = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                kind = plural.removesuffix("s")
                raise SystemExit(f'error: {kind} "{name}" not found in namespace {self.namespace}') from None
            raise
        return cast(Obj, found)

    def pods(self, kind: str, obj: Obj) -> list[str]:
        """The names of the run's newest attempt's pods, one per rank (a FineTuneJob's trainers), or
        of a ModelDeployment's serving pods."""
        name = obj["metadata"]["name"]
        if kind == MDEP_PLURAL:
            selector = f"deeptune.dev/modeldeployment={name}"
        elif job_name := (obj.get("status") or {}).get("jobName"):
            selector = f"job-name={job_name}"
        else:
            return []
        listed: Any = self.core.list_namespaced_pod(
            self.namespace, label_selector=selector, _preload_content=False
        )  # plain JSON: the typed models make every field optional
        found = json.loads(listed.data)["items"]
        newest: dict[str, str] = {}
        for pod in sorted(found, key=lambda p: p["metadata"]["creationTimestamp"]):  # RFC 3339, UTC
            meta = pod["metadata"]
            rank = (meta.get("labels") or {}).get(COMPLETION_INDEX) if kind == PLURAL else None
            newest[rank or meta["name"]] = meta["name"]  # a later attempt of a rank replaces the earlier
        return sorted(newest.values())

    def log(self, pod: str, tail: int | None) -> str:
        """A pod's log, or why it cannot be read (not started yet, its node gone)."""
        try:
            return str(self.core.read_namespaced_pod_log(pod, self.namespace, tail_lines=tail))
        except ApiException as error:
            return f"(the logs of {pod} could not be read: {error.reason})\n"

    def follow(self, pod: str, tail: int | None) -> Iterator[str]:
        """A pod's log lines as they are written, until the container ends."""
        response: Any = self.core.read_namespaced_pod_log(
            pod, self.namespace, tail_lines=tail, follow=True, _preload_content=False
        )
        pending = b""
        for chunk in response.stream():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (line.decode(errors="replace") for line in lines)
        if pending:
            yield pending.decode(errors="replace")

    def last_log_lines(self, job: Obj, lines: int) -> str:
        """The newest trainer pod's last lines, or why there are none."""
        pods = self.pods(PLURAL, job)
        if not pods:
            return "(no trainer pod left: the Job's pods are gone)"
        return self.log(pods[0], lines)


def status_of(job: Obj) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(job.get("status") or {})


def _number(value: float | None, form: str = ".4g") -> str:
    return "–" if value is None else format(value, form)


def progress_line(status: FineTuneJobStatus) -> str:
    """`[██████░░░░] 60%  step 72/120  loss 0.41  eval loss 0.52  4,120 tokens/s  eta 1m05s`."""
    progress = status.progress
    if progress is None or progress.percent is None:
        return "no progress reported yet"
    filled = round(BAR_WIDTH * progress.percent / 100)
    parts = [
        f"[{'█' * filled}{'░' * (BAR_WIDTH - filled)}] {progress.percent}%",
        f"step {progress.step}/{progress.total_steps}" if progress.step is not None else "",
        f"loss {_number(progress.train_loss)}" if progress.train_loss is not None else "",
        f"eval loss {_number(progress.eval_loss)}" if progress.eval_loss is not None else "",
        f"{_number(progress.tokens_per_second, ',.0f')} tokens/s" if progress.tokens_per_second else "",
        f"eta {progress.eta}" if progress.eta and progress.percent < 100 else "",
    ]
    return "  ".join(part for part in parts if part)


def headline(job: Obj) -> str:
    status = status_of(job)
    ready = next(
        (c for c in status.conditions if c.type == ("Failed" if status.phase == "Failed" else "Ready")), None
    )
    why = f" — {ready.reason}: {ready.message}" if ready is not None and status.phase != "Succeeded" else ""
    meta = job["metadata"]
    return f"FineTuneJob {meta['name']} ({meta['namespace']}): {status.phase or 'Pending'}{why}"


def results_table(job: Obj) -> Table | str:
    results = status_of(job).eval_results
    if results is None or not results.fine_tuned:
        return "no evaluation results (yet): they come when the run succeeds"
    baseline, delta = results.baseline or {}, results.delta or {}
    split = results.split or "validation"
    table = Table(
        title=f"{job['metadata']['name']}: {split} split, {results.samples} rows, step {results.step or '–'}"
    )
    teacher = results.teacher  # a distillation run's teacher, on the same rows
    columns = ("metric", "base model", "fine-tuned", "delta", *(("teacher",) if teacher is not None else ()))
    for column in columns:
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, value in results.fine_tuned.items():
        table.add_row(
            metric,
            _number(baseline.get(metric)),
            _number(value),
            _number(delta.get(metric), "+.4g") if metric in delta else "–",
            *((_number(teacher.get(metric)),) if teacher is not None else ()),
        )
    return table


def usage_line(status: FineTuneJobStatus) -> str:
    used = status.usage
    if used is None:
        return ""
    cost = f", estimated cost {used.estimated_cost:.2f}" if used.estimated_cost is not None else ""
    seconds = f"{used.node_seconds} node-seconds, {used.gpu_seconds} GPU-seconds"
    return f"used: {len(used.attempts)} pod(s), {seconds}{cost}"


def show_status(cluster: Cluster, console: Console, name: str, watch: bool, interval: float) -> int:
    shown = ""
    while True:
        job = cluster.finetunejob(name)
        status = status_of(job)
        text = f"{headline(job)}\n{progress_line(status)}"
        if text != shown:
            console.print(text, highlight=False)
            shown = text
        if not watch or status.phase in TERMINAL:
            break
        time.sleep(interval)
    if status.phase == "Succeeded":
        console.print(results_table(job))
        output = status.output
        if output is not None:
            kinds = f"adapter {output.adapter_path or '–'}, merged {output.merged_path or '–'}"
            console.print(f"artifacts: pvc {output.claim_name}, {output.path}/ ({kinds})", highlight=False)
        if line := usage_line(status):
            console.print(line, highlight=False)
    elif status.phase == "Failed":
        console.print(
            f"run `kubectl deeptune explain-failure {name}` for why and what to do", highlight=False
        )
    return 1 if status.phase == "Failed" else 0


def compare_table(a: Obj, b: Obj) -> Table:
    first, second = status_of(a), status_of(b)
    names = a["metadata"]["name"], b["metadata"]["name"]
    table = Table(title=f"{names[0]} against {names[1]}")
    for column in ("", *names, f"{names[1]} − {names[0]}"):
        table.add_column(column, justify="left" if not column else "right")
    scores = [(s.eval_results.fine_tuned if s.eval_results else {}) for s in (first, second)]
    for metric in dict.fromkeys([*scores[0], *scores[1]]):
        x, y = scores[0].get(metric), scores[1].get(metric)
        table.add_row(
            metric, _number(x), _number(y), _number(y - x, "+.4g") if x is not None and y is not None else "–"
        )
    for label, read in _facts():
        left, right = read(first), read(second)
        table.add_row(label, left, right, "same" if left == right else "differs")
    return table


def _facts() -> list[tuple[str, Callable[[FineTuneJobStatus], str]]]:
    """What else two runs are compared by: how far they went, what they were made of, what they used."""

    def lineage(field: str) -> Callable[[FineTuneJobStatus], str]:
        def read(status: FineTuneJobStatus) -> str:
            value = getattr(status.lineage, field, None) if status.lineage else None
            if isinstance(value, dict):
                value = ",".join(f"{k}={v[7:19]}" for k, v in sorted(value.items()))
            return str(value)[:19] if value else "–"

        return read

    return [
        ("steps", lambda s: str(s.progress.step) if s.progress and s.progress.step is not None else "–"),
        ("train loss", lambda s: _number(s.progress.train_loss) if s.progress else "–"),
        ("training config", lineage("config")),
        ("data", lineage("datasets")),
        ("base model", lineage("base_model")),
        ("GPU-seconds", lambda s: str(s.usage.gpu_seconds) if s.usage else "–"),
        (
            "estimated cost",
            lambda s: (
                _number(s.usage.estimated_cost, ".2f")
                if s.usage and s.usage.estimated_cost is not None
                else "–"
            ),
        ),
    ]


def explain_failure(cluster: Cluster, console: Console, name: str, lines: int) -> int:
    job = cluster.finetunejob(name)
    status = status_of(job)
    failure = status.last_failure
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    if failed is None and failure is None:
        console.print(f"{headline(job)}\nnothing has failed", highlight=False)
        return 0
    reason = failure.reason if failure and failure.reason else failed.reason if failed else "Unknown"
    console.print(headline(job), highlight=False)
    if failure is not None:
        exit_code = f" (exit code {failure.exit_code})" if failure.exit_code is not None else ""
        console.print(f"last failure: {failure.reason}{exit_code}: {failure.message}", highlight=False)
    if status.retries:
        console.print(f"retries: {status.retries}", highlight=False)
    console.print(
        f"last {lines} log lines of the trainer:\n{cluster.last_log_lines(job, lines)}", highlight=False
    )
    section = SECTIONS.get(reason, "where-to-look")
    console.print(f"read on: {TROUBLESHOOTING}#{section}", highlight=False)
    return 1


def chat(
    cluster: Cluster,
    console: Console,
    name: str,
    *,
    url: str | None,
    sampling: dict[str, Any],
    lines: TextIO,
) -> int:
    """A conversation with the deployment's model: each line read is a user turn, each reply streamed
    as it comes. The OpenAI URL is the status's unless given (e.g. a `kubectl port-forward`'s)."""
    import openai  # noqa: PLC0415  (only this command needs it)

    status = ModelDeploymentStatus.model_validate(cluster.modeldeployment(name).get("status") or {})
    endpoints = status.endpoints
    base_url = url or (endpoints.openai if endpoints else None)
    model = endpoints.model_name if endpoints and endpoints.model_name else name
    if base_url is None:
        raise SystemExit(f"error: modeldeployment {name} reports no OpenAI endpoint yet: is it Ready?")
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    console.print(
        f"chatting with {model} at {base_url}; an empty line or end of input ends it", highlight=False
    )
    history: list[dict[str, str]] = []
    for line in lines:
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        reply = []
        try:
            stream = client.chat.completions.create(
                model=model, messages=cast(Any, history), stream=True, **sampling
            )
            for chunk in stream:
                piece = (chunk.choices[0].delta.content or "") if chunk.choices else ""
                reply.append(piece)
                console.print(piece, end="", highlight=False, markup=False)
        except openai.APIError as error:
            raise SystemExit(f"error: {base_url}: {error}") from None
        console.print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def show_logs(cluster: Cluster, console: Console, target: str, tail: int | None, follow: bool) -> int:
    """`kubectl logs` for the run's (or deployment's) pods, chosen by DeepTune's labels; each line
    prefixed with its pod's name when there are several (the ranks of a multi-node run)."""
    kind, _, name = target.rpartition("/")
    plural = {"": PLURAL, "ftj": PLURAL, "finetunejob": PLURAL, "mdep": MDEP_PLURAL}.get(kind.lower())
    if plural is None:
        raise SystemExit(
            f"error: {target}: name a FineTuneJob (NAME or ftj/NAME) or a ModelDeployment (mdep/NAME)"
        )
    obj = cluster.get(plural, name)
    pods = cluster.pods(plural, obj)
    if not pods:
        raise SystemExit(
            f"error: {target} has no pods yet ({headline(obj) if plural == PLURAL else 'not deployed'})"
        )
    prefix = len(pods) > 1

    def write(pod: str, line: str) -> None:
        console.print(f"[{pod}] {line}" if prefix else line, highlight=False, markup=False)

    if not follow:
        for pod in pods:
            for line in cluster.log(pod, tail).splitlines():
                write(pod, line)
        return 0

    def stream(pod: str) -> None:
        for line in cluster.follow(pod, tail):
            write(pod, line)

    threads = [threading.Thread(target=stream, args=(pod,), daemon=True) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


def trials_table(sweep: Obj) -> Table:
    """One row per trial: its values, phase and objective, the best marked, why others ended."""
    status = FineTuneSweepStatus.model_validate(sweep.get("status") or {})
    spec = sweep.get("spec") or {}
    metric = (spec.get("objective") or {}).get("metric", "objective")
    paths = [p["path"] for p in spec.get("parameters") or []]
    best = status.best_trial.name if status.best_trial else None
    done = f"{status.succeeded} succeeded, {status.failed} failed, {status.pruned} pruned"
    table = Table(title=f"{sweep['metadata']['name']}: {status.phase or 'Pending'} ({done})")
    for column in ("trial", *paths, "phase", metric, ""):
        table.add_column(column, justify="right" if column in (*paths, metric) else "left")
    for trial in status.trials:
        values = [_value(trial.parameters.get(path)) for path in paths]
        note = "best" if trial.name == best else trial.message
        table.add_row(trial.name, *values, trial.phase, _number(trial.objective), note)
    return table


def _value(value: Any) -> str:
    return _number(value) if isinstance(value, float) else str(value)


def _where(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-n", "--namespace", default=default)
    parser.add_argument("--kubeconfig", default=default)
    parser.add_argument("--context", default=default)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """kubectl's way: `-n`, `--kubeconfig` and `--context` before or after the command."""
    doc = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="kubectl deeptune", description=doc)
    _where(parser, None)
    anywhere = argparse.ArgumentParser(add_help=False)
    _where(anywhere, argparse.SUPPRESS)  # a command's own flag overrides, an absent one leaves it be
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status", parents=[anywhere], help="progress while it runs, then the results"
    )
    status.add_argument("name")
    status.add_argument("-w", "--watch", action="store_true", help="follow until the run ends")
    status.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    commands.add_parser("results", parents=[anywhere], help="base model against fine-tuned").add_argument(
        "name"
    )
    compare = commands.add_parser("compare", parents=[anywhere], help="two runs side by side")
    compare.add_argument("first")
    compare.add_argument("second")
    trials = commands.add_parser("trials", parents=[anywhere], help="a FineTuneSweep's trials and the best")
    trials.add_argument("name")
    explain = commands.add_parser("explain-failure", parents=[anywhere], help="why it failed and what to do")
    explain.add_argument("name")
    explain.add_argument("--lines", type=int, default=20)
    logs = commands.add_parser("logs", parents=[anywhere], help="the trainer's or the serving pods' log")
    logs.add_argument("target", metavar="[ftj/|mdep/]NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the containers end")
    logs.add_argument("--tail", type=int, help="only the last lines of each pod")
    talk = commands.add_parser("chat", parents=[anywhere], help="chat with a ModelDeployment")
    talk.add_argument("name")
    talk.add_argument(
        "--url", help="the OpenAI API's base URL, when status.endpoints.openai is not reachable"
    )
    talk.add_argument("--max-tokens", type=int, default=256)
    talk.add_argument("--temperature", type=float, help="default: the deployment's")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    console = Console(soft_wrap=True)
    cluster = Cluster(args.namespace, args.kubeconfig, args.context)
    if args.command == "status":
        return show_status(cluster, console, args.name, args.watch, args.interval)
    if args.command == "results":
        console.print(results_table(cluster.finetunejob(args.name)))
        return 0
    if args.command == "compare":
        console.print(compare_table(cluster.finetunejob(args.first), cluster.finetunejob(args.second)))
        return 0
    if args.command == "trials":
        console.print(trials_table(cluster.get(SWEEP_PLURAL, args.name)))
        return 0
    if args.command == "chat":
        sampling = {"max_tokens": args.max_tokens}
        if args.temperature is not None:
            sampling["temperature"] = args.temperature
        return chat(cluster, console, args.name, url=args.url, sampling=sampling, lines=sys.stdin)
    if args.command == "logs":
        return show_logs(cluster, console, args.target, args.tail, args.follow)
    return explain_failure(cluster, console, args.name, args.lines)


if __name__ == "__main__":
    sys.exit(main())
