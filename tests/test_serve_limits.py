"`mil_nb_serve`'s limits on one request: bags, slides, bodies, slow clients, concurrency, and its start-up errors."
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from mil_nb.serve.wire_formats import npy_body
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import save_model
from mil_nb.core.net import free_port
from mil_nb.serve.heap import BOUNDED_HEAP
from mil_nb.serve.server import SERVE_COMMAND, post, running_server, serve_cli
from mil_nb.slides.readers import write_bomb

RSS_BOUND_MB = 1500  # the server's peak resident memory serving 2 maximal requests at once (issue 24)


def random_model_dir(tmp_path_factory, name: str, **config):
    "A folder holding model.pt of a random model (seed 0) with `config`."
    path = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    save_model(AttentionMIL(MILConfig(**config)), path/"model.pt")
    return path


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def small_model_dir(tmp_path_factory):
    "A small random model (32 px tiles)."
    return random_model_dir(tmp_path_factory, "small", tile_size=32)


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def small_server(small_model_dir):
    "A server with tight limits: 1 MiB bodies, 8 tiles, a 1 s wait for a body's next chunk."
    options = ("--max_body_mb", "1", "--max_tiles", "8", "--body_timeout_s", "1")
    with running_server(small_model_dir, *options, log=subprocess.DEVNULL) as url: yield url


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def default_server(tmp_path_factory):
    "A server with the default options on a random model of the default shape (128 px tiles)."
    with running_server(random_model_dir(tmp_path_factory, "default"), log=subprocess.DEVNULL) as url: yield url


def memory_mb(url, field: str = "VmHWM") -> float:
    "The server process's VmRSS (now) or VmHWM (its peak so far), in MiB."
    status = open(f"/proc/{url.process.pid}/status").read()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def ping(url) -> int:
    return post_raw(url, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")[0]


def connect(url) -> socket.socket:
    address = urlsplit(url)
    return socket.create_connection((address.hostname, address.port), timeout=30)


def read_answer(sock) -> tuple[int, dict]:
    "The status and JSON body of the answer on `sock` (read until the server closes or the body is complete)."
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = sock.recv(65536)
        if not chunk: break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length": return int(value)
    return 0


def post_raw(url, request: bytes) -> tuple[int, dict]:
    with connect(url) as sock:
        sock.sendall(request)
        return read_answer(sock)


def test_a_decompression_bomb_is_refused_from_its_header(default_server, tmp_path):
    write_bomb(tmp_path/"bomb.tiff", side=70_000, levels=4)
    status, answer = post(default_server, (tmp_path/"bomb.tiff").read_bytes(), "image/tiff")
    assert status == 400 and "over the limit" in answer["error"] and "_pixels" in answer["error"], answer
    assert tempfile.gettempdir() not in answer["error"] and "the slide" in answer["error"]
    assert memory_mb(default_server) < RSS_BOUND_MB


def test_two_maximal_bags_at_once_stay_under_the_memory_bound(default_server):
    "512 tiles of 128 px (the default max_tiles, the model's tile size), two at once."
    body = npy_body(np.random.default_rng(0).integers(0, 256, (512, 128, 128, 3), dtype=np.uint8))
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(default_server, body, timeout=300), range(2)))
    statuses = sorted(status for status, _ in answers)
    assert statuses in ([200, 200], [200, 503]), answers
    assert all(answer["n_tiles"] == 512 for status, answer in answers if status == 200)
    rss = memory_mb(default_server)
    print(f"server peak RSS with 2 maximal requests at once: {rss:.0f} MiB")
    assert rss < RSS_BOUND_MB
    status, answer = post(default_server, npy_body(np.zeros((513, 128, 128, 3), np.uint8)))
    assert status == 413 and "max_tiles" in answer["error"]
    assert ping(default_server) == 200


