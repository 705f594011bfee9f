"""How pull talks HTTP for file bodies: a part goes straight to the CDN URL the file's first redirect ended at
(and back through the Hub when that URL is refused), bodies come over kept-alive stdlib connections unless a proxy
applies (then httpx carries them), and a pull asks the Hub for nothing but the listing and the files. Real HTTP
against the test Hub on 127.0.0.1; PART_SIZE is shrunk so a few MiB split into parts."""
from __future__ import annotations

import hashlib
import os

import pytest

from mlxk import __version__
from mlxk import hub as hubmod   # `hub` is the test server fixture

MiB = 1024 * 1024


def _blob(size: int, seed: bytes = b"t") -> bytes:
    return (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size]


def _cdn(hub) -> list:
    return [r for r in hub.requests if r.method == "GET" and "/_cdn/" in r.path]


def _resolves(hub) -> list:
    return [r for r in hub.requests if r.origin == "hub" and "/resolve/" in r.path]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf" / "hub"


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(hubmod, "PART_SIZE", MiB)


def test_parts_go_straight_to_the_cdn_after_the_first_redirect(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/direct")
    weights = _blob(8 * MiB)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=2)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    assert len([r for r in _cdn(hub) if r.range]) == 8
    # Only the connections that started before any redirect was known went through the Hub.
    assert 1 <= len(_resolves(hub)) <= 2
    assert all(r.token is None for r in _cdn(hub))


def test_a_refused_cdn_url_goes_through_the_hub_again(hub, cache, small_parts, monkeypatch):
    """The presigned URL expires mid-file (the server's signing key changes at `pull.part`): the next parts get
    403 from the CDN, resolve again, and the file completes with each byte sent once."""
    repo_id = hub.unique_repo("org/expired")
    weights = _blob(6 * MiB)
    hub.add_repo(repo_id, {"model.safetensors": weights})
    real_checkpoint = hubmod.checkpoint

    def checkpoint(name):
        if name == "pull.part":
            hub._secret = os.urandom(16)     # every URL handed out so far is now refused
        real_checkpoint(name)

    monkeypatch.setattr(hubmod, "checkpoint", checkpoint)
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=2)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    refused = [r for r in _cdn(hub) if r.status == 403]
    assert refused
    assert len(_resolves(hub)) > 2
    assert sum(r.bytes_sent for r in _cdn(hub) if r.status == 206) == len(weights)


def test_behind_a_proxy_bodies_go_through_httpx(hub, cache, small_parts, monkeypatch):
    """With a proxy in the environment the stdlib connections are not used; httpx (which honours the proxy
    settings) carries every body, split or not. The proxy itself is out of reach here, so `_proxied` is forced."""
    repo_id = hub.unique_repo("org/proxied")
    weights, small = _blob(4 * MiB), _blob(100_000, b"s")
    hub.add_repo(repo_id, {"model.safetensors": weights, "tokenizer.json": small})
    monkeypatch.setattr(hubmod, "_proxied", lambda url: True)
    used = []
    real = hubmod._HttpxBody.__init__

    def init(self, response):
        used.append(response.url)
        real(self, response)

    monkeypatch.setattr(hubmod._HttpxBody, "__init__", init)
    result = hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=2)
    assert (result.snapshot_path / "model.safetensors").read_bytes() == weights
    assert (result.snapshot_path / "tokenizer.json").read_bytes() == small
    assert len(used) >= 5   # 4 parts and the small file, each at least once


@pytest.mark.parametrize("env, url, proxied", [
    ({}, "https://cdn.example/x", False),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "https://cdn.example/x", True),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "http://cdn.example/x", False),
    ({"ALL_PROXY": "http://proxy:3128"}, "http://cdn.example/x", True),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "cdn.example"}, "https://cdn.example/x", False),
])
def test_which_urls_a_proxy_applies_to(monkeypatch, env, url, proxied):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hubmod._proxied(url) is proxied


def test_a_pull_asks_the_hub_only_for_the_listing_and_the_files(hub, cache, small_parts):
    repo_id = hub.unique_repo("org/quiet")
    hub.add_repo(repo_id, {"config.json": b"{}", "model.safetensors": _blob(3 * MiB)})
    hubmod.pull(repo_id, cache_dir=cache, endpoint=hub.endpoint, connections=2)
    paths = {r.path for r in hub.requests}
    assert not [p for p in paths if "agent-harnesses" in p]
    assert all(f"/{repo_id}/" in p or f"/api/models/{repo_id}" in p or "/_cdn/" in p for p in paths), paths


def test_the_user_agent_names_mlxk_and_the_token_goes_only_to_the_hub():
    assert hubmod._headers(None)["user-agent"].startswith(f"mlxk/{__version__}; python/")
    assert "authorization" not in hubmod._headers(None)
    assert hubmod._headers("hf_abc")["authorization"] == "Bearer hf_abc"


@pytest.fixture
def tls_server(tmp_path):
    """A ranged HTTPS file server on 127.0.0.1 with a self-signed certificate for `localhost`."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    data = _blob(3 * MiB, b"tls")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            a, b = self.headers["range"].split("=")[1].split("-")
            body = data[int(a):int(b) + 1]
            self.send_response(206)
            self.send_header("content-length", str(len(body)))
            self.send_header("content-range", f"bytes {a}-{b}/{len(data)}")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://localhost:{server.server_address[1]}/f", data, cert
    server.shutdown()
    server.server_close()


def _fetch(url: str, span: str) -> bytes:
    job = hubmod._Job("org/tls", None, None, "0" * 40, "", {}, None, None, None, lambda: False)
    try:
        body = hubmod._get(job, url, {"range": span})
        assert body.status_code == 206
        buffer, got = bytearray(4 * MiB), 0
        while not body.finished:
            got += body.readinto(memoryview(buffer)[got:])
        body.close()
        return bytes(buffer[:got])
    finally:
        job.origins.close()


def test_https_bodies_are_verified_against_the_trusted_certificates(tls_server, monkeypatch):
    """Over https the stdlib connections use httpx's certificate store (certifi, SSL_CERT_FILE): a server whose
    certificate is trusted serves the part; an untrusted one is refused before any byte is read."""
    url, data, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert _fetch(url, "bytes=1000-2000000") == data[1000:2000001]
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(hubmod._Transient, match="CERTIFICATE_VERIFY_FAILED"):
        _fetch(url, "bytes=0-99")
