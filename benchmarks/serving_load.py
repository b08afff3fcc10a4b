"""`mlflow models serve` under concurrent clients: latency p50 / p95, throughput, errors.

    .venv/bin/python benchmarks/serving_load.py MODEL [--clients 8] [--requests 25] [--backend auto]

MODEL is a folder with model.pt, detector.json and model.onnx (models/ plus eval/detector.json, as
the pipeline leaves them). It is logged to a throwaway sqlite store as the pipeline logs it
(models-from-code, ``serving.py``), served on localhost with ``--env-manager local`` and
DEEPFAKE_BACKEND set to ``--backend``, and ``--clients`` threads each send ``--requests`` POSTs of
one faces-mini test face. Every request must answer 200 with no error row; a last request mixes a
face with a broken row, which must get its own error while the face is scored.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces-mini"


def post(url: str, rows: list[str]) -> tuple[float, list[dict]]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    return time.perf_counter() - start, answer["predictions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"])
    args = parser.parse_args()
    from deepfake_detector.params import MlflowParams
    from deepfake_detector.tracking import Tracker

    faces = sorted((FACES_MINI / "real-vs-fake" / "test").rglob("*.jpg"))
    rows = [base64.b64encode(f.read_bytes()).decode() for f in faces]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri  # the store we log to is the one the server reads, whatever was set
        os.chdir(tmp)  # the store's artifacts (./mlruns) land here
        tracker = Tracker.start(MlflowParams(tracking_uri=uri, experiment="serving-load"), "serving-load", {}, {})
        with tracker.running():
            model_uri = tracker.log_model(args.model / "model.pt", args.model / "detector.json", faces[0].read_bytes())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        bin_dir = Path(sys.executable).parent
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, DEEPFAKE_BACKEND=args.backend,
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        log = (tmp / "serve.log").open("w")
        server = subprocess.Popen([shutil.which("mlflow", path=env["PATH"]), "models", "serve", "-m", model_uri,
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit((tmp / "serve.log").read_text())
                    time.sleep(0.5)
            post(f"{url}/invocations", rows[:1])  # warm-up

            def client(k: int) -> list[float]:
                times = []
                for i in range(args.requests):
                    seconds, answer = post(f"{url}/invocations", [rows[(k * args.requests + i) % len(rows)]])
                    if answer[0]["error"]:
                        raise RuntimeError(f"request failed: {answer[0]['error']}")
                    times.append(seconds)
                return times

            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                times = np.concatenate(list(pool.map(client, range(args.clients)))) * 1000
            wall = time.perf_counter() - start
            _, mixed = post(f"{url}/invocations", [rows[0], "not base64!"])
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert mixed[0]["error"] == "" and mixed[1]["error"] and mixed[1]["predicted"] is None, mixed
    print(f"{args.clients} clients x {args.requests} requests, backend {args.backend}, {os.cpu_count()} cores: "
          f"p50 {np.percentile(times, 50):.1f} ms, p95 {np.percentile(times, 95):.1f} ms, "
          f"{len(times) / wall:.1f} requests/s, 0 errors; a broken row beside a face: "
          f"{mixed[1]['error']!r}, the face scored")


if __name__ == "__main__":
    main()