def test_bags_over_max_tiles_get_413_and_bad_json_400(small_server):
    tiles = np.zeros((9, 32, 32, 3), np.uint8)
    assert post(small_server, npy_body(tiles))[0] == 413
    assert post(small_server, json.dumps({"tiles": tiles.tolist()}).encode(), "application/json")[0] == 413
    bad_json = ['{"tiles": "abc"}', '{"tiles": [[[["a", "b", "c"]]]]}', '{"tiles": [[[[1.5, 2, 3]]]]}',
                '{"tiles": [[[[[1, 2, 3]]]]]}', '{"tiles": ' + "[" * 1000 + "]" * 1000 + "}", "[" * 100_000]
    for body in bad_json:
        status, answer = post(small_server, body.encode(), "application/json")
        assert (status, type(answer.get("error"))) == (400, str), f"{body[:40]}: {status} {answer}"
    assert post(small_server, npy_body(tiles[:8]))[0] == 200


def test_404_405_are_json_and_accept_is_checked_first(small_server):
    for request, expected in [(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                              (b"GET /invocations HTTP/1.1\r\nHost: x\r\n\r\n", 405)]:
        status, answer = post_raw(small_server, request)
        assert status == expected and "error" in answer
    for accept in ["text/csv", "application/json;q=0"]:  # a body that could not be decoded: 406 comes first
        request = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nAccept: {accept}\r\n"
                   "Content-Length: 7\r\n\r\nnot npy").encode()
        assert post_raw(small_server, request)[0] == 406


def test_a_body_over_the_limit_is_refused_before_it_is_all_sent(small_server):
    with connect(small_server) as sock:  # declared too large: refused at once, before any of it is sent
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        assert read_answer(sock)[0] == 413
    sent, chunk = 0, b"x" * 65536
    with connect(small_server) as sock:  # chunked: refused once the running total passes 1 MiB
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 64 * 2**20 and not select.select([sock], [], [], 0.01)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError): pass
        status, answer = read_answer(sock)
    assert status == 413 and "max_body_mb" in answer["error"]
    assert sent < 8 * 2**20, f"{sent:,} bytes were sent before the 413"
    assert ping(small_server) == 200


def test_a_stalled_upload_is_closed_while_a_good_request_is_answered(small_server):
    with connect(small_server) as stalled:
        stalled.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                        b"Content-Length: 1000000\r\n\r\n0123456789")
        start = time.monotonic()
        assert post(small_server, npy_body(np.zeros((4, 32, 32, 3), np.uint8)))[0] == 200
        status, answer = read_answer(stalled)
        assert status == 408 and "body_timeout_s" in answer["error"]
        assert 0.9 < time.monotonic() - start < 10
        assert stalled.recv(1) == b""  # and closed


def serve_error(*options, model_dir="/nowhere", command=SERVE_COMMAND) -> tuple[int, str]:
    "The exit status and stderr of `mil_nb_serve` that fails to start."
    run = subprocess.run([*command, "--model_dir", str(model_dir), "--host", "127.0.0.1",
                          "--port", str(free_port()), *options], capture_output=True, text=True, timeout=60)
    return run.returncode, run.stderr


def serve_error_here(capsys, monkeypatch, *options, model_dir="/nowhere") -> tuple[int, str]:
    """`serve_cli` in this process, as `mil_nb_serve` runs it once restarted: the exit status and stderr the process
    would end with (Python prints a `SystemExit` message on a line of its own and exits with 1). The heap's settings
    are in the environment, as after the restart, so this process is never replaced: an option checked only after
    the restart reaches the model (`/nowhere`) and is reported as the missing model.pt."""
    for name, value in BOUNDED_HEAP.items(): monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        serve_cli(["--model_dir", str(model_dir), "--host", "127.0.0.1", "--port", str(free_port()), *options])
    printed, code = capsys.readouterr().err, stopped.value.code
    return (1, f"{printed}{code}\n") if isinstance(code, str) else (code or 0, printed)


BAD_OPTIONS = [("port", "0"), ("port", "70000"), ("max_body_mb", "0"), ("max_tiles", "0"), ("precision", "fp8"),
               ("device", "gpu"), ("max_concurrency", "0"), ("max_queue", "-1"), ("body_timeout_s", "0"),
               ("max_level_pixels", "0"), ("max_uploads", "0"), ("min_body_kib_s", "0"), ("header_timeout_s", "-1"),
               ("body_timeout_s", "nan")]


