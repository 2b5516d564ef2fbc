"""The Ray engine: actors that each load the model once and take cases, on one machine or a cluster.

Without an address a local Ray instance is started on the loopback interface; with one, the batch joins that
cluster, whose nodes must see the inputs and the output folder at the same paths (shared storage). With GPUs
in the cluster each actor gets one. An actor that dies (killed, out of memory, node lost) is replaced and its
case is given to another one, at most ``MAX_ATTEMPTS`` times in all; a case whose folder was already renamed
into place by the dead actor is taken as done, not written again.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from pathlib import Path

from AttentionUNetSegLib.errors import UserError

from . import steps
from .inputs import Case
from .local import OnError, OnOk

MAX_ATTEMPTS = 3  # per case: the first try and two retries after a worker died
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # only case descriptions and reports travel through it
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray binds a local instance to 127.0.0.1


class CaseWorker:
    """One Ray actor: a loaded model that reads, segments and writes one case per call."""

    def __init__(self, out_dir: str, layout: steps.Layout, weights: str | None, device: str, quality: str,
                 tta: bool, threads: int | None):
        from AttentionUNetSegLib import outputs
        from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter

        self.out_dir, self.layout, self.failure = Path(out_dir), layout, ""
        try:
            options = SegmentationOptions(device=device, quality=quality, tta=tta, threads=threads)
            self.segmenter = Segmenter(weights, options)
            self.model_name = outputs.model_name(self.segmenter.model)
        except Exception as exc:  # noqa: BLE001 - handed to the driver by describe(), which stops the batch
            self.failure = steps.one_line(exc)

    def describe(self) -> dict:
        import ray

        device = str(self.segmenter.device) if not self.failure else ""
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": device, "failure": self.failure}

    def run(self, case: Case) -> tuple[str, object, float]:
        """``("ok", report, seconds)`` or ``("error", reason, seconds)``."""
        import time

        report = steps.finished_report(self.out_dir, case, self.layout)
        if report is not None:  # a worker that died after placing it
            return "ok", report, float(report["seconds"])
        started = time.perf_counter()
        try:
            loaded = steps.read(case, self.layout)
            result, _ = steps.segment(self.segmenter, loaded)
            seconds = time.perf_counter() - started
            return "ok", steps.write(self.out_dir, loaded, self.layout, result, seconds, self.model_name), seconds
        except Exception as exc:  # noqa: BLE001 - one case's failure is its row; the batch goes on
            return "error", steps.one_line(exc), time.perf_counter() - started


def run(cases: list[Case], out_dir: Path, layout: steps.Layout, args, on_ok: OnOk, on_error: OnError,
        log=print) -> None:
    """Segment every case on Ray actors; ``args``: address, workers, weights, device, fast."""
    ray = _connect(args.ray_address)
    try:
        _Dispatcher(ray, cases, out_dir, layout, args, on_ok, on_error, log).run()
    finally:
        ray.shutdown()  # a local instance stops; a cluster keeps running
        steps.remove_staging(out_dir)  # left by workers that died


def _connect(address: str | None):
    if not address:
        os.environ.setdefault(LOOPBACK_ONLY, "0")  # read when ray is imported, and by the processes it starts
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray", "it is an optional part",
                        "pip install 'attention-unet-seg[ray]'") from None
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address}", str(exc).splitlines()[0],
                            "start it with 'ray start --head' and check the address") from None
    else:
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level="WARNING", log_to_driver=False)
    return ray


class _Dispatcher:
    """Keeps every live actor busy with one case; replaces dead actors and hands their case on."""

    def __init__(self, ray, cases, out_dir, layout, args, on_ok, on_error, log):
        self.ray, self.pending, self.out_dir, self.layout = ray, deque(cases), out_dir, layout
        self.on_ok, self.on_error, self.log = on_ok, on_error, log
        self.attempts: Counter[str] = Counter()
        self.actor_class, self.actor_args, workers = self._plan(args)
        self.running: dict = {}  # object ref -> (actor, case or None while it starts)
        self.started = 0
        self.replacements_left = workers * (MAX_ATTEMPTS - 1)
        for _ in range(min(workers, len(cases))):
            self._start_actor()

    def _plan(self, args):
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if args.device.startswith("cuda") and not gpus:
            raise UserError(f"--device {args.device} asked for, but the Ray cluster has no GPU", "",
                            "use --device cpu or auto")
        use_gpu = gpus > 0 and args.device != "cpu"
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        workers = args.workers or (gpus if use_gpu else len(nodes))
        smallest_node = min(int(n["Resources"].get("CPU", 1)) for n in nodes)
        cpus = max(1, min(int(resources.get("CPU", 1)) // workers, smallest_node))
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpus}
        actor_class = self.ray.remote(max_restarts=0, max_task_retries=0, **options)(CaseWorker)
        device = "cuda" if use_gpu else "cpu"
        quality = "fast" if args.fast else "full"
        weights = str(Path(args.weights).resolve()) if args.weights else None
        threads = None if use_gpu else cpus
        self.log(f"ray: {workers} worker(s), each {'1 GPU' if use_gpu else f'{cpus} CPU(s)'}, "
                 f"on {len(nodes)} node(s)")
        return actor_class, (str(self.out_dir), self.layout, weights, device, quality, args.tta, threads), workers

    def _start_actor(self) -> None:
        actor = self.actor_class.remote(*self.actor_args)
        self.started += 1
        self.running[actor.describe.remote()] = (actor, None, self.started)

    def run(self) -> None:
        while self.pending or self._cases_running():  # not for actors still starting (or never placed)
            (ref,), _ = self.ray.wait(list(self.running), num_returns=1)
            actor, case, number = self.running.pop(ref)
            try:
                answer = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                self._actor_died(case, number, exc)
                continue
            if case is None:
                self._actor_ready(actor, number, answer)
            else:
                self._case_done(case, answer)
            self._give_work(actor, number)

    def _cases_running(self) -> bool:
        return any(case is not None for _, case, _ in self.running.values())

    def _actor_ready(self, actor, number: int, description: dict) -> None:
        if description["failure"]:
            raise UserError(f"worker {number} could not load the model", description["failure"], "")
        self.log(f"worker {number} ready (pid {description['pid']} on {description['node']}, "
                 f"{description['device']})")

    def _case_done(self, case: Case, answer: tuple) -> None:
        status, value, seconds = answer
        if status == "ok":
            self.on_ok(case, value)
        else:
            self.on_error(case, value, seconds)

    def _give_work(self, actor, number: int) -> None:
        if self.pending:
            case = self.pending.popleft()
            self.running[actor.run.remote(case)] = (actor, case, number)

    def _actor_died(self, case: Case | None, number: int, exc: Exception) -> None:
        reason = _first_line(exc)
        if case is not None:
            self.attempts[case.name] += 1
            if self.attempts[case.name] >= MAX_ATTEMPTS:
                self.on_error(case, f"a worker died each of the {MAX_ATTEMPTS} times it took this case "
                              f"(last: {reason})", 0.0)
            else:
                self.pending.appendleft(case)
        self.log(f"worker {number} died ({reason})" + (f"; case {case.name} goes to another worker" if case
                                                         and case in self.pending else ""))
        if self.pending and self.replacements_left > 0:
            self.replacements_left -= 1
            self._start_actor()
        elif self.pending and not self.running:
            for lost in self.pending:
                self.on_error(lost, f"no worker left: workers kept dying (last: {reason})", 0.0)
            self.pending.clear()


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__
