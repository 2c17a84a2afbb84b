"""offload-serve, the real console script serving the demo model (offloaded: 4 expert slots of 16) on
127.0.0.1, driven by the official openai client: answers equal offload's own greedy ones with the right
usage, streaming, stop and max_tokens, sampling with a seed, two clients at once, a client that disconnects
mid-stream (its generation is cancelled), bad requests, Prometheus metrics, and SIGTERM (exit 0). One server
for the module; the SIGTERM test, last, stops it."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from emulation import PYTHON
from prometheus_client.parser import text_string_to_metric_families

import offload

BIN = Path(sys.executable).parent
QUESTION = [{"role": "user", "content": "What is 12+35?"}]
LONG = 480  # tokens of a generation that ignores EOS: long enough to be interrupted
MAX_BODY = 64 * 1024


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """Every sample, keyed `name` or `name{label=value}`."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=60).read().decode()
        return {s.name + "".join(f"{{{k}={v}}}" for k, v in s.labels.items()): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = _free_port()
    script = BIN / "offload-serve"
    assert script.is_file(), f"{script} is missing: a console script new to pyproject, installed by `pip install -e .`"
    command = [*PYTHON, str(script), "--port", str(port), "--cache-experts", "4",
               "--max-tokens", str(LONG), "--max-request-bytes", str(MAX_BODY)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    served = Server(process, port, log)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, f"offload-serve exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"offload-serve never answered /health:\n{log.read_text()}"
        try:
            urllib.request.urlopen(f"{served.url}/health", timeout=5)
            break
        except OSError:
            time.sleep(0.2)
    yield served
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def demo():
    """The same model in this process: the answers the server must give."""
    return offload.load("demo", device="cpu")


def _usage(demo, messages, **options) -> tuple[str, int, int]:
    """(greedy reply text, prompt tokens, completion tokens: what the tensor API generates, EOS included)."""
    ids = demo.prompt_ids(messages)
    new = demo.generate(ids, **options)[0, ids.shape[1]:]
    return demo.tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(new)


def test_binds_to_localhost(server):
    assert f"running on http://127.0.0.1:{server.port}" in server.log.read_text()
    assert [m.id for m in server.client().models.list().data] == ["demo"]


def test_chat_completion_equals_generate(server, demo):
    text, prompt_tokens, completion_tokens = _usage(demo, QUESTION, max_new_tokens=64)
    answer = server.client().chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=64)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


def test_streaming_chat_equals_whole_answer(server, demo):
    text, prompt_tokens, completion_tokens = _usage(demo, QUESTION, max_new_tokens=64)
    chunks = list(server.client().chat.completions.create(
        model="demo", messages=QUESTION, temperature=0, max_tokens=64, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text and len([d for d in deltas if d]) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_completions_and_max_tokens(server, demo):
    prompt = "Start with 7, add 5, then multiply by 2."  # a raw prompt the demo continues for ~20 tokens
    answer = server.client().completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=3)
    assert answer.choices[0].text == demo.generate(prompt, max_new_tokens=3)
    assert len(demo.generate(prompt, max_new_tokens=64)) > len(answer.choices[0].text)  # cut by max_tokens
    assert (answer.choices[0].finish_reason, answer.usage.completion_tokens) == ("length", 3)
    streamed = server.client().completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=3,
                                                  stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def test_stop(server, demo):
    expected = demo.generate(QUESTION, max_new_tokens=64, stop=["="])
    answer = server.client().chat.completions.create(model="demo", messages=QUESTION, temperature=0, stop=["="])
    assert answer.choices[0].message.content == expected == "12+35"
    assert answer.choices[0].finish_reason == "stop"


def test_sampling_with_seed(server, demo):
    options = dict(temperature=1.5, top_p=0.95, seed=1234)
    expected = demo.generate(QUESTION, max_new_tokens=64, top_k=8, **options)
    client = server.client()
    answers = [client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=64,
                                              extra_body={"top_k": 8}, **options).choices[0].message.content
               for _ in range(2)]
    assert answers == [expected, expected]


def test_two_concurrent_clients(server, demo):
    questions = ["What is 81-29?", "Sort: 9, 2, 7"]
    expected = [demo.generate([{"role": "user", "content": q}], max_new_tokens=64) for q in questions]

    def ask(question: str) -> str:
        stream = server.client().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=64, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(ask, questions * 2)) == expected * 2


def test_disconnect_mid_stream_cancels_the_generation(server, demo):
    before = server.metrics()
    body = json.dumps({"messages": QUESTION, "stream": True, "ignore_eos": True, "max_tokens": LONG,
                       "temperature": 0})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # the client goes away mid-stream
    _, _, tokens = _usage(demo, QUESTION, max_new_tokens=64)
    # served after the cancelled one: the worker takes one generation at a time
    assert server.client().chat.completions.create(model="demo", messages=QUESTION, temperature=0,
                                                   max_tokens=64).usage.completion_tokens == tokens
    after = server.metrics()
    assert after["offload_requests_total{outcome=cancelled}"] == before["offload_requests_total{outcome=cancelled}"] + 1
    generated = after["offload_completion_tokens_total"] - before["offload_completion_tokens_total"]
    assert tokens < generated < tokens + LONG  # the cancelled one stopped short of LONG tokens


def test_bad_requests_get_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=QUESTION, temperature=5)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    for body, param in [({"messages": QUESTION, "max_tokens": LONG + 1}, "max_tokens"),
                        ({"messages": QUESTION, "n": 2}, "n"), ({"messages": []}, "messages"),
                        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
                        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"prompt": 3}, "prompt"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content")]:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        status, answer = server.post(path, json.dumps(body).encode())
        assert status == 400 and answer["error"]["param"] == param, answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    status, answer = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]
    status, answer = server.post("/v1/chat/completions", b" " * (MAX_BODY + 1))
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    # a field this server does not know is ignored
    answer = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=2,
                                            extra_body={"no_such_option": [1, 2]})
    assert answer.usage.completion_tokens == 2


def test_metrics(server):
    samples = server.metrics()
    assert samples["offload_requests_total{outcome=completed}"] > 0
    assert samples["offload_completion_tokens_total"] > 0 and samples["offload_tokens_per_second"] > 0
    assert samples["offload_expert_hits_total"] > 0 and samples["offload_expert_misses_total"] > 0
    assert samples["offload_queue_length"] == 0 and samples["offload_running_requests"] == 0
    assert "offload_expert_bytes_copied_total" in samples


def test_sigterm_ends_the_stream_and_exits_0(server):
    """Last: it stops the module's server. The request in flight gets an error event and [DONE]."""
    body = json.dumps({"messages": QUESTION, "stream": True, "ignore_eos": True, "max_tokens": LONG})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    server.process.send_signal(signal.SIGTERM)
    events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][6:])["error"]["message"]
    assert server.process.wait(timeout=120) == 0, server.log.read_text()
