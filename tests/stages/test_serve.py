"""`mmctl serve` as its clients see it: a real server process on a free loopback port, spoken to with the official
`openai` client — greedy answers equal `mmctl generate`'s, streamed chunks reassemble to the same text, concurrent
clients all get their own answer, bad requests get one JSON error and the server serves on, SIGTERM finishes the
request in flight. The queue's 503 and the request checks are tested in-process on the same app."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cli import ENV
from tests.stages.test_chat import decoded, generated

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

NAME = "tiny"


class Server:
    """`mmctl serve CHECKPOINT --port 0 ARGS…` running; `url` is its base URL, read from what it prints."""

    def __init__(self, checkpoint, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "mmctl", "serve", str(checkpoint), "--port", "0",
                                      "--name", NAME, *args], stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if found := re.search(r"at (http://\S+/v1)", line):
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=300, **kw)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    s = Server(chat_checkpoint, "--batch-size", "8")
    yield s
    assert s.stop() == 0, "".join(s.lines)


def ask(client, text: str, **kw) -> str:
    done = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], temperature=0,
                                          **kw)
    return done.choices[0].message.content


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == [NAME]
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health") as r:
        assert json.load(r) == {"status": "ok"}


def test_greedy_chat_equals_generate(server, chat_checkpoint):
    assert ask(server.client(), "Hello there", max_tokens=6) == generated(chat_checkpoint, "Hello there", "--chat",
                                                                         "--max-new-tokens", "6")


def test_conversation_and_system_message(server, chat_checkpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 3?"}]
    done = server.client().chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=5)
    assert done.choices[0].message.content == decoded(chat_checkpoint, messages, 5)
    assert done.usage.completion_tokens <= 5 and done.choices[0].finish_reason in ("stop", "length")


def test_stream_reassembles_to_the_same_text(server):
    client = server.client()
    whole = ask(client, "Tell me a story", max_tokens=12)
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story"}],
                                                 temperature=0, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_equal_generate(server, checkpoint):
    """A plain continuation, as `mmctl generate` (no chat template) continues the same text; a list of prompts and
    a prompt of token ids answer alike."""
    client = server.client()
    expected = generated(checkpoint, "Once upon a time", "--max-new-tokens", "8")
    done = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.choices[0].text == expected
    two = client.completions.create(model=NAME, prompt=["Once upon a time", "2 + 2 ="], max_tokens=8, temperature=0)
    assert two.choices[0].text == expected and len(two.choices) == 2
    from mmctl.tokenizer import bpe

    ids = bpe.load(checkpoint).encode("Once upon a time")
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0).choices[0].text == expected


def test_stop_strings_and_seeded_sampling(server):
    client = server.client()
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    if len(text) > 4:  # stop at a piece of the greedy answer: the answer ends just before it
        cut = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0,
                                        stop=[text[3:5]])
        assert cut.choices[0].text == text[:text.index(text[3:5])] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=NAME, prompt="Once", max_tokens=8, temperature=1.0, seed=7, n=2)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # a seed repeats


def test_concurrent_clients_each_get_their_own_answer(server):
    client = server.client()
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(20)]
    alone = [ask(client, p, max_tokens=6) for p in prompts[:4]]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda p: ask(client, p, max_tokens=6), prompts))
    assert len(together) == 20 and together[:4] == alone  # batched with others, the same greedy answer


def test_a_burst_of_200_requests_is_all_answered(server):
    client = server.client()
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda i: client.completions.create(model=NAME, prompt=f"{i}", max_tokens=2,
                                                                    temperature=0), range(200)))
    assert len(answers) == 200 and all(a.choices[0].finish_reason in ("stop", "length") for a in answers)


def post(server, path: str, body: bytes, content_type="application/json") -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def chat_body(**kw) -> bytes:
    return json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], **kw}).encode()


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/chat/completions", json.dumps({"model": NAME}).encode(), 400, "messages"),
    ("/chat/completions", chat_body(model="gpt-4"), 404, "does not exist"),
    ("/chat/completions", chat_body(max_tokens=10**6), 400, "limit"),
    ("/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "user", "content": "word " * 80}],
                                      "max_tokens": 8}).encode(), 400, "context"),
    ("/chat/completions", chat_body(temperature=5), 400, "temperature"),
    ("/chat/completions", chat_body(n=100), 400, "n"),
    ("/chat/completions", chat_body(logprobs=True), 400, "logprobs"),
    ("/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(), 400,
     "language model"),
    ("/completions", json.dumps({"model": NAME, "prompt": [10**9]}).encode(), 400, "token ids"),
    ("/completions", json.dumps({"model": NAME, "prompt": ""}).encode(), 400, "empty"),
    ("/completions", json.dumps({"model": NAME, "prompt": "x", "echo": True}).encode(), 400, "echo"),
    ("/nowhere", b"{}", 404, "Not Found"),
    ("/chat/completions", b"x" * (5 << 20), 413, "larger than"),
])
def test_bad_requests_get_one_json_error_and_the_server_serves_on(server, path, body, status, says):
    code, answer = post(server, path, body)
    assert code == status and says in answer["error"]["message"], answer
    assert ask(server.client(), "Hi", max_tokens=1) is not None  # still serving


def test_sigterm_finishes_the_request_in_flight(chat_checkpoint, checkpoint):
    s = Server(chat_checkpoint)
    stream = s.client().completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0,
                                           stream=True)
    chunks = iter(stream)
    pieces = [next(chunks).choices[0].text]
    s.proc.send_signal(signal.SIGTERM)  # mid-answer: the answer still comes whole, then the server ends
    pieces += [c.choices[0].text for c in chunks]
    assert s.proc.wait(timeout=120) == 0, "".join(s.lines)
    assert "".join(pieces) == generated(checkpoint, "Once upon a time", "--max-new-tokens", "40")
    assert "stopped; 1 completions served" in "".join(s.lines)


def test_a_full_queue_answers_503_with_retry_after(chat_checkpoint):
    """The queue is bounded: past its limit a request is refused at once (memory stays flat), not queued."""
    from fastapi.testclient import TestClient

    from mmctl.batcher import Batcher
    from mmctl.server import make_app
    from mmctl.session import Session

    session = Session(str(chat_checkpoint))
    batcher = Batcher(session, batch_size=1, queue_limit=1)
    app = make_app(session, NAME, batcher)
    batcher.start = lambda: None  # nothing decodes: the first request waits in the queue, the next finds it full
    with TestClient(app) as http, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http.post, "/v1/chat/completions", content=chat_body(max_tokens=1))
        while not batcher.waiting:
            threading.Event().wait(0.01)
        full = http.post("/v1/chat/completions", content=chat_body(max_tokens=1))
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        threading.Thread(target=batcher._work, daemon=True).start()  # now decode: the waiting one is answered
        assert waiting.result(timeout=120).status_code == 200
        batcher.stop()


def test_a_vlm_sees_the_image_in_a_data_url(vlm_dir):
    """An image as OpenAI's `image_url` content part (a data: URL) is what `mmctl generate --image` answers."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from mmctl.batcher import Batcher
    from mmctl.server import make_app
    from mmctl.session import Session

    session = Session(str(vlm_dir))
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    message = {"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                           {"type": "image_url", "image_url": {"url": url}}]}
    expected = session.complete([session.prompt([session.ask("What colour is it?", image=True)])],
                                _greedy(4), pixels=session.image(io.BytesIO(png.getvalue()))[None])[0].text
    with TestClient(make_app(session, NAME, Batcher(session))) as http:
        done = http.post("/v1/chat/completions", json={"model": NAME, "messages": [message], "max_tokens": 4,
                                                        "temperature": 0})
        assert done.status_code == 200, done.text
        assert done.json()["choices"][0]["message"]["content"] == expected
        bad = {**message, "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}
        refused = http.post("/v1/chat/completions", json={"model": NAME, "messages": [bad]})
        assert refused.status_code == 400 and "fetches nothing" in refused.json()["error"]["message"]


def _greedy(n: int):
    from mmctl.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=n, temperature=0)


def test_lm_eval_scores_a_served_model(server, chat_checkpoint, tmp_path):
    """lm-evaluation-harness's `local-chat-completions` model scores the server: its answers are the greedy chat
    answers to each prompt, cut at the task's stop string."""
    lm_eval = pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks import TaskManager

    from tests.evals.test_lm_eval_adapter import TASKS

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(TASKS)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
        out = lm_eval.simple_evaluate(
            model="local-chat-completions", apply_chat_template=True, log_samples=True,
            model_args=f"model={NAME},base_url={server.url}/chat/completions,num_concurrent=4,max_retries=1,"
                       "tokenized_requests=False,tokenizer_backend=None",
            tasks=["mmctl_gen"], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    samples = sorted(out["samples"]["mmctl_gen"], key=lambda s: s["doc_id"])
    prompts = [json.loads(line)["prompt"] for line in (TASKS / "gen.jsonl").read_text().splitlines()]
    assert len(samples) == len(prompts)
    for sample, prompt in zip(samples, prompts, strict=True):
        direct = decoded(chat_checkpoint, [{"role": "user", "content": prompt}], 8).split("\n")[0]
        assert sample["resps"][0][0] == direct
    assert "exact_match,none" in out["results"]["mmctl_gen"]


def test_without_the_serve_extra_it_says_what_to_install(chat_checkpoint, monkeypatch):
    from mmctl.errors import UsageError
    from mmctl.stages import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'mmctl\[serve\]'"):
        serve.run(serve.ServeConfig(checkpoint=str(chat_checkpoint)))
