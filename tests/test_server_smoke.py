"""A real tritonserver on loopback answers a real gRPC request from a python model."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from audiostory_ensemble.runtime.processes import descendants
from audiostory_ensemble.serving.triton_server import GRPC_ADMIN_HEADER, TritonServer, TritonServerError, server_env

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def smoke_server(test_build_dir):
    repo = test_build_dir / "smoke_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(FIXTURES / "stack_info", repo / "stack_info")
    with TritonServer(repo, log_path=test_build_dir / "smoke_server.log") as server:
        yield server


def test_stack_info_round_trip_over_grpc(smoke_server):
    client = grpcclient.InferenceServerClient(smoke_server.grpc_url)
    assert client.is_model_ready("stack_info")
    query = grpcclient.InferInput("QUERY", [1], "BYTES")
    query.set_data_from_numpy(np.array(["héllo".encode()], dtype=np.object_))
    result = client.infer("stack_info", [query])
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["echo"] == "héllo"
    # The stub must run the venv's interpreter with numpy<2 (Triton 2.51's python backend
    # corrupts tensors under numpy 2).
    assert int(info["numpy"].split(".")[0]) < 2
    assert info["python"].startswith("3.11")


def test_safe_defaults_loopback_and_model_loading_only_with_the_admin_header(smoke_server):
    assert smoke_server.address == "127.0.0.1"
    cmd = smoke_server.command()
    assert {"--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(cmd)
    # explicit control, for the supervisor's reloads; nobody else loads or unloads without the header
    assert {"--model-control-mode=explicit", "--load-model=*"} <= set(cmd)
    client = grpcclient.InferenceServerClient(smoke_server.grpc_url)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(Exception, match="(?i)restricted|header"):
            call("stack_info")
    assert client.is_model_ready("stack_info")
    unsupervised = TritonServer(smoke_server.model_repository, supervise=False).command()
    assert "--model-control-mode=none" in unsupervised and not [a for a in unsupervised if "load-model" in a]


def test_apis_that_take_host_paths_need_the_admin_header(smoke_server):
    """Shared-memory regions, trace files, log settings and model loading name host resources:
    without the admin header they are refused; inference and metadata stay open."""
    client = grpcclient.InferenceServerClient(smoke_server.grpc_url)
    refused = [
        lambda h: client.register_system_shared_memory("r", "/audiostory_probe", 64, headers=h),
        lambda h: client.update_trace_settings(settings={"trace_file": "/tmp/x.json"}, headers=h),
        lambda h: client.update_log_settings({"log_verbose_level": 1}, headers=h),
        lambda h: client.load_model("stack_info", headers=h),
        lambda h: client.get_model_repository_index(headers=h),
    ]
    for call in refused:
        with pytest.raises(Exception, match="(?i)restricted|header"):
            call(None)
    admin = {GRPC_ADMIN_HEADER: smoke_server.admin_token}
    assert client.get_log_settings(headers=admin) is not None
    assert client.is_model_ready("stack_info") and client.get_model_metadata("stack_info").name == "stack_info"


def test_bad_repository_is_a_clear_error(tmp_path):
    with pytest.raises(TritonServerError, match="does not exist"):
        TritonServer(tmp_path / "missing").start(timeout=5)


def _maps_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def test_the_server_and_its_stub_run_on_jemalloc_and_the_choice_is_checked(smoke_server):
    """glibc's malloc let the server's memory grow over a soak (benchmarks/README); setup installs
    jemalloc and the server helper preloads it into the server, hence into every stub."""
    tree = [smoke_server.process.pid, *descendants(smoke_server.process.pid)]
    assert len(tree) >= 2                                   # the server and the stack_info stub
    assert [pid for pid in tree if not _maps_jemalloc(pid)] == []
    assert "libjemalloc" not in server_env(base={"AUDIOSTORY_ALLOCATOR": "system"}).get("LD_PRELOAD", "")
    env = server_env(base={"LD_PRELOAD": "libother.so"})
    assert env["LD_PRELOAD"].split(":")[1:] == ["libother.so"] and "jemalloc" in env["LD_PRELOAD"]
    assert server_env(base=env)["LD_PRELOAD"] == env["LD_PRELOAD"]     # preloaded once
    with pytest.raises(ValueError, match="AUDIOSTORY_ALLOCATOR must be one of jemalloc, system, not 'tcmalloc'"):
        server_env(base={"AUDIOSTORY_ALLOCATOR": "tcmalloc"})


def _entrypoint_lines(word: str) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    text = (root / "deploy" / "entrypoint.sh").read_text().replace("\\\n", " ")
    return [ln for ln in text.splitlines() if word in ln and not ln.lstrip().startswith("#")]


def test_the_container_entrypoint_refuses_an_unknown_allocator_before_the_build():
    """The entrypoint checks AUDIOSTORY_ALLOCATOR by the helper's rule before converting anything
    (the helper it execs applies the rule to the server)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    lines = _entrypoint_lines("serving.allocator")
    assert len(lines) == 1
    text = (root / "deploy" / "entrypoint.sh").read_text()
    assert text.index(lines[0]) < text.index("convert_checkpoint.py")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for value, rc, said in (("tcmalloc", 2, "AUDIOSTORY_ALLOCATOR must be one of jemalloc, system, not 'tcmalloc'"),
                            ("system", 0, ""), (None, 0, "")):
        run_env = env if value is None else {**env, "AUDIOSTORY_ALLOCATOR": value}
        r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + lines[0]], cwd=root, env=run_env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == rc and said in r.stderr, r.stderr


def test_the_container_entrypoint_execs_the_supervised_server_helper():
    """The container runs the server the way `make serve` does: the helper, its supervisor on, the
    image's Triton, the log on stdout; its options are the helper's own."""
    import shlex

    from audiostory_ensemble.serving import triton_server

    (line,) = _entrypoint_lines("exec ")
    argv = shlex.split(line.replace('"$CACHE/model_repository"', "/cache/model_repository").replace('"$@"', ""))
    assert argv[:4] == ["exec", "python3", "-m", "audiostory_ensemble.serving.triton_server"]
    kw, _ = triton_server.server_options(argv[4:])
    assert kw["triton_home"] == "/opt/tritonserver" and kw["address"] == "0.0.0.0" and kw["log_path"] == "-"
    assert kw["supervise"] is True and (kw["grpc_port"], kw["http_port"], kw["metrics_port"]) == (8001, 8000, 8002)


def test_a_port_taken_between_picking_and_binding_is_picked_again(test_build_dir, monkeypatch):
    """Ports are picked free, then bound by the server a moment later: another process (a vLLM
    engine, another test's server) can take one in between. The start then fails with Triton's
    "already in use" and is tried again on fresh ports, not failed."""
    import socket

    from audiostory_ensemble.serving import triton_server

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real, picks = triton_server.free_port, []

    def pick(address):
        port = taken.getsockname()[1] if not picks else real(address)
        picks.append(port)
        return port

    monkeypatch.setattr(triton_server, "free_port", pick)
    repo = test_build_dir / "port_race_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(FIXTURES / "stack_info", repo / "stack_info")
    try:
        with TritonServer(repo, log_path=test_build_dir / "port_race_server.log", supervise=False) as server:
            assert server.http_port != taken.getsockname()[1] and server.is_ready()
            assert len(picks) == 6                  # three, then three fresh ones
        assert "already in use" in (test_build_dir / "port_race_server.log").read_text()
    finally:
        taken.close()
