"""Fixtures shared by the data tests."""

import http.server
import threading
from types import SimpleNamespace

import pytest


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve tmp_path/served on 127.0.0.1 and record the request paths."""
    # Keep proxy settings in the environment away from the local server.
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield SimpleNamespace(
        root=root, url=f"http://127.0.0.1:{server.server_port}/", requests=requests
    )
    server.shutdown()
    server.server_close()
    thread.join()
