"""Upstream TLS: verified by default, against a custom CA bundle when one is configured."""

from __future__ import annotations

import ssl
import subprocess

import openai
import pytest
from aiohttp import web

from conftest import ALICE, free_port, gateway_config
from proxy.devtools.mock import create_mock_app


def make_ca_and_server_cert(directory):
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Sluice Test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.ext", "-out", "server.pem")
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@pytest.fixture
async def tls_upstream(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(create_mock_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield f"https://127.0.0.1:{port}/v1", ca
    await runner.cleanup()


async def test_an_unknown_ca_is_refused_by_default(tls_upstream, start_gateway):
    url, _ = tls_upstream
    gw = await start_gateway(gateway_config(url))
    with pytest.raises(openai.InternalServerError) as caught:
        await openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 502


async def test_a_configured_ca_bundle_is_trusted(tls_upstream, start_gateway):
    url, ca = tls_upstream
    config = gateway_config(url)
    config["upstreams"][0]["ca_bundle"] = str(ca)
    gw = await start_gateway(config)
    answer = await openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "over tls"}]
    )
    assert answer.choices[0].message.content == "over tls"