@pytest.mark.parametrize("option, value", BAD_OPTIONS)
def test_options_are_checked_before_the_model_is_loaded(option, value, capsys, monkeypatch):
    "In this process (a server process would import the same modules again for each): see the console script below."
    port = [] if option == "port" else ["--port", "8080"]
    status, stderr = serve_error_here(capsys, monkeypatch, *port, f"--{option}", value)
    assert status != 0 and stderr.startswith("mil_nb_serve: ") and stderr.count("\n") == 1, stderr
    assert option in stderr and "no model.pt" not in stderr, stderr


def test_the_console_script_refuses_a_bad_option_in_one_line():
    "`mil_nb_serve` itself (restarted with a bounded heap, then `serve_cli`): exit status 1, one line, no traceback."
    for command in (("mil_nb_serve",), ("mil_nb", "serve")):
        status, stderr = serve_error("--max_queue", "-1", command=command)
        assert status == 1 and stderr.startswith("mil_nb_serve: ") and stderr.count("\n") == 1, (command, stderr)
        assert "max_queue" in stderr and "no model.pt" not in stderr, (command, stderr)


def test_the_server_runs_with_a_bounded_heap(small_server):
    "`mil_nb_serve` restarted itself (same pid) with glibc's settings before it imported the server."
    environment = dict(line.split("=", 1) for line in
                       open(f"/proc/{small_server.process.pid}/environ").read().split("\0") if "=" in line)
    assert {name: environment.get(name) for name in BOUNDED_HEAP} == BOUNDED_HEAP


def test_a_model_pt_that_cannot_be_loaded_is_one_line(small_model_dir, tmp_path):
    marker = tmp_path/"payload-ran"

    class Payload:
        def __reduce__(self): return (os.system, (f"touch {marker}",))

    good = (small_model_dir/"model.pt").read_bytes()
    for name, write in {"truncated": lambda f: f.write_bytes(good[:len(good) // 2]),
                        "random bytes": lambda f: f.write_bytes(np.random.default_rng(0).bytes(4096)),
                        "pickle payload": lambda f: torch.save({"config": Payload(), "state_dict": {}}, f),
                        "inflated config": lambda f: torch.save({"config": {"embed_dim": 16384}, "state_dict": {}}, f),
                        }.items():
        model_dir = tmp_path/name.replace(" ", "_")
        model_dir.mkdir()
        write(model_dir/"model.pt")
        status, stderr = serve_error(model_dir=model_dir)
        assert status != 0 and stderr.startswith(f"mil_nb_serve: {model_dir/'model.pt'}: "), f"{name}: {stderr}"
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, f"{name}: {stderr}"
        if name == "inflated config": assert "MILConfig.embed_dim=16384: expected an integer" in stderr, stderr
    assert not marker.exists(), "loading model.pt ran code from the pickle"


def test_slow_clients_do_not_hold_the_model(small_server):
    "Two uploads that trickle a byte at a time take no turn of the model; each is cut off by the least body rate."
    with connect(small_server) as first, connect(small_server) as second:
        for slow in (first, second):
            slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                         b"Content-Length: 1000000\r\n\r\n0")
        start = time.monotonic()

        def trickle():  # a byte every 0.5 s: never a stall of body_timeout_s (1 s), but far under min_body_kib_s
            while time.monotonic() - start < 6:
                time.sleep(0.5)
                with contextlib.suppress(OSError): first.sendall(b"1"); second.sendall(b"1")

        with ThreadPoolExecutor(1) as pool:
            pool.submit(trickle)
            time.sleep(0.2)
            assert post(small_server, npy_body(np.zeros((4, 32, 32, 3), np.uint8)))[0] == 200
            for slow in (first, second):
                status, answer = read_answer(slow)
                assert status == 408 and "none in the last 0." in answer["error"], answer  # it never stalled
            assert time.monotonic() - start < 4
