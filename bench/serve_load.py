"""Load test: ``trackflow serve`` against ``mlflow models serve`` on the same champion, same client.

Builds a champion as ``make run`` does (the pipeline's stages, register included, in a scratch
folder), unless --tracking-uri names a store that already has ``models:/NAME@champion``. Starts
both servers on loopback, one process each (their defaults), and times the first request after
each is ready. Then, for each case (single-row and 64-row requests from --clients concurrent
keep-alive connections, and single-row requests from one connection), each target gets --seconds
of requests in turn, for --rounds rounds, after a warm-up. Targets: MLflow's ``/invocations``, and
this service's ``/invocations`` (the same body) and ``/models/NAME/predictions``. The client is a
small asyncio HTTP/1.1 client (pre-encoded requests, one per connection at a time), cheap enough
not to be the bottleneck on two cores. Prints medians over rounds and the requests/s ratio.

    python bench/serve_load.py --rounds 5 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from common import REPO, run, scratch

BIN = Path(sys.executable).parent
ROUTES = ("mlflow /invocations", "trackflow /invocations", "trackflow /models/NAME/predictions")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(argv: list[str], env: dict[str, str], ready_path: str, log: Path) -> Iterator[int]:
    """Start a server process on a free port (``{port}`` in argv), yield the port once
    ``ready_path`` answers 200, stop its process group after."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [a.format(port=port) for a in argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # mlflow models serve runs uvicorn as a child
        )
    try:
        deadline = time.monotonic() + 180
        while not ready(port, ready_path):
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server did not get ready: {' '.join(argv)}\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ready(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def http_request(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    """Send one request on a keep-alive connection; read the whole response; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return int(head[9:12])


async def load(
    port: int, requests: list[bytes], clients: int, seconds: float
) -> tuple[float, list[float], int]:
    """``clients`` connections each sending requests back to back for ``seconds``.

    Returns:
        Requests per second, latencies in seconds, and how many answers were not 200.
    """
    latencies: list[float] = []
    failed = 0

    async def client(offset: int, stop_at: float) -> None:
        nonlocal failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        count = offset
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            status = await exchange(reader, writer, requests[count % len(requests)])
            latencies.append(time.perf_counter() - start)
            failed += status != 200
            count += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(n * 7, start + seconds) for n in range(clients)))
    return len(latencies) / (time.perf_counter() - start), latencies, failed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bodies(rows: list[dict[str, float]], size: int, count: int = 32) -> dict[str, list[bytes]]:
    """``count`` different request bodies of ``size`` rows, per body format."""
    chunks = [[rows[(start * size + i) % len(rows)] for i in range(size)] for start in range(count)]
    return {
        "records": [orjson.dumps({"dataframe_records": chunk}) for chunk in chunks],
        "rows": [orjson.dumps({"rows": chunk}) for chunk in chunks],
    }


def first_request_ms(port: int, path: str, body: bytes) -> tuple[float, float]:
    """Latency of the first scoring request after ready, and the median of the next 20."""

    async def sequence() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        times = []
        for _ in range(21):
            start = time.perf_counter()
            assert await exchange(reader, writer, http_request(port, path, body)) == 200
            times.append((time.perf_counter() - start) * 1e3)
        writer.close()
        return times

    times = asyncio.run(sequence())
    return times[0], statistics.median(times[1:])


def feature_rows() -> list[dict[str, float]]:
    """The digits' raw rows, as the pipeline ingests them (no label)."""
    from trackflow.data.ingest import load_bundled, to_canonical

    table = to_canonical(load_bundled("digits"), "target")[0].drop(columns="target")
    return table.sample(frac=1.0, random_state=0).to_dict(orient="records")


def benchmark(args: argparse.Namespace, tracking_uri: str, params: Path, folder: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("TRACKFLOW_API_TOKEN", None)
    ours = [sys.executable, "-m", "trackflow.cli", "serve", "--params", str(params)]
    ours += ["--model-name", args.name, "--port", "{port}"]
    theirs = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{args.name}@champion"]
    theirs += ["--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}"]
    rows = feature_rows()
    cases = [(1, args.clients), (64, args.clients), (1, 1)]
    payloads = {size: bodies(rows, size) for size, _ in cases}
    predictions = f"/models/{args.name}/predictions"
    with (
        server(theirs, env, "/ping", folder / "mlflow-serve.log") as mlflow_port,
        server(ours, env, "/ready", folder / "trackflow-serve.log") as our_port,
    ):
        targets = {
            ROUTES[0]: (mlflow_port, "/invocations", "records"),
            ROUTES[1]: (our_port, "/invocations", "records"),
            ROUTES[2]: (our_port, predictions, "rows"),
        }
        first = {
            name: first_request_ms(port, path, payloads[1][form][0])
            for name, (port, path, form) in targets.items()
            if name != ROUTES[1]
        }
        results = {(case, name): [] for case in cases for name in targets}
        for round_ in range(args.rounds + 1):  # round 0 is the warm-up
            order = list(targets) if round_ % 2 else list(reversed(targets))
            for case in cases:
                for name in order:
                    port, path, form = targets[name]
                    requests = [http_request(port, path, b) for b in payloads[case[0]][form]]
                    seconds = args.seconds if round_ else min(2.0, args.seconds)
                    outcome = asyncio.run(load(port, requests, case[1], seconds))
                    if round_:
                        results[(case, name)].append(outcome)
                    print(
                        f"round {round_} {case[0]:>2} rows x {case[1]} clients  {name:<36}"
                        f"{outcome[0]:8.0f} req/s",
                        flush=True,
                    )
    report(results, cases, first, args)
    print_model_costs(tracking_uri, args.name, rows)


def report(results: dict, cases: list[tuple[int, int]], first: dict, args: argparse.Namespace):
    print(
        f"\n{args.rounds} rounds of {args.seconds:g} s per case and target; medians over rounds "
        "(p50/p99 over each round's requests)"
    )
    print(
        f"| {'case':<20} | {'server, route':<36} "
        "| req/s | p50 ms | p99 ms | failed | req/s per round |"
    )
    print("|" + "---|" * 7)
    for size, clients in cases:
        for name in ROUTES:
            runs = results[((size, clients), name)]
            rates = [rate for rate, _, _ in runs]
            print(
                f"| {f'{size} row(s), {clients} client(s)':<20} | {name:<36} "
                f"| {statistics.median(rates):5.0f} "
                f"| {statistics.median(percentile(lat, 0.5) * 1e3 for _, lat, _ in runs):6.2f} "
                f"| {statistics.median(percentile(lat, 0.99) * 1e3 for _, lat, _ in runs):6.2f} "
                f"| {sum(failed for *_, failed in runs):6d} "
                f"| {' '.join(f'{rate:.0f}' for rate in rates)} |"
            )
    print("\nrequests/s of trackflow serve / mlflow models serve (median of per-round ratios)")
    print(f"| {'case':<20} | /invocations | /models/NAME/predictions |")
    print("|---|---|---|")
    for case in cases:
        base = [rate for rate, _, _ in results[(case, ROUTES[0])]]

        def ratio(name: str, case: tuple[int, int] = case, base: list[float] = base) -> float:
            ours = [rate for rate, _, _ in results[(case, name)]]
            return statistics.median(a / b for a, b in zip(ours, base, strict=True))

        label = f"{case[0]} row(s), {case[1]} client(s)"
        print(f"| {label:<20} | {ratio(ROUTES[1]):11.1f}x | {ratio(ROUTES[2]):23.1f}x |")
    print("\nfirst single-row request after ready, and the median of the next 20 (ms):")
    for name, (once, twice) in first.items():
        print(f"  {name:<36} {once:8.1f} {twice:8.1f}")


def print_model_costs(tracking_uri: str, name: str, rows: list[dict[str, float]]) -> None:
    """In-process time of one call of each step a request pays, on the champion as the service
    loads it (smoke-tested and warmed up), with one torch thread."""
    import pandas as pd
    import torch
    from mlflow import MlflowClient

    from trackflow.serving.model import load_version
    from trackflow.serving.rows import prediction_rows
    from trackflow.tracking import Tracking

    torch.set_num_threads(1)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as trackflow serve
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(name, "champion").version
    served = load_version(Tracking(client, tracking_uri, ""), name, version)
    scorer = served.scorer
    bodies = {n: orjson.dumps({"rows": rows[:n]}) for n in (1, 64)}
    frames = {n: pd.DataFrame(rows[:n]) for n in (1, 64)}
    checked = {n: scorer.check(frame) for n, frame in frames.items()}

    def whole(n: int) -> bytes:
        values = prediction_rows(bodies[n], scorer, 1000)
        return orjson.dumps({"predictions": served.predictions(served.score(values))})

    calls = {
        "serving.prediction_rows (body -> rows, fast path)": lambda n: prediction_rows(
            bodies[n], scorer, 1000
        ),
        "Scorer.check = check_rows (slow path only)": lambda n: scorer.check(frames[n]),
        "Scorer.score (the packaged model, every batch)": lambda n: scorer.score(checked[n]),
        "a whole request, in process (body -> JSON out)": whole,
    }
    print("\nin-process cost of one call (ms, median of 5 x 50 calls, one torch thread):")
    print(f"| {'call':<50} | 1 row | 64 rows |")
    print("|---|---|---|")
    for label, call in calls.items():
        times = [median_call_ms(lambda call=call, n=n: call(n)) for n in (1, 64)]
        print(f"| {label:<50} | {times[0]:5.2f} | {times[1]:7.2f} |")


def median_call_ms(call: Callable[[], object]) -> float:
    return statistics.median(timeit.timeit(call, number=50) / 50 for _ in range(5)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="per case, target and round")
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections")
    parser.add_argument("--name", default="trackflow", help="registered model name")
    parser.add_argument(
        "--tracking-uri", help="use this store's champion instead of building one (e.g. make run's)"
    )
    args = parser.parse_args()
    if args.tracking_uri:
        with tempfile.TemporaryDirectory() as logs:
            benchmark(args, args.tracking_uri, REPO / "params.yaml", Path(logs))
        return
    with scratch({"model.name": args.name}) as folder:
        run("ingest", "split", "preprocess", "pretrain", "train", "anomaly", "register")
        benchmark(args, f"sqlite:///{folder}/mlflow.db", folder / "params.yaml", folder)


if __name__ == "__main__":
    main()
