"""The OpenAI server on a loopback port in a background thread, as `pagedjax serve` runs it
(read timeouts, shutdown deadline, exit status), plus raw-socket and engine helpers."""

import json
import socket
import threading
import time

from pagedjax.server import build_http_server, create_server_state

API_KEY = "test-key"


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """`GracefulServer.run_until_stopped` in a thread; `exit_status` once it returned."""

    def __init__(self, llm, config=None, **state_kwargs):
        self.state = create_server_state(llm, served_model_names=("tiny",), config=config,
                                         **state_kwargs)
        self.port = free_port()
        self.server = build_http_server(self.state, "127.0.0.1", self.port, "warning")
        self.exit_status = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "no server"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self):
        self.exit_status = self.server.run_until_stopped()

    def stop(self, timeout=30):
        """Ask it to shut down (as SIGINT does) and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "the server did not stop"


def wait_idle(llm, timeout=30):
    """Until the engine has no request and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while llm.engine.has_unfinished_requests() or llm.engine.block_manager.num_used_blocks:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.05)
    llm.engine.block_manager.check_no_leak()


def slow_steps(monkeypatch, llm, seconds=0.02):
    """Make every engine step take at least `seconds` (so requests are still running
    when a test acts on them)."""
    step = llm.engine.step_with_updates

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(llm.engine, "step_with_updates", slow_step)


def raw_request(port: int, path: str, body: dict, api_key: str = API_KEY) -> socket.socket:
    """A socket that has sent one POST with a JSON body (the response is left unread)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {api_key}\r\nContent-Length: {len(payload)}\r\n"
                 f"\r\n".encode() + payload)
    return sock


def metric(text: str, name: str) -> float:
    """The value of metric `name` in a Prometheus exposition."""
    lines = [line for line in text.splitlines() if line.startswith(f"pagedjax:{name}")]
    assert lines, name
    return float(lines[0].split()[-1])


def sse_events(lines) -> list:
    """The JSON payloads of `data:` lines, "[DONE]" as is."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
