"""Checks `s2d submit` makes before anything leaves the laptop."""

from pathlib import Path

import pytest

from s2d_ray.config import ConfigError, load_config
from s2d_ray.errors import S2DError
from s2d_ray.submit import _until_an_agent_answers, check_transport, cluster_run_dir

PAPER = Path(__file__).resolve().parents[2] / "jobs" / "paper" / "last-letter-rar2-70b.yaml"


@pytest.mark.parametrize("address", ["http://10.0.0.5:8265", "head.example.org:8265", "http://head:8265"])
def test_a_token_is_not_sent_over_plain_http_to_another_host(address):
    with pytest.raises(S2DError, match="refusing to send the Ray token over plain http:// .*SSH"):
        check_transport(address)
    check_transport(address, insecure=True)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265",
                                     "https://head.example.org"])  # fmt: skip
def test_loopback_and_https_are_fine(address):
    check_transport(address)


def test_the_cluster_run_directory_is_explicit(monkeypatch):
    monkeypatch.delenv("S2D_RUNS", raising=False)
    cfg = load_config(PAPER)
    with pytest.raises(S2DError, match="relative: on a cluster it would land in the job's temporary folder"):
        cluster_run_dir(None, cfg)
    assert cluster_run_dir("/fsx/runs/a", cfg) == "/fsx/runs/a"
    monkeypatch.setenv("S2D_RUNS", "/fsx/runs")
    assert cluster_run_dir("b", cfg) == "/fsx/runs/b"
    monkeypatch.delenv("S2D_RUNS")
    cfg = load_config(PAPER, ["cluster.runs_dir=/mnt/shared/runs"])
    assert cluster_run_dir(None, cfg) == f"/mnt/shared/runs/{cfg.out}"
    with pytest.raises(ConfigError, match="cluster.runs_dir: must be an absolute path"):
        load_config(PAPER, ["cluster.runs_dir=runs"])


def test_a_binary_job_file_is_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ConfigError, match="not a text job file"):
        load_config(job)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_a_head_without_its_job_agent_yet_is_asked_again_and_other_errors_are_not(monkeypatch):
    monkeypatch.setattr("s2d_ray.submit.time.sleep", lambda s: None)
    answers = iter([RuntimeError("Request failed with status code 500: No available agent to submit job, please "
                                 "try again later."), RuntimeError("... No available agent ..."), "raysubmit_1"])  # fmt: skip

    def submit():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert _until_an_agent_answers(submit) == "raysubmit_1"
    calls = []

    def refused():
        calls.append(1)
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    with pytest.raises(RuntimeError, match="bad runtime_env"):
        _until_an_agent_answers(refused)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="No available agent"):  # not for ever
        _until_an_agent_answers(lambda: (_ for _ in ()).throw(RuntimeError("No available agent")), wait_s=0)
